// Llama 3 rope scaling in GGUF: convert_hf_to_gguf.py does not write the rope_scaling parameters but a
// rope_freqs tensor [D/2] of per-frequency divisors (1 for high frequencies, `factor` for low ones, a
// smooth blend between). Export computes it from config.json's rope_scaling; import recovers the
// parameters from it and checks that they reproduce every factor.
import { EdgeloraError } from '../../util/errors.js';
import type { RopeScaling } from '../hf-config.js';

function baseFrequencies(theta: number, D: number): number[] {
  return Array.from({ length: D / 2 }, (_, i) => 1 / Math.pow(theta, (2 * i) / D));
}

/** rope_freqs as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes it. */
export function llama3RopeFactors(s: RopeScaling, theta: number, D: number): Float32Array {
  const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
  const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
  return Float32Array.from(baseFrequencies(theta, D), (freq) => {
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highWavelen) return 1;
    if (wavelen > lowWavelen) return s.factor;
    const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return 1 / ((1 - smooth) / s.factor + smooth);
  });
}

/**
 * The llama3 parameters behind a rope_freqs tensor. The blend is linear in 1/wavelen, so two blended
 * frequencies fix it; with fewer, Meta's values (low 1, high 4) are tried. original_max_position_embeddings
 * comes from the metadata when present (8192, Llama 3's, otherwise): only the blend's slope and offset
 * matter, and any original length with the fitted low/high gives the same frequencies.
 */
export function llama3FromRopeFactors(factors: Float32Array, theta: number, D: number, originalContext: number | undefined, where: string): RopeScaling {
  if (factors.length !== D / 2) throw new EdgeloraError(`rope_freqs.weight has ${factors.length} values, head_dim/2 is ${D / 2}`, { where });
  const factor = Math.max(...factors);
  const old = originalContext ?? 8192;
  const freqs = baseFrequencies(theta, D);
  const blended: { x: number; smooth: number }[] = [];
  factors.forEach((f, i) => {
    if (f > 1 + 1e-6 && f < factor * (1 - 1e-6)) blended.push({ x: freqs[i]! / (2 * Math.PI), smooth: (1 / f - 1 / factor) / (1 - 1 / factor) });
  });
  const candidates: RopeScaling[] = [{ factor, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: old }];
  if (blended.length >= 2) {
    const p = blended[0]!, q = blended[blended.length - 1]!;
    const a = (q.smooth - p.smooth) / (q.x - p.x); // smooth = a·(1/wavelen) + b = old/(high−low)·(1/wavelen) − low/(high−low)
    const b = p.smooth - a * p.x;
    const span = old / a;
    candidates.unshift({ factor, lowFreqFactor: -b * span, highFreqFactor: -b * span + span, originalMaxPositionEmbeddings: old });
  }
  for (const c of candidates) {
    if (!(c.lowFreqFactor > 0 && c.highFreqFactor > c.lowFreqFactor)) continue;
    const again = llama3RopeFactors(c, theta, D);
    if (again.every((f, i) => Math.abs(f - factors[i]!) <= 1e-5 * factors[i]!)) return c;
  }
  throw new EdgeloraError('rope_freqs.weight does not follow Llama 3 rope scaling', {
    where: `${where} (tensor rope_freqs.weight)`,
    hint: 'only llama3-style rope scaling is imported',
  });
}
