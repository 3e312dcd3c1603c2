// Host-side optimization of the LoRA tensors: AdamW (PyTorch semantics, bias correction, decoupled
// weight decay) and SGD, learning-rate schedules (Hugging Face's linear warmup + cosine / linear
// decay / constant), clipping by global norm (torch.nn.utils.clip_grad_norm_), and PEFT's init.
import { Rng } from '../util/rng.js';

export type OptimizerKind = 'adamw' | 'sgd';
export type ScheduleKind = 'cosine' | 'linear' | 'constant';

export interface OptimizerConfig {
  readonly kind: OptimizerKind;
  /** Peak learning rate. */
  readonly lr: number;
  /** AdamW betas, default [0.9, 0.999]. */
  readonly betas?: readonly [number, number];
  /** AdamW epsilon, default 1e-8. */
  readonly eps?: number;
  /** Weight decay, default 0 (AdamW: decoupled; SGD: added to the gradient, as torch does). */
  readonly weightDecay?: number;
}

/** Per-tensor optimizer state (AdamW first/second moments; empty for SGD). */
export interface TensorState {
  m: Float32Array;
  v: Float32Array;
}

/**
 * Updates `param` in place with gradient `grad` at learning rate `lr`. `t` is the 1-based step
 * count (AdamW bias correction).
 */
export function optimizerUpdate(cfg: OptimizerConfig, param: Float32Array, grad: Float32Array, state: TensorState | null, lr: number, t: number): void {
  const wd = cfg.weightDecay ?? 0;
  if (cfg.kind === 'sgd') {
    for (let i = 0; i < param.length; i++) param[i] = param[i]! - lr * (grad[i]! + wd * param[i]!);
    return;
  }
  if (!state) throw new Error('AdamW needs optimizer state');
  const [b1, b2] = cfg.betas ?? [0.9, 0.999];
  const eps = cfg.eps ?? 1e-8;
  const bc1 = 1 - b1 ** t;
  const bc2 = 1 - b2 ** t;
  const stepSize = lr / bc1;
  const bc2Sqrt = Math.sqrt(bc2);
  const { m, v } = state;
  for (let i = 0; i < param.length; i++) {
    let p = param[i]!;
    if (wd !== 0) p *= 1 - lr * wd;
    const g = grad[i]!;
    m[i] = b1 * m[i]! + (1 - b1) * g;
    v[i] = b2 * v[i]! + (1 - b2) * g * g;
    p -= (stepSize * m[i]!) / (Math.sqrt(v[i]!) / bc2Sqrt + eps);
    param[i] = p;
  }
}

/** Learning rate at optimizer step `step` (0-based) of `total`, after `warmup` warmup steps (HF semantics). */
export function learningRate(kind: ScheduleKind, peak: number, step: number, total: number, warmup: number): number {
  if (step < warmup) return (peak * step) / Math.max(1, warmup);
  if (kind === 'constant') return peak;
  const progress = (step - warmup) / Math.max(1, total - warmup);
  if (kind === 'linear') return peak * Math.max(0, (total - step) / Math.max(1, total - warmup));
  return peak * Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
}

/** Global L2 norm over all gradient tensors (float64 accumulation). */
export function globalNorm(grads: Iterable<Float32Array>): number {
  let s = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) s += g[i]! * g[i]!;
  return Math.sqrt(s);
}

/** Scales gradients in place so their global norm is at most maxNorm (0 disables). Returns the norm before. */
export function clipByGlobalNorm(grads: Float32Array[], maxNorm: number): number {
  const norm = globalNorm(grads);
  if (maxNorm > 0) {
    const coef = maxNorm / (norm + 1e-6);
    if (coef < 1) for (const g of grads) for (let i = 0; i < g.length; i++) g[i] = g[i]! * coef;
  }
  return norm;
}

/**
 * PEFT's default LoRA init: A ~ kaiming_uniform(a=√5) = U(−1/√K, 1/√K) for A [R, K] (gain √(2/(1+a²)),
 * bound gain·√(3/fan_in)), B = 0.
 */
export function initLora(rng: Rng, r: number, K: number, N: number): { a: Float32Array; b: Float32Array } {
  const gain = Math.sqrt(2 / (1 + 5));
  const bound = gain * Math.sqrt(3 / K);
  const a = new Float32Array(r * K);
  for (let i = 0; i < a.length; i++) a[i] = rng.uniform(-bound, bound);
  return { a, b: new Float32Array(N * r) };
}
