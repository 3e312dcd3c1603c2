// Bad adapters are refused with a clear error and leave the active adapters exactly as they were.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../../src/adapters/peft.js';
import { loadHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';
import { SafetensorsReader, writeSafetensors } from '../../src/formats/safetensors.js';

const tmp = tempDir();
let cfg: ModelConfig;
let model: ModelRuntime;
let mgr: AdapterManager;
let good = '';
let n = 0;

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  cfg = (await loadHfConfig(hf)).config;
  model = await ModelRuntime.load(await quantized(hf, tmp.dir, 'nf4', { format: 'nf4' }));
  mgr = new AdapterManager(model);
  good = path.join(tmp.dir, 'good');
  await randomAdapter(good, cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 1, fingerprint: model.manifest.fingerprint });
  mgr.activate(await mgr.load(good, { id: 'good' }));
});
after(async () => {
  await model.release();
  tmp.cleanup();
});

async function badCopy(edit: (dir: string) => Promise<void>): Promise<string> {
  const dir = path.join(tmp.dir, `bad-${n++}`);
  await fs.cp(good, dir, { recursive: true });
  await edit(dir);
  return dir;
}

async function rewriteTensor(dir: string, name: string, f: (a: Float32Array, shape: number[]) => { data: Float32Array; shape: number[] }): Promise<void> {
  const file = path.join(dir, ADAPTER_WEIGHTS);
  const r = await SafetensorsReader.open(file);
  const entries = [];
  for (const t of r.names()) {
    const info = r.info(t);
    let data = await r.readF32(t);
    let shape = [...info.shape];
    if (t === name) ({ data, shape } = f(data, shape));
    entries.push({ name: t, dtype: 'F32' as const, shape, data });
  }
  await r.close();
  await writeSafetensors(file, entries);
}

async function expectRefused(dir: string, re: RegExp): Promise<void> {
  const before = mgr.feeds();
  const listBefore = JSON.stringify(mgr.list());
  await assert.rejects(mgr.load(dir), (err: Error) => {
    assert.match(err.message + ' ' + String((err as { hint?: string }).hint ?? ''), re);
    return true;
  });
  assert.equal(JSON.stringify(mgr.list()), listBefore, 'the loaded set must be unchanged');
  assert.equal(mgr.feeds(), before, 'the active feeds must be unchanged');
  assert.deepEqual(mgr.active(), ['good']);
}

const A0 = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';

test('wrong shapes are refused with a hint', async () => {
  const dir = await badCopy((d) => rewriteTensor(d, A0, (a, s) => ({ data: a.subarray(0, (s[0]! - 1) * s[1]!), shape: [s[0]! - 1, s[1]!] })));
  await expectRefused(dir, /shape.*another base/s);
});

test('a tensor holding NaN or Inf is refused', async () => {
  const nan = await badCopy((d) => rewriteTensor(d, A0, (a, s) => { a[3] = NaN; return { data: a, shape: s }; }));
  await expectRefused(nan, /NaN/);
  const inf = await badCopy((d) => rewriteTensor(d, A0, (a, s) => { a[5] = Infinity; return { data: a, shape: s }; }));
  await expectRefused(inf, /Infinity/);
});

test('a missing config field is refused, naming it', async () => {
  const dir = await badCopy(async (d) => {
    const f = path.join(d, ADAPTER_CONFIG);
    const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
    delete c.lora_alpha;
    await fs.writeFile(f, JSON.stringify(c));
  });
  await expectRefused(dir, /lora_alpha/);
});

test('an unknown target module is refused', async () => {
  const dir = await badCopy(async (d) => {
    const f = path.join(d, ADAPTER_CONFIG);
    const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
    c.target_modules = ['q_proj', 'v_proj', 'c_attn'];
    await fs.writeFile(f, JSON.stringify(c));
  });
  await expectRefused(dir, /c_attn/);
});

test('unsupported features are refused (DoRA, bias, modules_to_save, fan_in_fan_out)', async () => {
  for (const [field, value, re] of [
    ['use_dora', true, /DoRA/],
    ['bias', 'all', /bias/],
    ['modules_to_save', ['lm_head'], /modules_to_save/],
    ['fan_in_fan_out', true, /fan_in_fan_out/],
  ] as const) {
    const dir = await badCopy(async (d) => {
      const f = path.join(d, ADAPTER_CONFIG);
      const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
      c[field] = value;
      await fs.writeFile(f, JSON.stringify(c));
    });
    await expectRefused(dir, re);
  }
});

test('a truncated safetensors file is refused', async () => {
  const dir = await badCopy(async (d) => {
    const f = path.join(d, ADAPTER_WEIGHTS);
    await fs.truncate(f, (await fs.stat(f)).size - 100);
  });
  await expectRefused(dir, /adapter_model\.safetensors|truncat|end of file/i);
});

test('an adapter bound to another base is refused with a hint', async () => {
  const dir = path.join(tmp.dir, 'other-base');
  await randomAdapter(dir, cfg, { r: 4, alpha: 8, targets: ['q_proj'], seed: 2, fingerprint: 'ab'.repeat(32) });
  await expectRefused(dir, /adapter trained for another base/);
});

test('a PEFT adapter with no fingerprint loads once its shapes check out', async () => {
  const dir = path.join(tmp.dir, 'unbound');
  await randomAdapter(dir, cfg, { r: 2, alpha: 4, targets: ['o_proj'], seed: 3, fingerprint: null });
  const id = await mgr.load(dir);
  assert.equal(mgr.list().find((x) => x.id === id)?.baseFingerprint, null);
  mgr.unload(id);
});
