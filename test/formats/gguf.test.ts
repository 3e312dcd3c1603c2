// GGUF import/export without llama.cpp: the block decoders against values known from hand-made
// blocks (test/helpers/gguf-handmade.ts, written from the spec, not by our exporter), ORT's MatMulNBits
// on the converted layout, the q/k permutation, the Q4_0 round trip, and bad input.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { T, randomTensor, handmadeLlama, demoVocab } from '../helpers/gguf-handmade.js';
import { runOneNode, matmulABt } from '../quant/ort-one-node.js';
import { Rng } from '../../src/util/rng.js';
import { buildDemoTokenizer } from '../../src/formats/demo-model.js';
import { GgufReader } from '../../src/formats/gguf/reader.js';
import { toNBits, dequantizeGguf } from '../../src/formats/gguf/blocks.js';
import { permuteRows } from '../../src/formats/gguf/names.js';
import { importGguf } from '../../src/formats/gguf/import.js';
import { exportGgufBase } from '../../src/formats/gguf/export.js';
import { dequantizeInt4 } from '../../src/quant/int4.js';
import { EdgeloraError } from '../../src/util/errors.js';
import { readManifest } from '../../src/model/manifest.js';
import { QuantizedWeights } from '../../src/model/weights.js';
import type { SupportedType } from '../../src/formats/gguf/spec.js';

let tmp: { dir: string; cleanup: () => void };
const vocab = demoVocab(buildDemoTokenizer().tokenizerJson as never);
before(() => {
  tmp = tempDir('edgelora-gguf-');
});
after(() => tmp.cleanup());

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

const TYPES: [SupportedType, number][] = [['Q4_0', T.Q4_0], ['Q4_1', T.Q4_1], ['Q5_0', T.Q5_0], ['Q8_0', T.Q8_0], ['Q4_K', T.Q4_K], ['Q6_K', T.Q6_K], ['F16', T.F16], ['BF16', T.BF16], ['F32', T.F32]];

test('block decoders give the exact value of every element (ggml reference and MatMulNBits layout)', () => {
  const rng = new Rng(3);
  const N = 6, K = 512;
  for (const [name, id] of TYPES) {
    const { bytes, values } = randomTensor(id, N, K, rng);
    const ref = dequantizeGguf(name, bytes, N * K);
    const d1 = maxDiff(ref, values);
    assert.equal(d1, 0, `${name}: ggml reference dequantization differs from the encoded values by ${d1}`);
    const nb = toNBits(name, bytes, N, K);
    if (!nb) continue;
    const back = dequantizeInt4({ ...nb, zeroPoints: nb.zeroPoints });
    const d2 = maxDiff(back, values);
    // Q4_K's and Q4_1's float zero points (min/scale) re-associate d·sc·q − dmin·m: a few float32 ulps of the range.
    const tol = name === 'Q4_K' || name === 'Q4_1' ? 1e-6 : 0;
    assert.ok(d2 <= tol, `${name}: MatMulNBits layout dequantizes ${d2} away from the file's values (tolerance ${tol})`);
  }
});

test("ORT's MatMulNBits on the converted layout equals a float64 matmul with the file's values", async () => {
  const rng = new Rng(5);
  const N = 8, K = 256, M = 3;
  const a = Float32Array.from({ length: M * K }, () => rng.normal());
  for (const [name, id] of TYPES.filter(([n]) => n.startsWith('Q'))) {
    const { bytes, values } = randomTensor(id, N, K, rng);
    const nb = toNBits(name, bytes, N, K)!;
    const blob = (nb.blockSize * nb.bits) / 8;
    const inits = [
      { name: 'B', dtype: 'uint8' as const, dims: [N, nb.kBlocks, blob], data: nb.packed },
      { name: 's', dtype: 'float32' as const, dims: [N * nb.kBlocks], data: nb.scales },
      ...(nb.zeroPoints ? [{ name: 'z', dtype: 'float32' as const, dims: [N * nb.kBlocks], data: nb.zeroPoints }] : []),
    ];
    const y = await runOneNode(
      {
        opType: 'MatMulNBits',
        domain: 'com.microsoft',
        inputs: ['A', 'B', 's', ...(nb.zeroPoints ? ['z'] : [])],
        initializers: inits,
        a: { name: 'A', dims: [M, K] },
        output: { name: 'Y', dims: [M, N] },
        intAttrs: { K, N, bits: nb.bits, block_size: nb.blockSize, accuracy_level: 0 },
      },
      a,
    );
    const ref = matmulABt(a, Float32Array.from(values), M, K, N);
    let scale = 0;
    for (const v of ref) scale = Math.max(scale, Math.abs(v));
    const d = maxDiff(y, ref);
    // float32 accumulation over K = 256 terms: ~K·2^-24 of the largest output
    assert.ok(d <= 1e-5 * scale, `${name}: MatMulNBits max |Δ| ${d} (scale ${scale})`);
  }
});

test('q/k permutation: llama.cpp order and back is the identity, and moves rows as convert_hf_to_gguf does', () => {
  const heads = 2, D = 8, rowBytes = 3;
  const data = Uint8Array.from({ length: heads * D * rowBytes }, (_, i) => i);
  const gg = permuteRows(data, heads, rowBytes, 'to-gguf');
  assert.deepEqual(permuteRows(gg, heads, rowBytes, 'from-gguf'), data);
  // HF row 1 (first half, j=1) becomes llama.cpp row 2; HF row D/2 (second half, j=0) becomes row 1.
  assert.deepEqual([...gg.subarray(2 * rowBytes, 3 * rowBytes)], [...data.subarray(1 * rowBytes, 2 * rowBytes)]);
  assert.deepEqual([...gg.subarray(1 * rowBytes, 2 * rowBytes)], [...data.subarray((D / 2) * rowBytes, (D / 2 + 1) * rowBytes)]);
});

test('a hand-made GGUF: reader sees its metadata and tensors; import records source, sha256 and types', async () => {
  const f = path.join(tmp.dir, 'hm-q4k.gguf');
  handmadeLlama(f, T.Q4_K, vocab, 2);
  const r = GgufReader.open(f);
  try {
    assert.equal(r.metadata.get('general.architecture'), 'llama');
    assert.equal(r.metadata.get('llama.block_count'), 2);
    assert.deepEqual(r.info('blk.0.attn_q.weight').dims, [256, 256]);
    assert.equal(r.info('blk.1.ffn_down.weight').typeName, 'Q4_K');
  } finally {
    r.close();
  }
  const out = path.join(tmp.dir, 'hm-q4k');
  const res = await importGguf(f, out);
  assert.equal(res.manifest.quant.source, 'gguf');
  assert.equal(res.manifest.gguf?.file, 'hm-q4k.gguf');
  assert.equal(res.manifest.gguf?.types.Q4_K, 14);
  const { createHash } = await import('node:crypto');
  assert.equal(res.manifest.gguf?.sha256, createHash('sha256').update(readFileSync(f)).digest('hex'));
  for (const f2 of ['model.onnx', 'tokenizer.json', 'tokenizer_config.json', 'config.json']) assert.ok(existsSync(path.join(out, f2)), `${f2} written`);
});

for (const [name, type, exportAs] of [['Q4_0', T.Q4_0, 'q4_0'], ['Q8_0', T.Q8_0, 'q8_0']] as const) {
  test(`${name} round trip: GGUF → edgelora (${name === 'Q4_0' ? '4-bit, zero point 8' : '8-bit, zero point 128'}, block 32) → export ${exportAs} → import is bit-identical`, async () => {
    const f = path.join(tmp.dir, `rt-${name}.gguf`);
    handmadeLlama(f, type, vocab, 4);
    const a = path.join(tmp.dir, `rt-${name}-a`);
    await importGguf(f, a);
    const g2 = path.join(tmp.dir, `rt-${name}-2.gguf`);
    const rep = await exportGgufBase(a, g2, { type: exportAs, tableType: 'f32' });
    assert.equal(rep.requantized, 0, 'nothing re-quantized');
    assert.equal(rep.scalesRounded, 0, 'f16 scales came back as themselves');
    // Every tensor's GGUF bytes are the original file's, byte for byte.
    const r1 = GgufReader.open(f), r2 = GgufReader.open(g2);
    try {
      for (const t of r1.tensors.values()) {
        assert.ok(Buffer.from(r1.readRaw(t.name)).equals(Buffer.from(r2.readRaw(t.name))), `tensor ${t.name} differs after the round trip`);
      }
    } finally {
      r1.close();
      r2.close();
    }
    const b = path.join(tmp.dir, `rt-${name}-b`);
    await importGguf(g2, b);
    const qa = await QuantizedWeights.open(a, await readManifest(a));
    const qb = await QuantizedWeights.open(b, await readManifest(b));
    assert.deepEqual([...qa.tensors.keys()].sort(), [...qb.tensors.keys()].sort());
    for (const [tname, t] of qa.tensors) {
      if (tname.startsWith('const_') || t.dtype === 'int64') continue;
      assert.ok(Buffer.from(await qa.readRaw(tname)).equals(Buffer.from(await qb.readRaw(tname))), `imported tensor ${tname} differs`);
    }
  });
}

test('export of an asymmetric int4 model as q4_0 says what it re-quantized', async () => {
  const hf = await tinyCheckpoint(tmp.dir, 2);
  const m = await quantized(hf, tmp.dir, 'int4', { format: 'int4' });
  const rep = await exportGgufBase(m, path.join(tmp.dir, 'int4.gguf'), { type: 'q4_0' });
  assert.equal(rep.requantized, rep.tensors - 4 * 2 - 1, 'every linear and the q8_0 table re-quantized; norms exact');
});

test('export of a model with a quantized vocabulary table (quantize --embeddings int8) writes the table it serves', async () => {
  const root = path.join(tmp.dir, 'qtable');
  const hf = await tinyCheckpoint(root, 3);
  const m = await quantized(hf, root, 'int4-qtable', { format: 'int4', embeddings: 'int8' });
  const qw = await QuantizedWeights.open(m, await readManifest(m));
  const cfg = JSON.parse(readFileSync(path.join(hf, 'config.json'), 'utf8')) as { vocab_size: number; hidden_size: number };
  const [V, C] = [cfg.vocab_size, cfg.hidden_size];
  assert.ok(qw.tableLayout('model.embed_tokens.weight', C), 'the table is stored quantized');
  const g2 = path.join(root, 'int4-qtable.gguf');
  await exportGgufBase(m, g2, { type: 'q4_0', tableType: 'f32' });
  const r = GgufReader.open(g2);
  try {
    const raw = r.readRaw('token_embd.weight');
    const got = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
    const want = await qw.dequantizedTable('model.embed_tokens.weight', V, C);
    assert.equal(got.length, V * C);
    assert.equal(maxDiff(got, want), 0, 'f32 holds the dequantized table exactly');
  } finally {
    r.close();
  }
});

async function refuses(file: string, out: string, re: RegExp, mention: string[]): Promise<void> {
  await assert.rejects(importGguf(file, out), (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, `EdgeloraError, got ${String(err)}`);
    const text = err.describe();
    assert.match(text, re);
    for (const m of mention) assert.ok(text.includes(m), `error names ${m}: ${text}`);
    return true;
  });
  assert.equal(existsSync(out), false, 'no output directory left behind');
}

test('bad input: truncated file, lying offset, unsupported type, unsupported architecture', async () => {
  const good = path.join(tmp.dir, 'good.gguf');
  handmadeLlama(good, T.Q8_0, vocab, 9);
  const bytes = readFileSync(good);
  const trunc = path.join(tmp.dir, 'trunc.gguf');
  writeFileSync(trunc, bytes.subarray(0, Math.floor(bytes.length * 0.6)));
  await refuses(trunc, path.join(tmp.dir, 'o1'), /past the end of the file|truncated/, [trunc, 'tensor blk.']);
  const shortHead = path.join(tmp.dir, 'short.gguf');
  writeFileSync(shortHead, bytes.subarray(0, 4000));
  await refuses(shortHead, path.join(tmp.dir, 'o1b'), /truncated/, [shortHead]);

  const lie = path.join(tmp.dir, 'lie.gguf');
  handmadeLlama(lie, T.Q8_0, vocab, 9, { lieOffset: { name: 'blk.1.ffn_up.weight', offset: 32 * 1024 * 1024 } });
  await refuses(lie, path.join(tmp.dir, 'o2'), /past the end/, [lie, 'blk.1.ffn_up.weight']);
  const overlap = path.join(tmp.dir, 'overlap.gguf');
  handmadeLlama(overlap, T.Q8_0, vocab, 9, { lieOffset: { name: 'blk.1.ffn_up.weight', offset: 0 } });
  await refuses(overlap, path.join(tmp.dir, 'o2b'), /overlaps/, [overlap, 'blk.1.ffn_up.weight']);

  const odd = path.join(tmp.dir, 'q5_1.gguf');
  handmadeLlama(odd, T.Q8_0, vocab, 9, { odd: { name: 'blk.0.attn_v.weight', type: T.Q5_1, blockBytes: 24 } });
  await refuses(odd, path.join(tmp.dir, 'o3'), /type Q5_1/, [odd, 'blk.0.attn_v.weight']);

  const arch = path.join(tmp.dir, 'gemma.gguf');
  handmadeLlama(arch, T.Q8_0, vocab, 9, { arch: 'gemma' });
  await refuses(arch, path.join(tmp.dir, 'o4'), /general\.architecture is "gemma"/, [arch]);

  await refuses(path.join(tmp.dir, 'missing.gguf'), path.join(tmp.dir, 'o5'), /cannot open/, ['missing.gguf']);
});
