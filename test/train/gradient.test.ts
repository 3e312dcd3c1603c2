// The training graph's gradients (ORT, float32, autodiff.ts) against central finite differences of
// an independent float64 reference (test/helpers/reference.ts + a float64 NLL), on the tiny preset:
// every LoRA tensor of all seven projections in every layer, on fp32, nf4 and int4 (accuracy_level 0)
// bases, over a right-padded batch with prompt labels masked. Also: recomputation gives the same
// gradients.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized, dequantizedWeights } from '../helpers/fixtures.js';
import { referenceForward, type RefLora } from '../helpers/reference.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';
import { LINEAR_PROJS, siteKey } from '../../src/model/llama.js';
import { TrainSession, countLabelTokens, dropoutBits, NO_DROPOUT, type DropoutMasks, type LoraParam, type MicroBatch } from '../../src/train/session.js';
import { loraTargets } from '../../src/train/graph.js';
import { Rng } from '../../src/util/rng.js';

/** |analytic − FD| / max(|FD|, 0.1 · max |analytic| over the tensor) must stay below this. */
const TOL_REL = 1e-3;
/** Central-difference step on a parameter (parameters are ~0.1). */
const EPS = 1e-3;
/** Elements sampled per tensor: the largest-gradient one plus random ones. */
const SAMPLES = 2;
/** Recomputation must not change gradients beyond float32 reordering noise. */
const TOL_RECOMPUTE = 1e-5;

let root: { dir: string; cleanup: () => void };
let hf: string;
before(async () => {
  root = tempDir('edgelora-grad-');
  hf = await tinyCheckpoint(root.dir, 3);
});
after(() => root.cleanup());

const RANK = 2;
// Two rows of different lengths (right padding), the first with a masked prompt.
const BATCH: MicroBatch = {
  inputIds: [
    [607, 40, 41, 80, 99, 120, 5, 77],
    [607, 200, 201, 33, 9],
  ],
  labels: [
    [-100, -100, -100, 80, 99, 120, 5, 77],
    [607, 200, 201, 33, 9],
  ],
};

function randomParams(cfg: ModelConfig, seed: number): Map<string, LoraParam> {
  const rng = new Rng(seed);
  const params = new Map<string, LoraParam>();
  for (const t of loraTargets(cfg, LINEAR_PROJS, () => RANK)) {
    params.set(siteKey(t), {
      layer: t.layer, proj: t.proj, r: RANK, K: t.K, N: t.N, alpha: 1.5 * RANK, scale: 1.5,
      a: Float32Array.from({ length: RANK * t.K }, () => 0.1 * rng.normal()),
      b: Float32Array.from({ length: RANK * t.N }, () => 0.1 * rng.normal()),
    });
  }
  return params;
}

/** Float64 mean token NLL of the batch under the reference forward (with `dropout`: those masks on the LoRA inputs). */
function referenceLoss(cfg: ModelConfig, W: (n: string) => Float32Array, params: Map<string, LoraParam>, dropout?: { masks: DropoutMasks; T: number }): number {
  const bitsOf = new Map<string, Uint8Array>();
  const lora = (b: number) => (layer: number, proj: string): RefLora[] => {
    const key = `${layer}.${proj}`;
    const p = params.get(key);
    if (!p) return [];
    if (!dropout) return [{ a: p.a, b: p.b, r: p.r, scale: p.scale }];
    if (!bitsOf.has(key)) bitsOf.set(key, dropout.masks.bits(key, BATCH.inputIds.length, dropout.T, p.K));
    const bits = bitsOf.get(key)!;
    const Kb = Math.ceil(p.K / 8);
    const at = (t: number, k: number) => ((bits[(b * dropout.T + t) * Kb + (k >> 3)]! >> (k & 7)) & 1) * dropout.masks.scale;
    return [{ a: p.a, b: p.b, r: p.r, scale: p.scale, dropout: at }];
  };
  const V = cfg.vocabSize;
  let nll = 0;
  BATCH.inputIds.forEach((ids, b) => {
    const logits = referenceForward(cfg, W, [...ids], lora(b));
    const labels = BATCH.labels[b]!;
    for (let t = 0; t + 1 < ids.length; t++) {
      const y = labels[t + 1]!;
      if (y === -100) continue;
      let max = -Infinity;
      for (let i = 0; i < V; i++) max = Math.max(max, logits[t * V + i]!);
      let s = 0;
      for (let i = 0; i < V; i++) s += Math.exp(logits[t * V + i]! - max);
      nll += Math.log(s) + max - logits[t * V + y]!;
    }
  });
  return nll / countLabelTokens(BATCH.labels);
}

async function checkFormat(name: string, opts: Parameters<typeof quantized>[3] | { dir: () => Promise<string> }): Promise<void> {
  const dir = 'dir' in opts ? await opts.dir() : await quantized(hf, root.dir, name, opts);
  const manifest = await readManifest(dir);
  const cfg = parseHfConfig(manifest.sourceConfig, dir);
  const { W } = await dequantizedWeights(dir);
  const targets = loraTargets(cfg, LINEAR_PROJS, () => RANK);
  const params = randomParams(cfg, 11);
  const session = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609 });
  const count = countLabelTokens(BATCH.labels);
  const res = await session.step(BATCH, params, 1 / count);
  await session.release();
  const lossRef = referenceLoss(cfg, W, params);
  assert.ok(Math.abs(res.loss - lossRef) / lossRef < 1e-5, `${name}: loss ${res.loss} vs reference ${lossRef}`);

  const rng = new Rng(5);
  let worst = { err: 0, where: '' };
  for (const [key, p] of params) {
    const g = res.grads.get(key)!;
    for (const which of ['a', 'b'] as const) {
      const x = p[which];
      const gx = g[which];
      let gmax = 0;
      let argmax = 0;
      for (let i = 0; i < gx.length; i++) if (Math.abs(gx[i]!) > gmax) { gmax = Math.abs(gx[i]!); argmax = i; }
      assert.ok(gmax > 0, `${name} ${key}.${which}: gradient is all zero`);
      const idx = [argmax, ...Array.from({ length: SAMPLES - 1 }, () => rng.int(gx.length))];
      for (const i of idx) {
        const orig = x[i]!;
        x[i] = orig + EPS;
        const hi = x[i]!;
        const lp = referenceLoss(cfg, W, params);
        x[i] = orig - EPS;
        const lo = x[i]!;
        const lm = referenceLoss(cfg, W, params);
        x[i] = orig;
        const fd = (lp - lm) / (hi - lo);
        const err = Math.abs(gx[i]! - fd) / Math.max(Math.abs(fd), 0.1 * gmax);
        if (err > worst.err) worst = { err, where: `${key}.${which}[${i}] analytic ${gx[i]} fd ${fd}` };
      }
    }
  }
  console.log(`${name}: ${params.size * 2} tensors, max relative error ${worst.err.toExponential(2)} (${worst.where || 'n/a'})`);
  assert.ok(worst.err < TOL_REL, `${name}: relative error ${worst.err} ≥ ${TOL_REL} at ${worst.where}`);
}

test('gradients match finite differences of the float64 reference: fp32 base', async () => {
  await checkFormat('fp32', { format: 'fp32' });
});

test('gradients match finite differences of the float64 reference: nf4 base (in-graph dequantized backward)', async () => {
  await checkFormat('nf4', { format: 'nf4', blockSize: 64 });
});

test('gradients match finite differences of the float64 reference: int4 base (accuracy_level 0)', async () => {
  await checkFormat('int4', { format: 'int4', blockSize: 32, int4AccuracyLevel: 0 });
});

test('gradients match finite differences of the float64 reference: GGUF-imported base (Q4_K float zero points, Q6_K 8-bit)', async () => {
  const { handmadeLlama, demoVocab, T } = await import('../helpers/gguf-handmade.js');
  const { buildDemoTokenizer } = await import('../../src/formats/demo-model.js');
  const { importGguf } = await import('../../src/formats/gguf/import.js');
  const file = path.join(root.dir, 'q4km.gguf');
  handmadeLlama(file, T.Q4_K, demoVocab(buildDemoTokenizer().tokenizerJson as never), 3, { mixed: T.Q6_K });
  await checkFormat('gguf Q4_K+Q6_K', { dir: async () => (await importGguf(file, path.join(root.dir, 'q4km'), { accuracyLevel: 0 })).dir });
});

test('recomputing layer activations in backward gives the same gradients', async () => {
  const dir = await quantized(hf, root.dir, 'nf4-rc', { format: 'nf4', blockSize: 64 });
  const manifest = await readManifest(dir);
  const cfg = parseHfConfig(manifest.sourceConfig, dir);
  const targets = loraTargets(cfg, LINEAR_PROJS, () => RANK);
  const params = randomParams(cfg, 12);
  const count = countLabelTokens(BATCH.labels);
  const plain = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609 });
  const a = await plain.step(BATCH, params, 1 / count);
  await plain.release();
  const rc = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609, recompute: true });
  const b = await rc.step(BATCH, params, 1 / count);
  await rc.release();
  let maxDiff = 0;
  let scale = 0;
  for (const [key, ga] of a.grads) {
    const gb = b.grads.get(key)!;
    for (const w of ['a', 'b'] as const) {
      for (let i = 0; i < ga[w].length; i++) {
        maxDiff = Math.max(maxDiff, Math.abs(ga[w][i]! - gb[w][i]!));
        scale = Math.max(scale, Math.abs(ga[w][i]!));
      }
    }
  }
  console.log(`recompute: max |Δgrad| ${maxDiff.toExponential(2)} (max |grad| ${scale.toExponential(2)}), loss ${a.loss} vs ${b.loss}`);
  assert.equal(a.loss, b.loss);
  assert.ok(maxDiff / scale < TOL_RECOMPUTE, `recompute changed gradients by ${maxDiff} (relative ${maxDiff / scale})`);
});

/** The chunked lm_head + loss must give the full-logits gradients up to float32 reordering. */
const TOL_CHUNKED = 1e-6;

// Chunks of 5 positions over 16 (4 chunks, the last padded), and a quantized table dequantized 300 rows at a time
// (4 slices over the tiny vocabulary): both loops run more than once and end ragged.
for (const [format, embeddings] of [['fp32', 'float'], ['int4', 'int8']] as const) {
  test(`chunked lm_head + loss (gradient fed back per chunk) equals the full-logits graph: ${format} base, ${embeddings} table (relative ${TOL_CHUNKED})`, async () => {
    const dir = await quantized(hf, root.dir, `m-chunk-${format}-${embeddings}`, { format, embeddings, ...(format === 'int4' ? { int4AccuracyLevel: 0 } : {}) });
    const manifest = await readManifest(dir);
    const cfg = parseHfConfig(manifest.sourceConfig, dir);
    const targets = loraTargets(cfg, LINEAR_PROJS, () => RANK);
    const params = randomParams(cfg, 17);
    const count = countLabelTokens(BATCH.labels);
    const full = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609 });
    const a = await full.step(BATCH, params, 1 / count);
    await full.release();
    const chunked = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609, maxTokens: 16, lossChunk: 5, tableChunk: 300 });
    const b = await chunked.step(BATCH, params, 1 / count);
    await chunked.release();
    const lossRel = Math.abs(a.loss - b.loss) / Math.abs(a.loss);
    let maxDiff = 0;
    let scale = 0;
    for (const [key, ga] of a.grads) {
      const gb = b.grads.get(key)!;
      for (const which of ['a', 'b'] as const) {
        for (let i = 0; i < ga[which].length; i++) {
          maxDiff = Math.max(maxDiff, Math.abs(ga[which][i]! - gb[which][i]!));
          scale = Math.max(scale, Math.abs(ga[which][i]!));
        }
      }
    }
    console.log(`${format}/${embeddings}: loss relative difference ${lossRel.toExponential(2)}, gradients max |Δ| ${maxDiff.toExponential(2)} (relative ${(maxDiff / scale).toExponential(2)})`);
    assert.ok(scale > 0, 'gradients are all zero');
    assert.ok(lossRel < TOL_CHUNKED, `loss: ${a.loss} vs chunked ${b.loss}`);
    assert.ok(maxDiff / scale < TOL_CHUNKED, `chunked changed gradients by ${maxDiff} (relative ${maxDiff / scale})`);
  });
}

/** Dropout masks fed as keep bits: the loss and its gradients against the float64 reference with the same masks. */
test('LoRA dropout (keep bits unpacked in the graph) matches the float64 reference with the same masks; all-keep masks equal no dropout', async () => {
  const dir = await quantized(hf, root.dir, 'fp32-drop', { format: 'fp32' });
  const manifest = await readManifest(dir);
  const cfg = parseHfConfig(manifest.sourceConfig, dir);
  const { W } = await dequantizedWeights(dir);
  const targets = loraTargets(cfg, LINEAR_PROJS, () => RANK);
  const params = randomParams(cfg, 23);
  const count = countLabelTokens(BATCH.labels);
  const T = Math.max(...BATCH.inputIds.map((r) => r.length));
  const P = 0.3;
  // Fixed masks per target (a fresh generator per key), so the reference and every finite difference see the same ones.
  const masks: DropoutMasks = { scale: 1 / (1 - P), bits: (key, B, TT, K) => { const r = new Rng(key.length * 1000 + K); return dropoutBits(() => r.next(), P, B, TT, K); } };
  const session = await TrainSession.create(dir, manifest, cfg, targets, { dropout: true, padTokenId: 609 });
  const res = await session.step(BATCH, params, 1 / count, masks);
  const keepAll = await session.step(BATCH, params, 1 / count, NO_DROPOUT);
  await session.release();
  const plain = await TrainSession.create(dir, manifest, cfg, targets, { dropout: false, padTokenId: 609 });
  const ref = await plain.step(BATCH, params, 1 / count);
  await plain.release();
  // Recomputation rebuilds the masks from their bits inside each layer's backward: the same step.
  const rcSession = await TrainSession.create(dir, manifest, cfg, targets, { dropout: true, padTokenId: 609, recompute: true });
  const rc = await rcSession.step(BATCH, params, 1 / count, masks);
  await rcSession.release();
  let rcDiff = 0;
  let rcScale = 0;
  for (const [key, g] of res.grads) for (const w of ['a', 'b'] as const) for (let i = 0; i < g[w].length; i++) {
    rcDiff = Math.max(rcDiff, Math.abs(g[w][i]! - rc.grads.get(key)![w][i]!));
    rcScale = Math.max(rcScale, Math.abs(g[w][i]!));
  }
  console.log(`dropout with recomputation: loss ${rc.loss} vs ${res.loss}, max |Δgrad| ${rcDiff.toExponential(2)}`);
  assert.equal(rc.loss, res.loss);
  assert.ok(rcDiff / rcScale < TOL_RECOMPUTE, `recomputation changed dropout gradients by ${rcDiff} (relative ${rcDiff / rcScale})`);
  const lossRef = referenceLoss(cfg, W, params, { masks, T });
  console.log(`dropout: loss ${res.loss} vs reference ${lossRef} (no dropout ${ref.loss}); all-keep ${keepAll.loss}`);
  assert.ok(Math.abs(res.loss - lossRef) / lossRef < 1e-5, `dropout loss ${res.loss} vs reference ${lossRef}`);
  assert.ok(Math.abs(res.loss - ref.loss) > 1e-4 * ref.loss, 'the masks changed nothing');
  assert.equal(keepAll.loss, ref.loss);
  let keepDiff = 0;
  for (const [key, g] of ref.grads) for (const w of ['a', 'b'] as const) for (let i = 0; i < g[w].length; i++) keepDiff = Math.max(keepDiff, Math.abs(g[w][i]! - keepAll.grads.get(key)![w][i]!));
  assert.equal(keepDiff, 0, `all-keep masks changed gradients by ${keepDiff}`);
  let worst = { err: 0, where: '' };
  for (const key of ['0.q_proj', '1.down_proj', '2.v_proj']) {
    const p = params.get(key)!;
    const g = res.grads.get(key)!;
    for (const which of ['a', 'b'] as const) {
      const gx = g[which];
      let i = 0;
      for (let j = 0; j < gx.length; j++) if (Math.abs(gx[j]!) > Math.abs(gx[i]!)) i = j;
      const orig = p[which][i]!;
      p[which][i] = orig + EPS;
      const hi = p[which][i]!;
      const lp = referenceLoss(cfg, W, params, { masks, T });
      p[which][i] = orig - EPS;
      const lo = p[which][i]!;
      const lm = referenceLoss(cfg, W, params, { masks, T });
      p[which][i] = orig;
      const fd = (lp - lm) / (hi - lo);
      const err = Math.abs(gx[i]! - fd) / Math.abs(fd);
      if (err > worst.err) worst = { err, where: `${key}.${which}[${i}] analytic ${gx[i]} fd ${fd}` };
    }
  }
  console.log(`dropout: max relative error vs finite differences ${worst.err.toExponential(2)} (${worst.where})`);
  assert.ok(worst.err < TOL_REL, `dropout gradients: relative error ${worst.err} ≥ ${TOL_REL} at ${worst.where}`);
});
