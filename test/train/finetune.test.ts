// The trainer end to end on the tiny nf4 base: one SGD step equals adapter − lr·gradient; gradient
// accumulation over G micro-batches equals one batch of G× the size; an interrupted run resumed from
// its checkpoint reaches the same adapter as an uninterrupted one; optimizer/schedule/init formulas.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';
import { loadTokenizer } from '../../src/formats/tokenizer.js';
import { loadJsonl } from '../../src/data/jsonl.js';
import { LINEAR_PROJS, linearShape, siteKey, type Proj } from '../../src/model/llama.js';
import { loadAdapter, makePeftConfig, saveAdapter, loraScale, type LoraModule } from '../../src/adapters/peft.js';
import { TrainSession, countLabelTokens, type LoraParam } from '../../src/train/session.js';
import { finetune } from '../../src/train/trainer.js';
import { checkpointDir } from '../../src/train/checkpoint.js';
import { learningRate, optimizerUpdate, initLora, clipByGlobalNorm } from '../../src/train/optim.js';
import { Rng } from '../../src/util/rng.js';

/** float32 host arithmetic vs the same arithmetic through the trainer: relative to the update size. */
const TOL_STEP = 1e-5;
/** Accumulated vs one-batch gradients: float32 summation order differs (padding widths differ). */
const TOL_ACCUM = 1e-5;

let root: { dir: string; cleanup: () => void };
let model: string;
let cfg: ModelConfig;
let data: string;
before(async () => {
  root = tempDir('edgelora-ft-');
  const hf = await tinyCheckpoint(root.dir, 2);
  model = await quantized(hf, root.dir, 'nf4', { format: 'nf4', blockSize: 64 });
  cfg = parseHfConfig((await readManifest(model)).sourceConfig, model);
  data = path.join(root.dir, 'data.jsonl');
  await fs.writeFile(
    data,
    [
      { text: 'The robot reads books about the sea.' },
      { prompt: 'What is two plus two?', completion: ' Two plus two is four.' },
      { text: 'Hello! How are you today?' },
      { prompt: 'Where do you live?', completion: ' I live in a small house near the river.' },
    ].map((r) => JSON.stringify(r)).join('\n') + '\n',
  );
});
after(() => root.cleanup());

/** Storing a parameter in float32 rounds it by up to half an ulp (2⁻²⁴ relative): not an error of the step. */
const F32_HALF_ULP = 2 ** -24;

/** max |a − b| beyond float32 storage rounding, relative to `scale` (the size of the update). */
function maxRel(a: Float32Array, b: Float32Array, scale: number): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!) - 2 * F32_HALF_ULP * Math.abs(b[i]!));
  return m / (scale || 1);
}

/** A random adapter (nonzero B) on q/v, saved as a PEFT directory bound to the base. */
async function randomAdapter(dir: string, seed: number): Promise<LoraModule[]> {
  const rng = new Rng(seed);
  const r = 4;
  const alpha = 8;
  const modules: LoraModule[] = [];
  for (let layer = 0; layer < cfg.numLayers; layer++) {
    for (const proj of ['q_proj', 'v_proj'] as Proj[]) {
      const { N, K } = linearShape(cfg, proj);
      modules.push({ layer, proj, r, alpha, scale: loraScale(alpha, r, false), a: Float32Array.from({ length: r * K }, () => 0.05 * rng.normal()), b: Float32Array.from({ length: N * r }, () => 0.05 * rng.normal()) });
    }
  }
  const manifest = await readManifest(model);
  await saveAdapter(dir, { config: makePeftConfig({ r, alpha, targets: ['q_proj', 'v_proj'] }), modules, baseFingerprint: manifest.fingerprint });
  return modules;
}

test('one SGD step from a given adapter equals adapter − lr·gradient', async () => {
  const init = path.join(root.dir, 'init-sgd');
  const modules = await randomAdapter(init, 7);
  const lr = 0.05;
  const out = path.join(root.dir, 'sgd-out');
  await finetune({ model, data, out, initAdapter: init, steps: 1, lr, optimizer: 'sgd', schedule: 'constant', maxGradNorm: 0, loraDropout: 0, batchSize: 8 });
  // The gradient, straight from the training session on the whole file (batch covers every row).
  const manifest = await readManifest(model);
  const tok = await loadTokenizer(model);
  const ex = await loadJsonl(data, tok, { seqLen: 512 });
  const params = new Map<string, LoraParam>();
  for (const m of modules) {
    const { N, K } = linearShape(cfg, m.proj);
    params.set(siteKey(m), { layer: m.layer, proj: m.proj, r: m.r, K, N, alpha: m.alpha, scale: m.scale, a: m.a, b: m.b });
  }
  const targets = [...params.values()].map((p) => ({ layer: p.layer, proj: p.proj, rank: p.r, K: p.K, N: p.N }));
  const session = await TrainSession.create(model, manifest, cfg, targets, { dropout: false, padTokenId: tok.padTokenId });
  const labels = ex.map((e) => e.labels);
  const res = await session.step({ inputIds: ex.map((e) => e.inputIds), labels }, params, 1 / countLabelTokens(labels));
  await session.release();
  const trained = await loadAdapter(out, { cfg, fingerprint: manifest.fingerprint });
  let worst = 0;
  for (const [key, p] of params) {
    const g = res.grads.get(key)!;
    const t = trained.modules.get(key)!;
    for (const w of ['a', 'b'] as const) {
      const expect = p[w].map((x, i) => x - lr * g[w][i]!);
      let upd = 0;
      for (let i = 0; i < expect.length; i++) upd = Math.max(upd, Math.abs(lr * g[w][i]!));
      worst = Math.max(worst, maxRel(t[w], expect, upd));
    }
  }
  console.log(`sgd step: max |trained − (adapter − lr·grad)| / max |lr·grad| = ${worst.toExponential(2)}`);
  assert.ok(worst < TOL_STEP, `SGD step differs by ${worst}`);
  const logLines = (await fs.readFile(path.join(out, 'training_log.jsonl'), 'utf8')).trim().split('\n');
  assert.equal(logLines.length, 1);
});

test('gradient accumulation over 2 micro-batches of 2 equals one batch of 4', async () => {
  const init = path.join(root.dir, 'init-acc');
  await randomAdapter(init, 8);
  const common = { model, data, initAdapter: init, steps: 1, lr: 0.05, optimizer: 'sgd' as const, schedule: 'constant' as const, maxGradNorm: 0, loraDropout: 0, seed: 3 };
  const one = path.join(root.dir, 'acc-1x4');
  const two = path.join(root.dir, 'acc-2x2');
  const r1 = await finetune({ ...common, out: one, batchSize: 4, gradAccum: 1 });
  const r2 = await finetune({ ...common, out: two, batchSize: 2, gradAccum: 2 });
  const manifest = await readManifest(model);
  const initA = await loadAdapter(init, { cfg, fingerprint: manifest.fingerprint });
  const a = await loadAdapter(one, { cfg, fingerprint: manifest.fingerprint });
  const b = await loadAdapter(two, { cfg, fingerprint: manifest.fingerprint });
  let worst = 0;
  for (const [key, ma] of a.modules) {
    const mb = b.modules.get(key)!;
    const m0 = initA.modules.get(key)!;
    for (const w of ['a', 'b'] as const) {
      let upd = 0;
      for (let i = 0; i < ma[w].length; i++) upd = Math.max(upd, Math.abs(ma[w][i]! - m0[w][i]!));
      worst = Math.max(worst, maxRel(ma[w], mb[w], upd));
    }
  }
  console.log(`grad accumulation: loss ${r1.finalLoss} vs ${r2.finalLoss}, max |Δadapter| / max |update| = ${worst.toExponential(2)}`);
  assert.ok(Math.abs(r1.finalLoss - r2.finalLoss) < 1e-5 * r1.finalLoss);
  assert.ok(worst < TOL_ACCUM, `accumulated update differs by ${worst}`);
});

test('--resume after an interrupted run reaches the same adapter as an uninterrupted run', async () => {
  const common = { model, data, steps: 6, lr: 1e-2, batchSize: 2, gradAccum: 1, loraDropout: 0.1, saveEvery: 2, seed: 9, targets: ['q_proj', 'v_proj', 'down_proj'] as Proj[], warmup: 2, schedule: 'cosine' as const };
  const full = path.join(root.dir, 'full');
  const cut = path.join(root.dir, 'cut');
  const rFull = await finetune({ ...common, out: full });
  const rCut = await finetune({ ...common, out: cut, stopAfterStep: 3 });
  assert.equal(rCut.interrupted, true);
  assert.equal(await fs.stat(cut).then(() => true, () => false), false, 'an interrupted run writes no adapter');
  assert.ok(await fs.stat(checkpointDir(cut)).then(() => true, () => false), 'checkpoint written');
  const rRes = await finetune({ ...common, out: cut, resume: true });
  assert.equal(rRes.resumedFrom, 2, 'resumes from the step-2 checkpoint');
  assert.equal(await fs.stat(checkpointDir(cut)).then(() => true, () => false), false, 'checkpoint removed after success');
  const manifest = await readManifest(model);
  const a = await loadAdapter(full, { cfg, fingerprint: manifest.fingerprint });
  const b = await loadAdapter(cut, { cfg, fingerprint: manifest.fingerprint });
  let maxDiff = 0;
  for (const [key, ma] of a.modules) {
    const mb = b.modules.get(key)!;
    for (const w of ['a', 'b'] as const) for (let i = 0; i < ma[w].length; i++) maxDiff = Math.max(maxDiff, Math.abs(ma[w][i]! - mb[w][i]!));
  }
  console.log(`resume: max |Δadapter| ${maxDiff}, losses ${JSON.stringify(rFull.losses)} vs ${JSON.stringify(rRes.losses)}`);
  assert.equal(maxDiff, 0, 'resumed adapter must equal the uninterrupted one exactly');
  assert.deepEqual(rRes.losses, rFull.losses);
  const log = (await fs.readFile(path.join(cut, 'training_log.jsonl'), 'utf8')).trim().split('\n');
  assert.equal(log.length, 6);
});

test('AdamW matches PyTorch formulas; schedules; clipping; PEFT init bound', () => {
  // One AdamW step by hand (PyTorch: p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps), decoupled wd).
  const p = Float32Array.of(0.5, -0.25);
  const g = Float32Array.of(0.1, -0.3);
  const st = { m: new Float32Array(2), v: new Float32Array(2) };
  optimizerUpdate({ kind: 'adamw', lr: 0.01, weightDecay: 0.1 }, p, g, st, 0.01, 1);
  const expect = [0.5, -0.25].map((x, i) => {
    const gi = [0.1, -0.3][i]!;
    const m = 0.1 * gi;
    const v = 0.001 * gi * gi;
    return x * (1 - 0.01 * 0.1) - (0.01 / 0.1) * m / (Math.sqrt(v) / Math.sqrt(0.001) + 1e-8);
  });
  assert.ok(Math.abs(p[0]! - expect[0]!) < 1e-7 && Math.abs(p[1]! - expect[1]!) < 1e-7, `adamw ${p} vs ${expect}`);
  // Hugging Face schedules.
  assert.equal(learningRate('linear', 1, 0, 10, 2), 0);
  assert.equal(learningRate('linear', 1, 1, 10, 2), 0.5);
  assert.equal(learningRate('linear', 1, 2, 10, 2), 1);
  assert.equal(learningRate('linear', 1, 6, 10, 2), 0.5);
  assert.ok(Math.abs(learningRate('cosine', 1, 6, 10, 2) - 0.5) < 1e-12);
  assert.equal(learningRate('constant', 3, 9, 10, 0), 3);
  // Clipping.
  const gs = [Float32Array.of(3), Float32Array.of(4)];
  assert.ok(Math.abs(clipByGlobalNorm(gs, 1) - 5) < 1e-12);
  assert.ok(Math.abs(Math.hypot(gs[0]![0]!, gs[1]![0]!) - 1) < 1e-5);
  // kaiming_uniform(a=√5): U(−1/√K, 1/√K); B zeros.
  const { a, b } = initLora(new Rng(1), 8, 256, 64);
  const bound = 1 / Math.sqrt(256);
  assert.ok(a.every((x) => Math.abs(x) <= bound) && Math.max(...a.map(Math.abs)) > 0.9 * bound);
  assert.ok(b.every((x) => x === 0));
  void LINEAR_PROJS;
});
