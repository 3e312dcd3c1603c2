// One training step as one ORT session run: forward + loss + backward, returning the loss and the
// gradient of every LoRA tensor. Parameters are held on the host in PEFT layout (A [R, K], B [N, R])
// and fed as aT = Aᵀ [K, R], bT = s·Bᵀ [R, N] (the adapter scale s folded into the feed), so the
// gradients come back as dA = (d aT)ᵀ and dB = s·(d bT)ᵀ.
//
// Dimension letters: B batch, T tokens, D head dim, K in, N out, R rank.
import ort from 'onnxruntime-node';
import type { ModelConfig } from '../formats/hf-config.js';
import type { Manifest } from '../model/manifest.js';
import { INPUT, MASKED, siteKey, type LoraSite } from '../model/llama.js';
import { inverseFrequencies, ropeTables } from '../model/rope.js';
import { EdgeloraError } from '../util/errors.js';
import { createSession } from '../runtime/sessions.js';
import { buildTrainGraph, TRAIN_INPUT, TRAIN_OUTPUT, IGNORE, type LoraTarget, type TrainGraphOptions } from './graph.js';

/** Trainable LoRA tensors of one projection, PEFT layout. */
export interface LoraParam extends LoraSite {
  readonly r: number;
  readonly K: number;
  readonly N: number;
  /** lora_alpha as configured (kept, not rebuilt from scale: under rsLoRA scale·r is not alpha). */
  readonly alpha: number;
  /** alpha / r (or alpha / √r): multiplies B·A. */
  readonly scale: number;
  a: Float32Array; // [R, K]
  b: Float32Array; // [N, R]
}

export interface LoraGrad {
  readonly a: Float32Array; // [R, K]
  readonly b: Float32Array; // [N, R]
}

/**
 * LoRA dropout of one micro-batch: the keep probability's scale 1 / (1 − p) and, per target, its mask as keep bits
 * uint8 [B, T, ⌈K/8⌉] (element k in bit k % 8 of byte k / 8: see dropoutBits).
 */
export interface DropoutMasks {
  readonly scale: number;
  bits(key: string, B: number, T: number, K: number): Uint8Array;
}

/**
 * Keep bits of a [B, T, K] dropout mask, one `next()` of the generator per element in row-major order (element dropped
 * when next() < p): the same draws as the float mask it replaces, 1/32 of its size.
 */
export function dropoutBits(next: () => number, p: number, B: number, T: number, K: number): Uint8Array {
  const Kb = Math.ceil(K / 8);
  const out = new Uint8Array(B * T * Kb);
  for (let row = 0; row < B * T; row++) {
    for (let k = 0; k < K; k++) if (next() >= p) out[row * Kb + (k >> 3)]! |= 1 << (k & 7);
  }
  return out;
}

/** Masks that keep everything (evaluation on a graph built with dropout). */
export const NO_DROPOUT: DropoutMasks = { scale: 1, bits: (_key, B, T, K) => new Uint8Array(B * T * Math.ceil(K / 8)).fill(255) };

/** One micro-batch: rows right-padded to a common length by the session. */
export interface MicroBatch {
  readonly inputIds: readonly (readonly number[])[];
  /** Unshifted labels aligned with inputIds (-100: no loss). */
  readonly labels: readonly (readonly number[])[];
}

export interface StepResult {
  /** Σ NLL of this micro-batch's label tokens × lossScale. */
  readonly loss: number;
  readonly grads: Map<string, LoraGrad>;
}

export interface TrainSessionOptions extends Omit<TrainGraphOptions, 'targets'> {
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
}

/** Label tokens that count in the loss (positions ≥ 1 whose label is not -100). */
export function countLabelTokens(labels: readonly (readonly number[])[]): number {
  let n = 0;
  for (const row of labels) for (let t = 1; t < row.length; t++) if (row[t] !== IGNORE) n++;
  return n;
}

export class TrainSession {
  private readonly inv: Float32Array;
  private constructor(
    readonly cfg: ModelConfig,
    readonly targets: readonly LoraTarget[],
    readonly dropout: boolean,
    private readonly session: ort.InferenceSession,
    private readonly constFeeds: Record<string, ort.Tensor>,
    readonly padTokenId: number,
    /** The B·T bound the chunked loss was built for (undefined: not chunked, any size). */
    readonly maxTokens: number | undefined,
  ) {
    this.inv = inverseFrequencies(cfg);
  }

  static async create(dir: string, manifest: Manifest, cfg: ModelConfig, targets: readonly LoraTarget[], opts: TrainSessionOptions & { padTokenId: number }): Promise<TrainSession> {
    const tg = await buildTrainGraph(dir, manifest, cfg, { ...opts, targets });
    // The graph is handed to ORT as bytes; its external initializers resolve in the quantized model's
    // directory (read in place, never copied). ORT refuses symlinked data files that leave the folder.
    const session = await createSession({ kind: 'train', model: tg.bytes, sessionOptions: opts.sessionOptions, externalDataDir: dir, format: manifest.quant.format, where: dir });
    const constFeeds: Record<string, ort.Tensor> = {};
    for (const [name, f] of tg.runtimeFeeds) constFeeds[name] = new ort.Tensor(f.dtype as 'float32', f.data as Float32Array, f.shape);
    return new TrainSession(cfg, targets, opts.dropout, session, constFeeds, opts.padTokenId, opts.maxTokens);
  }

  /**
   * Runs forward + backward on one micro-batch. `lossScale` = 1 / label tokens of the whole optimizer
   * step (so micro-batch losses and gradients add up to the step's mean). `dropout` gives each target's mask
   * when the graph was built with dropout.
   */
  async step(batch: MicroBatch, params: ReadonlyMap<string, LoraParam>, lossScale: number, dropout?: DropoutMasks): Promise<StepResult> {
    const B = batch.inputIds.length;
    if (B === 0) throw new EdgeloraError('empty micro-batch');
    const T = Math.max(...batch.inputIds.map((r) => r.length));
    if (this.maxTokens !== undefined && B * T > this.maxTokens) {
      throw new EdgeloraError(`micro-batch of ${B} × ${T} tokens exceeds the ${this.maxTokens} the training graph was built for`, { where: 'TrainSession.step', hint: 'build the session with maxTokens ≥ batch size × seq-len' });
    }
    const D = this.cfg.headDim;
    const ids = new BigInt64Array(B * T);
    const targets = new BigInt64Array(B * T).fill(BigInt(IGNORE));
    const bias = new Float32Array(B * T * T).fill(MASKED);
    const cos = new Float32Array(B * T * D);
    const sin = new Float32Array(B * T * D);
    const tab = ropeTables(this.inv, [...Array(T).keys()]);
    for (let b = 0; b < B; b++) {
      const row = batch.inputIds[b]!;
      const lab = batch.labels[b]!;
      const L = row.length;
      for (let t = 0; t < T; t++) ids[b * T + t] = BigInt(t < L ? row[t]! : this.padTokenId);
      // Position t predicts label t+1 (the shift happens here); padding predicts nothing.
      for (let t = 0; t + 1 < L; t++) targets[b * T + t] = BigInt(lab[t + 1]!);
      // Causal over real tokens; a padded query attends to itself only (finite, and never scored).
      for (let t = 0; t < T; t++) {
        const base = (b * T + t) * T;
        if (t < L) for (let s = 0; s <= t; s++) bias[base + s] = 0;
        else bias[base + t] = 0;
      }
      cos.set(tab.cos, b * T * D);
      sin.set(tab.sin, b * T * D);
    }
    const feeds: Record<string, ort.Tensor> = {
      ...this.constFeeds,
      [INPUT.ids]: new ort.Tensor('int64', ids, [B, T]),
      [INPUT.bias]: new ort.Tensor('float32', bias, [B, T, T]),
      [INPUT.cos]: new ort.Tensor('float32', cos, [B, T, D]),
      [INPUT.sin]: new ort.Tensor('float32', sin, [B, T, D]),
      [TRAIN_INPUT.targets]: new ort.Tensor('int64', targets, [B, T]),
      [TRAIN_INPUT.lossScale]: new ort.Tensor('float32', Float32Array.of(lossScale), [1]),
    };
    for (const t of this.targets) {
      const key = siteKey(t);
      const p = params.get(key);
      if (!p) throw new EdgeloraError(`no parameters for LoRA target ${key}`);
      feeds[INPUT.loraA(t.layer, t.proj)] = new ort.Tensor('float32', transpose(p.a, p.r, p.K), [p.K, p.r]);
      feeds[INPUT.loraB(t.layer, t.proj)] = new ort.Tensor('float32', transpose(p.b, p.N, p.r, p.scale), [p.r, p.N]);
      if (this.dropout) {
        if (!dropout) throw new EdgeloraError('the training graph takes dropout masks but none were given', { where: 'TrainSession.step', hint: 'pass NO_DROPOUT to run it without dropout' });
        feeds[INPUT.loraDropout(t.layer, t.proj)] = new ort.Tensor('uint8', dropout.bits(key, B, T, p.K), [B, T, Math.ceil(p.K / 8)]);
      }
    }
    if (this.dropout) feeds[INPUT.loraDropoutScale] = new ort.Tensor('float32', Float32Array.of(dropout!.scale), [1]);
    const out = await this.session.run(feeds);
    const loss = (out[TRAIN_OUTPUT.loss]!.data as Float32Array)[0]!;
    const grads = new Map<string, LoraGrad>();
    for (const t of this.targets) {
      const key = siteKey(t);
      const p = params.get(key)!;
      const ga = out[TRAIN_OUTPUT.gradA(t.layer, t.proj)]!.data as Float32Array; // [K, R]
      const gb = out[TRAIN_OUTPUT.gradB(t.layer, t.proj)]!.data as Float32Array; // [R, N]
      grads.set(key, { a: transpose(ga, p.K, p.r), b: transpose(gb, p.r, p.N, p.scale) });
    }
    for (const t of Object.values(out)) t.dispose?.();
    return { loss, grads };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

/** [rows, cols] → [cols, rows], times `scale`. */
function transpose(x: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = x[i * cols + j]! * scale;
  return out;
}
