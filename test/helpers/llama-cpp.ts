// llama.cpp through node-llama-cpp (its prebuilt CPU binary; nothing is downloaded or built) as the
// independent reference: per-position next-token log-probabilities, greedy decoding, tokenization.
import { getLlama, type Llama, type LlamaModel } from 'node-llama-cpp';

let llamaP: Promise<Llama> | null = null;
function llama(): Promise<Llama> {
  llamaP ??= getLlama({ gpu: false, build: 'never', usePrebuiltBinaries: true, skipDownload: true, progressLogs: false, logLevel: 'error' as never });
  return llamaP;
}

export async function withModel<T>(file: string, fn: (m: LlamaModel) => Promise<T>): Promise<T> {
  const model = await (await llama()).loadModel({ modelPath: file });
  try {
    return await fn(model);
  } finally {
    await model.dispose();
  }
}

/** The context every reference run uses: one thread, float32 KV cache (llama.cpp defaults to f16). */
async function context(model: LlamaModel, lora?: string) {
  return model.createContext({
    contextSize: 256,
    threads: 1,
    flashAttention: false,
    experimentalKvCacheKeyType: 'F32',
    experimentalKvCacheValueType: 'F32',
    ...(lora ? { lora: { adapters: [{ filePath: lora, scale: 1 }] } } : {}),
  });
}

/** log p(next token) at every position of `ids`, over the whole vocabulary (temperature 1, no top-k/p). */
export async function llamaLogProbs(file: string, ids: number[], vocab: number, lora?: string): Promise<Float64Array[]> {
  return withModel(file, async (model) => {
    const ctx = await context(model, lora);
    try {
      const out = await ctx.getSequence().controlledEvaluate(
        ids.map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } }] as const) as never,
      );
      return ids.map((_, i) => {
        const probs = out[i]?.next.probabilities;
        if (!probs) throw new Error(`llama.cpp gave no probabilities at position ${i}`);
        const lp = new Float64Array(vocab).fill(Number.NaN);
        // float32 probabilities lose precision as subnormals (< 1.2e-38): compare only well above that.
        for (const [tok, p] of probs) lp[tok] = p >= 1e-30 ? Math.log(p) : Number.NaN;
        return lp;
      });
    } finally {
      await ctx.dispose();
    }
  });
}

/** Greedy continuation of `prompt` for n tokens (EOS does not stop it). */
export async function llamaGreedy(file: string, prompt: number[], n: number): Promise<number[]> {
  return withModel(file, async (model) => {
    const ctx = await context(model);
    try {
      const got: number[] = [];
      for await (const t of ctx.getSequence().evaluate(prompt as never, { temperature: 0, yieldEogToken: true })) {
        got.push(t as number);
        if (got.length >= n) break;
      }
      return got;
    } finally {
      await ctx.dispose();
    }
  });
}

export async function llamaTokenize(file: string, text: string): Promise<number[]> {
  return withModel(file, async (model) => [...model.tokenize(text, false)].map(Number));
}

/**
 * Our logits [T, V] against llama.cpp's log-probabilities: both as log-softmax, compared where
 * llama.cpp's probability is ≥ 1e-30 (a normal float32). rel = max |Δ| / the largest |centered log-prob| of ours.
 */
export function compareLogProbs(ours: Float32Array, V: number, ref: Float64Array[]): { maxAbs: number; scale: number; rel: number; compared: number } {
  let maxAbs = 0;
  let scale = 0;
  let compared = 0;
  ref.forEach((lp, t) => {
    const row = ours.subarray(t * V, (t + 1) * V);
    let mx = -Infinity;
    for (const v of row) mx = Math.max(mx, v);
    let s = 0;
    for (const v of row) s += Math.exp(v - mx);
    const lse = mx + Math.log(s);
    let mean = 0;
    for (const v of row) mean += v / V;
    for (let v = 0; v < V; v++) {
      scale = Math.max(scale, Math.abs(row[v]! - mean));
      const r = lp[v];
      if (r === undefined || Number.isNaN(r)) continue;
      maxAbs = Math.max(maxAbs, Math.abs(row[v]! - lse - r));
      compared++;
    }
  });
  return { maxAbs, scale, rel: maxAbs / scale, compared };
}
