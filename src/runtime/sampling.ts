// Token sampling from one row of logits: greedy at temperature 0, otherwise temperature, top-k and
// top-p (nucleus) filtering, then a draw from a seeded RNG.
import type { Rng } from '../util/rng.js';
import { EdgeloraError } from '../util/errors.js';

export interface SamplingOptions {
  /** 0 = greedy (default 0). */
  readonly temperature: number;
  /** Keep the k most likely tokens; 0 = no limit (default 0). */
  readonly topK: number;
  /** Keep the smallest set whose probability reaches p; 1 = no limit (default 1). */
  readonly topP: number;
}

export function checkSampling(o: SamplingOptions): void {
  if (!(o.temperature >= 0)) throw new EdgeloraError(`must be ≥ 0, not ${o.temperature}`, { where: '--temperature' });
  if (!(o.topK >= 0) || !Number.isInteger(o.topK)) throw new EdgeloraError(`must be an integer ≥ 0, not ${o.topK}`, { where: '--top-k' });
  if (!(o.topP > 0 && o.topP <= 1)) throw new EdgeloraError(`must be in (0, 1], not ${o.topP}`, { where: '--top-p' });
}

/** Index of the largest value (first on ties). */
export function argmax(row: Float32Array): number {
  let best = 0;
  let bv = -Infinity;
  for (let i = 0; i < row.length; i++) {
    const v = row[i]!;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

export function sampleToken(row: Float32Array, o: SamplingOptions, rng: Rng): number {
  if (o.temperature === 0) return argmax(row);
  let idx = Array.from(row.keys());
  idx.sort((a, b) => row[b]! - row[a]!);
  if (o.topK > 0) idx = idx.slice(0, o.topK);
  const max = row[idx[0]!]!;
  let probs = idx.map((i) => Math.exp((row[i]! - max) / o.temperature));
  let sum = probs.reduce((a, b) => a + b, 0);
  if (o.topP < 1) {
    let acc = 0;
    let keep = 0;
    while (keep < probs.length) {
      acc += probs[keep]! / sum;
      keep++;
      if (acc >= o.topP) break;
    }
    idx = idx.slice(0, keep);
    probs = probs.slice(0, keep);
    sum = probs.reduce((a, b) => a + b, 0);
  }
  let r = rng.next() * sum;
  for (let i = 0; i < probs.length; i++) {
    r -= probs[i]!;
    if (r <= 0) return idx[i]!;
  }
  return idx[idx.length - 1]!;
}
