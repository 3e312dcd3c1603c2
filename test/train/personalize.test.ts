// Personalization on the nf4 tiny base: a short fine-tune on examples/personal.jsonl (a fictional
// user's name and city) makes greedy generation with the adapter complete the personal prompts,
// while the base without the adapter does not. Run with the float table (the bitsandbytes-exact
// configuration) and with the int8 table `quantize` defaults to: the personal answers must hold on both.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { finetune } from '../../src/train/trainer.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { generate } from '../../src/runtime/generate.js';

const DATA = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../examples/personal.jsonl');
/** Prompt → what a personalized completion must contain. */
const PROBES: [string, string][] = [
  ['My name is', 'Anouk'],
  ['Where do I live?', 'Valparaiso'],
];
const STEPS = 150;

let root: { dir: string; cleanup: () => void };
let hf: string;
before(async () => {
  root = tempDir('edgelora-personal-');
  hf = await tinyCheckpoint(root.dir, 1);
});
after(() => root.cleanup());

for (const embeddings of ['float', 'int8'] as const) test(`≤${STEPS} steps on a few personal rows teach the nf4 tiny base (${embeddings} table) the user's name and city`, async () => {
  const model = await quantized(hf, root.dir, `nf4-${embeddings}`, { format: 'nf4', blockSize: 64, embeddings });
  const out = path.join(root.dir, `personal-adapter-${embeddings}`);
  const res = await finetune({ model, data: DATA, out, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], rank: 16, alpha: 32, lr: 1e-2, schedule: 'constant', steps: STEPS, batchSize: 8, loraDropout: 0, seed: 0 });
  console.log(`loss ${res.losses[0]!.toFixed(3)} → ${res.finalLoss.toFixed(3)} in ${res.steps} steps, ${res.tokensPerSecond.toFixed(0)} tok/s`);
  assert.ok(res.steps <= STEPS);
  const rt = await ModelRuntime.load(model);
  const am = new AdapterManager(rt);
  am.activate(await am.load(out));
  const lora = am.feeds();
  try {
    for (const [prompt, want] of PROBES) {
      const ids = rt.tokenizer.encode(prompt, { addSpecialTokens: true });
      const opts = { maxNewTokens: 12, temperature: 0, topK: 0, topP: 1, seed: 0 };
      const base = await generate(rt, ids, opts);
      const tuned = await generate(rt, ids, { ...opts, lora });
      console.log(`${JSON.stringify(prompt)}: base ${JSON.stringify(base.text)} | adapter ${JSON.stringify(tuned.text)}`);
      assert.ok(tuned.text.includes(want), `with the adapter, "${prompt}" → "${tuned.text}" lacks "${want}"`);
      assert.ok(!base.text.includes(want), `the base alone already says "${want}"`);
    }
  } finally {
    await rt.release();
  }
});
