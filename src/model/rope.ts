// Rotary position embedding tables (rotate-half convention, Hugging Face Llama), with llama3
// frequency scaling. Computed on the host and fed to the graph, so the runtime, the trainer and the
// reference forward share one implementation of the frequencies.
import type { ModelConfig } from '../formats/hf-config.js';

/** Inverse frequencies [D/2], float32 as Hugging Face computes them (llama3 scaling applied). */
export function inverseFrequencies(cfg: ModelConfig): Float32Array {
  const dim = cfg.headDim;
  const half = dim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = Math.fround(1 / Math.pow(cfg.ropeTheta, (2 * i) / dim));
  const s = cfg.ropeScaling;
  if (!s) return inv;
  // transformers' _compute_llama3_parameters.
  const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
  const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
  for (let i = 0; i < half; i++) {
    const f = inv[i]!;
    const wavelen = (2 * Math.PI) / f;
    let out = wavelen > lowWavelen ? f / s.factor : f;
    if (!(wavelen < highWavelen) && !(wavelen > lowWavelen)) {
      const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
      out = (1 - smooth) * (out / s.factor) + smooth * out;
    }
    inv[i] = Math.fround(out);
  }
  return inv;
}

/**
 * cos and sin tables for the given positions: each [positions.length, D], the D/2 frequencies
 * repeated twice (cat(freqs, freqs)) as rotate-half expects.
 */
export function ropeTables(inv: Float32Array, positions: ArrayLike<number>): { cos: Float32Array; sin: Float32Array } {
  const half = inv.length;
  const dim = half * 2;
  const cos = new Float32Array(positions.length * dim);
  const sin = new Float32Array(positions.length * dim);
  for (let t = 0; t < positions.length; t++) {
    const p = positions[t]!;
    for (let i = 0; i < half; i++) {
      const a = Math.fround(p * inv[i]!);
      const c = Math.cos(a);
      const s = Math.sin(a);
      cos[t * dim + i] = c;
      cos[t * dim + i + half] = c;
      sin[t * dim + i] = s;
      sin[t * dim + i + half] = s;
    }
  }
  return { cos, sin };
}
