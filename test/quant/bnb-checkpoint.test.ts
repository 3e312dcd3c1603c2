// Hugging Face bitsandbytes 4-bit checkpoint tensors: writeBnbWeight → readBnbWeight reproduces the packed bytes
// exactly and the (de-nested) absmax, and broken parts fail with errors naming the tensor.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../../src/util/rng.js';
import { denestAbsmax, nestAbsmax, quantizeBnb4 } from '../../src/quant/bnb4.js';
import {
  type NamedRawTensor,
  type RawTensor,
  readBnbWeight,
  writeBnbWeight,
} from '../../src/quant/bnb-checkpoint.js';
import { EdgeloraError } from '../../src/util/errors.js';
import { SafetensorsReader, writeSafetensors } from '../../src/formats/safetensors.js';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';

const NAME = 'model.layers.0.self_attn.q_proj.weight';

function randn(n: number, seed: number): Float32Array {
  const rng = new Rng(seed);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rng.normal() * 0.02;
  return a;
}

function store(entries: NamedRawTensor[]): Map<string, RawTensor> {
  return new Map(entries.map((e) => [e.name, { dtype: e.dtype, shape: e.shape, data: e.data }]));
}

function getter(m: Map<string, RawTensor>): (name: string) => Promise<RawTensor | undefined> {
  return async (name) => m.get(name);
}

for (const quantType of ['nf4', 'fp4'] as const) {
  for (const doubleQuant of [false, true]) {
    test(`${quantType} ${doubleQuant ? 'nested' : 'plain'} absmax: write → read reproduces packed bytes and absmax`, async () => {
      const N = 96;
      const K = 200; // 19200 values: 300 blocks of 64 → 2 nested blocks, the second partial
      const w = randn(N * K, quantType === 'nf4' ? 1 : 2);
      const entries = writeBnbWeight(NAME, w, [N, K], { quantType, blockSize: 64, doubleQuant });
      const names = entries.map((e) => e.name).sort();
      const expected = [NAME, `${NAME}.absmax`, `${NAME}.quant_map`, `${NAME}.quant_state.bitsandbytes__${quantType}`];
      if (doubleQuant) expected.push(`${NAME}.nested_absmax`, `${NAME}.nested_quant_map`);
      assert.deepEqual(names, expected.sort());
      const weight = entries.find((e) => e.name === NAME)!;
      assert.deepEqual(weight.shape, [(N * K) / 2, 1]);
      assert.equal(weight.dtype, 'U8');
      const absT = entries.find((e) => e.name === `${NAME}.absmax`)!;
      assert.equal(absT.dtype, doubleQuant ? 'U8' : 'F32');
      const state = JSON.parse(new TextDecoder().decode(entries.find((e) => e.name.includes('quant_state'))!.data));
      assert.equal(state.quant_type, quantType);
      assert.equal(state.blocksize, 64);
      assert.deepEqual(state.shape, [N, K]);
      if (doubleQuant) {
        assert.equal(state.nested_blocksize, 256);
        assert.equal(typeof state.nested_offset, 'number');
      }

      const r = await readBnbWeight(getter(store(entries)), NAME);
      const q = quantizeBnb4(w, { quantType, blockSize: 64 });
      assert.equal(r.quantType, quantType);
      assert.equal(r.blockSize, 64);
      assert.deepEqual(r.shape, [N, K]);
      assert.equal(r.nested, doubleQuant);
      assert.deepEqual(r.packed, q.packed); // byte for byte
      const want = doubleQuant
        ? (() => {
            const n = nestAbsmax(q.absmax);
            return denestAbsmax(n.qAbsmax, n.nestedAbsmax, n.offset, n.nestedCode, 256);
          })()
        : q.absmax;
      assert.deepEqual(r.absmax, want); // exact: same float32 steps
    });
  }
}

test('reader uses the nested_quant_map stored in the file, not its own', async () => {
  const w = randn(64 * 64, 3);
  const entries = writeBnbWeight(NAME, w, [64, 64], { quantType: 'nf4', doubleQuant: true });
  const m = store(entries);
  // scale the stored map by 2: the de-nested absmax must follow
  const qmapT = m.get(`${NAME}.nested_quant_map`)!;
  const map = new Float32Array(qmapT.data.slice().buffer);
  const doubled = map.map((v) => v * 2);
  m.set(`${NAME}.nested_quant_map`, { ...qmapT, data: new Uint8Array(doubled.buffer) });
  const a = await readBnbWeight(getter(store(entries)), NAME);
  const b = await readBnbWeight(getter(m), NAME);
  const offset = JSON.parse(new TextDecoder().decode(m.get(`${NAME}.quant_state.bitsandbytes__nf4`)!.data)).nested_offset as number;
  for (let i = 0; i < a.absmax.length; i++) {
    const expected = 2 * (a.absmax[i]! - offset) + offset;
    assert.ok(Math.abs(b.absmax[i]! - expected) < 1e-6, `absmax ${i}: ${b.absmax[i]} vs ${expected}`);
  }
});

async function expectError(m: Map<string, RawTensor>, where: string, message: RegExp): Promise<void> {
  await assert.rejects(readBnbWeight(getter(m), NAME), (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, String(err));
    assert.equal(err.where, where);
    assert.match(err.message, message);
    return true;
  });
}

test('broken checkpoints fail with errors naming the tensor', async () => {
  const w = randn(64 * 32, 4);
  const fresh = (): Map<string, RawTensor> =>
    store(writeBnbWeight(NAME, w, [64, 32], { quantType: 'nf4', doubleQuant: true }));
  const stateName = `${NAME}.quant_state.bitsandbytes__nf4`;

  await assert.rejects(readBnbWeight(getter(new Map()), NAME), /no bitsandbytes quant state/);

  let m = fresh();
  m.set(stateName, { dtype: 'U8', shape: [5], data: new TextEncoder().encode('{"qu') });
  await expectError(m, stateName, /not valid UTF-8 JSON/);

  m = fresh();
  m.set(stateName, { dtype: 'U8', shape: [2], data: new TextEncoder().encode('{}') });
  await expectError(m, stateName, /does not match/);

  m = fresh();
  const bad = new TextEncoder().encode('{"quant_type": "fp4", "blocksize": 64, "shape": [64, 32], "nested_offset": 0.1}');
  m.set(stateName, { dtype: 'U8', shape: [bad.length], data: bad });
  await expectError(m, stateName, /quant_type "fp4"/);

  m = fresh();
  const big = new TextEncoder().encode('{"quant_type": "nf4", "blocksize": 64, "shape": [128, 32], "nested_offset": 0.1}');
  m.set(stateName, { dtype: 'U8', shape: [big.length], data: big });
  await expectError(m, NAME, /needs 2048/);

  m = fresh();
  m.delete(`${NAME}.absmax`);
  await expectError(m, `${NAME}.absmax`, /missing tensor/);

  m = fresh();
  m.delete(`${NAME}.nested_quant_map`);
  await expectError(m, `${NAME}.nested_quant_map`, /missing tensor/);

  m = fresh();
  const qm = new Float32Array(16).fill(0.5);
  m.set(`${NAME}.quant_map`, { dtype: 'F32', shape: [16], data: new Uint8Array(qm.buffer) });
  await expectError(m, `${NAME}.quant_map`, /differs from the NF4 codebook/);

  m = fresh();
  m.set(`${NAME}.nested_absmax`, { dtype: 'F32', shape: [3], data: new Uint8Array(12) });
  await expectError(m, `${NAME}.nested_absmax`, /expected 1 float32 values/);
});

test('through a real safetensors file: the HF tensor set survives write and read', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'edgelora-bnb-'));
  try {
    const N = 32;
    const K = 48;
    const w = randn(N * K, 6);
    const entries = writeBnbWeight(NAME, w, [N, K], { quantType: 'nf4', doubleQuant: true, dtype: 'bfloat16' });
    const file = path.join(dir, 'model.safetensors');
    await writeSafetensors(file, entries, { format: 'pt' });
    const reader = await SafetensorsReader.open(file);
    try {
      const fromFile = await readBnbWeight(async (name) => {
        if (!reader.has(name)) return undefined;
        const info = reader.info(name);
        return { dtype: info.dtype, shape: info.shape, data: await reader.readRaw(name) };
      }, NAME);
      const inMemory = await readBnbWeight(getter(store(entries)), NAME);
      assert.deepEqual(fromFile.packed, inMemory.packed);
      assert.deepEqual(fromFile.absmax, inMemory.absmax);
      assert.equal(fromFile.dtype, 'bfloat16');
    } finally {
      await reader.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
