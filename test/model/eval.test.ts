// `eval`'s loss against an independent computation: the reference forward's logits, log-softmax in
// float64, Hugging Face's shift and -100 convention, mean over all label tokens of the file.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { tempDir, tinyCheckpoint, quantized, dequantizedWeights } from '../helpers/fixtures.js';
import { referenceForward } from '../helpers/reference.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { evaluate } from '../../src/runtime/eval.js';
import { loadJsonl } from '../../src/data/jsonl.js';

/** Loss agreement between the ORT graph and the float64 reference. */
const TOL = 1e-4;
const tmp = tempDir();
let dir = '';

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  dir = await quantized(hf, tmp.dir, 'nf4', { format: 'nf4' });
});
after(() => tmp.cleanup());

test('eval loss equals the reference NLL (prompt/completion and text rows, batched with padding)', async () => {
  const data = path.join(tmp.dir, 'data.jsonl');
  await fs.writeFile(
    data,
    [
      JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' }),
      JSON.stringify({ text: 'Edge devices run small models.' }),
      JSON.stringify({ prompt: 'Hi', completion: ' there, friend' }),
    ].join('\n') + '\n',
  );
  const rt = await ModelRuntime.load(dir);
  try {
    const examples = await loadJsonl(data, rt.tokenizer, {});
    const res = await evaluate(rt, examples, { batchSize: 2 });
    const { cfg, W } = await dequantizedWeights(dir);
    let nll = 0;
    let count = 0;
    for (const e of examples) {
      const logits = referenceForward(cfg, W, e.inputIds);
      const V = cfg.vocabSize;
      for (let t = 0; t + 1 < e.inputIds.length; t++) {
        const y = e.labels[t + 1]!;
        if (y === -100) continue;
        let max = -Infinity;
        for (let v = 0; v < V; v++) max = Math.max(max, logits[t * V + v]!);
        let s = 0;
        for (let v = 0; v < V; v++) s += Math.exp(logits[t * V + v]! - max);
        nll += Math.log(s) + max - logits[t * V + y]!;
        count++;
      }
    }
    assert.equal(res.tokens, count);
    const ref = nll / count;
    assert.ok(Math.abs(res.loss - ref) / ref < TOL, `loss ${res.loss} vs reference ${ref}`);
    assert.ok(Math.abs(res.perplexity - Math.exp(ref)) / Math.exp(ref) < 10 * TOL);
  } finally {
    await rt.release();
  }
});
