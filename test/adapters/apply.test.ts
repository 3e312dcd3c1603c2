// LoRA application on the 4-bit base: unmerged == merged (fp32), == independent reference (nf4),
// rsLoRA, rank/alpha patterns, all seven projections, stacking, and A → B → A hot-swap.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized, dequantizedWeights } from '../helpers/fixtures.js';
import { referenceForward, relError } from '../helpers/reference.js';
import { randomAdapter, refLoras } from '../helpers/adapters.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { mergeAdapter } from '../../src/adapters/merge.js';
import { generate } from '../../src/runtime/generate.js';
import { LINEAR_PROJS } from '../../src/model/llama.js';
import { loadHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';

/** Graph vs reference / merged: float32 kernels, different summation order. */
const TOL = 1e-4;
const tmp = tempDir();
let hf = '';
let cfg: ModelConfig;
let nf4 = '';
let fp32 = '';
const PROMPT = 'My name is Ada and I live in';

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
  cfg = (await loadHfConfig(hf)).config;
  nf4 = await quantized(hf, tmp.dir, 'nf4', { format: 'nf4' });
  fp32 = await quantized(hf, tmp.dir, 'fp32', { format: 'fp32' });
});
after(() => tmp.cleanup());

async function logitsWith(dir: string, adapters: { dir: string; scale?: number }[]): Promise<{ logits: Float32Array; ids: number[]; tokens: number[] }> {
  const rt = await ModelRuntime.load(dir);
  try {
    const mgr = new AdapterManager(rt);
    for (const a of adapters) mgr.activate(await mgr.load(a.dir), a.scale ?? 1);
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const lora = adapters.length ? mgr.feeds() : undefined;
    const res = await rt.forward({ ids: [ids], ...(lora ? { lora } : {}) });
    const gen = await generate(rt, ids, { maxNewTokens: 12, temperature: 0, topK: 0, topP: 1, seed: 0, stopAtEos: false, ...(lora ? { lora } : {}) });
    return { logits: res.logits, ids, tokens: gen.tokenIds };
  } finally {
    await rt.release();
  }
}

test('fp32: unmerged adapter output equals the merged checkpoint (all seven projections)', async () => {
  const ad = path.join(tmp.dir, 'ad-all');
  await randomAdapter(ad, cfg, { r: 4, alpha: 8, targets: [...LINEAR_PROJS], seed: 11 });
  const mergedHf = path.join(tmp.dir, 'merged-hf');
  const res = await mergeAdapter(hf, ad, mergedHf);
  assert.equal(res.merged, cfg.numLayers * 7);
  const mergedQ = await quantized(mergedHf, tmp.dir, 'merged-fp32', { format: 'fp32' });
  const unmerged = await logitsWith(fp32, [{ dir: ad }]);
  const merged = await logitsWith(mergedQ, []);
  const base = await logitsWith(fp32, []);
  const e = relError(unmerged.logits, merged.logits);
  assert.ok(e.rel < TOL, `unmerged vs merged: rel ${e.rel.toExponential(3)} (max abs ${e.maxAbs})`);
  assert.ok(relError(base.logits, merged.logits).rel > 100 * TOL, 'the adapter must change the output for this test to mean anything');
  assert.deepEqual(unmerged.tokens, merged.tokens, 'greedy tokens must be identical');
});

test('nf4: logits with an adapter equal the independent reference forward', async () => {
  const ad = path.join(tmp.dir, 'ad-qv');
  const mods = await randomAdapter(ad, cfg, { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'], seed: 12 });
  const out = await logitsWith(nf4, [{ dir: ad }]);
  const { W } = await dequantizedWeights(nf4);
  const ref = referenceForward(cfg, W, out.ids, refLoras([{ modules: mods, scale: () => 16 / 8 }]));
  const e = relError(out.logits, ref);
  assert.ok(e.rel < TOL, `nf4 + adapter vs reference: rel ${e.rel.toExponential(3)}`);
});

test('rsLoRA scales by alpha/√r', async () => {
  const ad = path.join(tmp.dir, 'ad-rs');
  const mods = await randomAdapter(ad, cfg, { r: 16, alpha: 8, targets: ['k_proj', 'o_proj', 'down_proj'], seed: 13, rslora: true });
  const out = await logitsWith(nf4, [{ dir: ad }]);
  const { W } = await dequantizedWeights(nf4);
  const ref = referenceForward(cfg, W, out.ids, refLoras([{ modules: mods, scale: () => 8 / Math.sqrt(16) }]));
  const e = relError(out.logits, ref);
  assert.ok(e.rel < TOL, `rsLoRA: rel ${e.rel.toExponential(3)}`);
  const wrong = referenceForward(cfg, W, out.ids, refLoras([{ modules: mods, scale: () => 8 / 16 }]));
  assert.ok(relError(out.logits, wrong).rel > 100 * TOL, 'alpha/r scaling must not match an rsLoRA adapter');
});

test('rank_pattern and alpha_pattern give per-module ranks and scales', async () => {
  const ad = path.join(tmp.dir, 'ad-pattern');
  const mods = await randomAdapter(ad, cfg, {
    r: 8,
    alpha: 16,
    targets: ['q_proj', 'v_proj', 'up_proj'],
    seed: 14,
    rankPattern: { q_proj: 2, 'layers.1.self_attn.v_proj': 6 },
    alphaPattern: { up_proj: 4 },
  });
  const rankOf = (l: number, p: string) => mods.find((m) => m.layer === l && m.proj === p)!.r;
  assert.equal(rankOf(0, 'q_proj'), 2);
  assert.equal(rankOf(1, 'v_proj'), 6);
  assert.equal(rankOf(0, 'v_proj'), 8);
  const out = await logitsWith(nf4, [{ dir: ad }]);
  const { W } = await dequantizedWeights(nf4);
  // Independent statement of PEFT's rule: scale = alpha_for_module / r_for_module.
  const scale = (m: { proj: string; r: number }) => (m.proj === 'up_proj' ? 4 : 16) / m.r;
  const ref = referenceForward(cfg, W, out.ids, refLoras([{ modules: mods, scale }]));
  const e = relError(out.logits, ref);
  assert.ok(e.rel < TOL, `patterns: rel ${e.rel.toExponential(3)}`);
});

test('two stacked adapters (different ranks and targets, own scales) sum their deltas', async () => {
  const a1 = path.join(tmp.dir, 'stack-1');
  const a2 = path.join(tmp.dir, 'stack-2');
  const m1 = await randomAdapter(a1, cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 21 });
  const m2 = await randomAdapter(a2, cfg, { r: 12, alpha: 6, targets: ['v_proj', 'gate_proj', 'down_proj'], seed: 22 });
  const out = await logitsWith(nf4, [{ dir: a1, scale: 0.5 }, { dir: a2, scale: 1.5 }]);
  const { W } = await dequantizedWeights(nf4);
  const ref = referenceForward(cfg, W, out.ids, refLoras([
    { modules: m1, scale: () => 0.5 * (8 / 4) },
    { modules: m2, scale: () => 1.5 * (6 / 12) },
  ]));
  const e = relError(out.logits, ref);
  assert.ok(e.rel < TOL, `stacked: rel ${e.rel.toExponential(3)}`);
});

test('swapping A → B → A gives A its exact outputs again, and a cache never crosses adapter sets', async () => {
  const aDir = path.join(tmp.dir, 'swap-a');
  const bDir = path.join(tmp.dir, 'swap-b');
  await randomAdapter(aDir, cfg, { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'], seed: 31 });
  await randomAdapter(bDir, cfg, { r: 8, alpha: 16, targets: [...LINEAR_PROJS], seed: 32 });
  const rt = await ModelRuntime.load(nf4);
  try {
    const mgr = new AdapterManager(rt);
    const a = await mgr.load(aDir, { id: 'a' });
    const b = await mgr.load(bDir, { id: 'b' });
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const run = async () => {
      const pre = await rt.forward({ ids: [ids.slice(0, 4)], lora: mgr.feeds() });
      const dec = await rt.forward({ ids: [ids.slice(4)], cache: pre.cache, lora: mgr.feeds() });
      const gen = await generate(rt, ids, { maxNewTokens: 10, temperature: 0, topK: 0, topP: 1, seed: 0, stopAtEos: false, lora: mgr.feeds() });
      return { pre, dec, gen };
    };
    mgr.activate(a);
    const first = await run();
    mgr.deactivate(a);
    mgr.activate(b);
    const second = await run();
    // A cache computed under B must not be continued under A.
    mgr.deactivate(b);
    mgr.activate(a);
    await assert.rejects(rt.forward({ ids: [[ids[0]!]], cache: second.pre.cache, lora: mgr.feeds() }), /another adapter set/);
    const third = await run();
    assert.equal(relError(third.dec.logits, first.dec.logits).maxAbs, 0, 'A after B must reproduce A exactly');
    assert.deepEqual(third.gen.tokenIds, first.gen.tokenIds);
    assert.ok(relError(second.dec.logits, first.dec.logits).maxAbs > 0, 'B must differ from A');
    assert.deepEqual(mgr.active(), ['a']);
    assert.equal(mgr.list().length, 2);
    assert.ok(mgr.list().every((x) => x.bytes > 0));
  } finally {
    await rt.release();
  }
});
