// The fine-tune plan (src/train/plan.ts): every numeric option is checked by one rule, the same one the
// CLI parses its flag with, and an out-of-range value is refused naming the flag, before any file is
// read; an adapter continued with a lora_dropout training cannot use is refused naming its config.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { parseFinetuneOptions, FINETUNE_NUMBERS, type FinetuneNumber } from '../../src/train/plan.js';
import { finetune } from '../../src/train/trainer.js';
import { numberFlag } from '../../src/cli/command.js';
import { EdgeloraError } from '../../src/util/errors.js';
import { loadAdapter } from '../../src/adapters/peft.js';
import { randomAdapter } from '../helpers/adapters.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { readManifest } from '../../src/model/manifest.js';

// Written out here, not derived from FINETUNE_NUMBERS: the ranges the README and --help promise.
const CASES: Record<FinetuneNumber, { bad: number[]; good: number[] }> = {
  rank: { bad: [0, 1.5, -1], good: [1, 64] },
  alpha: { bad: [0, -2], good: [0.5, 16] },
  steps: { bad: [0, 2.5], good: [1] },
  epochs: { bad: [0, -1], good: [0.5, 3] },
  lr: { bad: [0, -1e-4, Number.NaN], good: [2e-4] },
  weightDecay: { bad: [-0.01], good: [0, 0.1] },
  batchSize: { bad: [0, 1.5], good: [1] },
  gradAccum: { bad: [0, 2.5], good: [1, 8] },
  seqLen: { bad: [1, 16.5], good: [2, 512] },
  maxGradNorm: { bad: [-1, Number.POSITIVE_INFINITY], good: [0, 1] },
  loraDropout: { bad: [1, -0.1, 1.5], good: [0, 0.999] },
  warmup: { bad: [-1, 0.5], good: [0, 10] },
  saveEvery: { bad: [-1, 1.5], good: [0, 10] },
  saveEverySeconds: { bad: [-1], good: [0, 0.5, 300] },
  seed: { bad: [-1, 0.5], good: [0, 7] },
  memoryBudget: { bad: [0, -1], good: [1, 4e9] },
};

const base = { model: '/nonexistent/model', data: '/nonexistent/data.jsonl', out: '/nonexistent/out' };

test('each numeric option: out of range refused naming its flag, in range accepted; the CLI flag agrees', () => {
  for (const [option, { bad, good }] of Object.entries(CASES) as [FinetuneNumber, { bad: number[]; good: number[] }][]) {
    const { flag, check } = FINETUNE_NUMBERS[option];
    for (const v of bad) {
      assert.throws(() => parseFinetuneOptions({ ...base, [option]: v }), (err: unknown) => err instanceof EdgeloraError && err.where === `--${flag}`, `${option} = ${v} was accepted`);
      if (Number.isFinite(v)) assert.throws(() => numberFlag(flag, String(v), 0, check), EdgeloraError, `--${flag} ${v} was accepted by the CLI`);
    }
    for (const v of good) {
      assert.doesNotThrow(() => parseFinetuneOptions({ ...base, [option]: v }), `${option} = ${v} was refused`);
      assert.equal(numberFlag(flag, String(v), 0, check), v, `--${flag} ${v}`);
    }
  }
});

test('defaults are filled in, and an explicit budget wins over the profile', () => {
  const p = parseFinetuneOptions({ ...base, profile: { id: 'x', memoryBudgetBytes: 5e9 } });
  assert.deepEqual(p.lora, { kind: 'new', rank: 8, alpha: 16, targets: ['q_proj', 'v_proj'] });
  assert.deepEqual([p.lr, p.batchSize, p.gradAccum, p.maxGradNorm, p.seed, p.optimizer, p.schedule, p.dtype], [2e-4, 4, 1, 1, 0, 'adamw', 'linear', 'F32']);
  assert.deepEqual(p.length, { epochs: 1 });
  assert.deepEqual(p.budget, { bytes: 5e9, source: 'x' });
  const q = parseFinetuneOptions({ ...base, memoryBudget: 1e9, profile: { id: 'x', memoryBudgetBytes: 5e9 } });
  assert.deepEqual(q.budget, { bytes: 1e9, source: { flag: 'memory-budget' } });
  assert.throws(() => parseFinetuneOptions({ ...base, steps: 2, epochs: 1 }), /--steps or --epochs/);
  assert.throws(() => parseFinetuneOptions({ ...base, targets: [] }), (e: unknown) => e instanceof EdgeloraError && e.where === '--targets');
  const c = parseFinetuneOptions({ ...base, initAdapter: '/a', rank: 4, targets: ['q_proj'] });
  assert.deepEqual(c.lora, { kind: 'continue', dir: '/a', ignored: ['rank', 'targets'] });
});

let root: { dir: string; cleanup: () => void };
let model: string;
before(async () => {
  root = tempDir('edgelora-ftplan-');
  model = await quantized(await tinyCheckpoint(root.dir, 4), root.dir, 'nf4', { format: 'nf4', blockSize: 64 });
});
after(() => root.cleanup());

test('an adapter continued with lora_dropout 1 is refused naming its config; --lora-dropout overrides it', async () => {
  const manifest = await readManifest(model);
  const dir = path.join(root.dir, 'drop1');
  await randomAdapter(dir, parseHfConfig(manifest.sourceConfig, model), { r: 2, alpha: 4, targets: ['q_proj'], dropout: 1, seed: 1, fingerprint: manifest.fingerprint });
  const data = path.join(root.dir, 'd.jsonl');
  await fs.writeFile(data, '{"text": "Hello! How are you today?"}\n');
  await assert.rejects(finetune({ model, data, out: path.join(root.dir, 'o1'), initAdapter: dir, steps: 1 }), (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, String(err));
    assert.match(err.describe(), /adapter_config\.json[\s\S]*lora_dropout 1[\s\S]*--lora-dropout/);
    return true;
  });
  const res = await finetune({ model, data, out: path.join(root.dir, 'o2'), initAdapter: dir, steps: 1, loraDropout: 0.1, batchSize: 1, seqLen: 16 });
  assert.ok(Number.isFinite(res.finalLoss), `final loss ${res.finalLoss}`);
});

test('rsLoRA: continuing an adapter keeps use_rslora, lora_alpha and the alpha/√r scale', async () => {
  const manifest = await readManifest(model);
  const cfg = parseHfConfig(manifest.sourceConfig, model);
  const r = 4;
  const alpha = 6;
  const dir = path.join(root.dir, 'rslora');
  await randomAdapter(dir, cfg, { r, alpha, targets: ['v_proj'], rslora: true, seed: 2, fingerprint: manifest.fingerprint });
  const data = path.join(root.dir, 'd2.jsonl');
  await fs.writeFile(data, '{"text": "Hello! How are you today?"}\n');
  const out = path.join(root.dir, 'rs-out');
  await finetune({ model, data, out, initAdapter: dir, steps: 1, batchSize: 1, seqLen: 16 });
  const ad = await loadAdapter(out, { cfg, fingerprint: manifest.fingerprint });
  assert.equal(ad.config.use_rslora, true);
  assert.equal(ad.config.lora_alpha, alpha, 'lora_alpha written back');
  for (const m of ad.modules.values()) {
    assert.equal(m.alpha, alpha, `${m.layer}.${m.proj}: alpha`);
    assert.ok(Math.abs(m.scale - alpha / Math.sqrt(r)) < 1e-12, `${m.layer}.${m.proj}: scale ${m.scale}, want alpha/√r = ${alpha / Math.sqrt(r)}`);
  }
});
