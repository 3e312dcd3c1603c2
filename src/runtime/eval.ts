// Scoring: mean token negative log-likelihood with the Hugging Face causal-LM convention (labels
// shifted by one inside, positions labelled -100 ignored, mean over all label tokens of the set).
import type { Example } from '../data/jsonl.js';
import type { ModelRuntime, LoraFeeds } from './model.js';

export interface EvalResult {
  readonly loss: number; // mean NLL in nats
  readonly perplexity: number;
  readonly tokens: number; // label tokens scored
  readonly rows: number;
  readonly seconds: number;
}

/** Sum of −log p(label) over one row's shifted labels, from its logits [T, V]. */
export function rowNll(logits: Float32Array, V: number, labels: readonly number[], T: number): { nll: number; count: number } {
  let nll = 0;
  let count = 0;
  for (let t = 0; t + 1 < T; t++) {
    const y = labels[t + 1]!;
    if (y === -100) continue;
    const row = logits.subarray(t * V, (t + 1) * V);
    let max = -Infinity;
    for (let i = 0; i < V; i++) if (row[i]! > max) max = row[i]!;
    let sum = 0;
    for (let i = 0; i < V; i++) sum += Math.exp(row[i]! - max);
    nll += Math.log(sum) + max - row[y]!;
    count++;
  }
  return { nll, count };
}

export async function evaluate(
  model: ModelRuntime,
  examples: readonly Example[],
  opts: { batchSize: number; lora?: LoraFeeds; onBatch?: (done: number, total: number) => void },
): Promise<EvalResult> {
  const t0 = performance.now();
  const pad = model.tokenizer.padTokenId;
  let nll = 0;
  let tokens = 0;
  for (let i = 0; i < examples.length; i += opts.batchSize) {
    const batch = examples.slice(i, i + opts.batchSize);
    const T = Math.max(...batch.map((e) => e.inputIds.length));
    const ids = batch.map((e) => [...e.inputIds, ...new Array<number>(T - e.inputIds.length).fill(pad)]);
    const mask = batch.map((e) => {
      const m = new Uint8Array(T);
      m.fill(1, 0, e.inputIds.length);
      return m;
    });
    const res = await model.forward({ ids, mask, cache: null, ...(opts.lora ? { lora: opts.lora } : {}) });
    const V = res.dims[2];
    batch.forEach((e, b) => {
      const r = rowNll(res.logits.subarray(b * T * V, (b + 1) * T * V), V, e.labels, e.inputIds.length);
      nll += r.nll;
      tokens += r.count;
    });
    opts.onBatch?.(Math.min(i + opts.batchSize, examples.length), examples.length);
  }
  const loss = tokens > 0 ? nll / tokens : NaN;
  return { loss, perplexity: Math.exp(loss), tokens, rows: examples.length, seconds: (performance.now() - t0) / 1000 };
}
