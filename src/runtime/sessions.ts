// The one place edgelora creates ONNX Runtime sessions: the plain decoder, the LoRA twin (which also
// serves batched requests), the training step and the adapter-merge product. Execution providers,
// the profile's session options, prepacking, external-data resolution and error formatting are
// decided here once, by a table keyed on the session's kind.
import ort from 'onnxruntime-node';
import os from 'node:os';
import path from 'node:path';
import type { EmbeddingFormat, QuantFormat } from '../model/weights.js';
import { EdgeloraError } from '../util/errors.js';

export type SessionKind = 'decoder' | 'lora-twin' | 'train' | 'merge';

type SessionOptions = ort.InferenceSession.SessionOptions;

interface KindRule {
  /** What failed to load, for the error message. */
  readonly what: string;
  readonly hint: string;
  /** Options that apply unless the caller (the device profile) sets them. */
  readonly defaults: SessionOptions;
  /**
   * Whether ORT may prepack weights. In an nf4/fp4 graph the only kernel ORT prepacks is the lm_head
   * Gemm, and its packed copy duplicates the (tied) embedding table: on the small preset prepacking
   * cost ~100 MiB of RSS and no decode speed (bench: 445 → 348 MiB peak). int4's MatMulNBits and
   * fp32's MatMul need it, and so does a quantized vocabulary table's lm_head (MatMulNBits): unpacked it
   * dequantizes the whole table per call (~0.9 s a token for Qwen2.5-0.5B's).
   */
  readonly prepack: (format: QuantFormat | undefined, embeddings: EmbeddingFormat | undefined) => boolean;
}

const CPU_ALL_CORES: SessionOptions = { executionProviders: ['cpu'], intraOpNumThreads: os.availableParallelism(), graphOptimizationLevel: 'all' };
const inferencePrepack = (f: QuantFormat | undefined, e: EmbeddingFormat | undefined): boolean => (f !== 'nf4' && f !== 'fp4') || (e ?? 'float') !== 'float';

const RULES: Readonly<Record<SessionKind, KindRule>> = {
  decoder: { what: 'the model', hint: 're-run `edgelora quantize`; the directory may be incomplete', defaults: CPU_ALL_CORES, prepack: inferencePrepack },
  'lora-twin': { what: 'the LoRA graph', hint: 'is the quantized model directory complete (model.onnx.data)?', defaults: CPU_ALL_CORES, prepack: inferencePrepack },
  // Activations of one training step are freed as the backward passes them; without the arena that
  // memory goes back to the allocator instead of staying reserved at its peak.
  //
  // int4 and fp32 training sessions run unprepacked: a step multiplies B·T rows (hundreds), so MatMulNBits' per-call
  // dequantization of an unpacked weight is amortized, and the prepacked copies were a second copy of every linear
  // beside the file-backed one the backward's dequantizers read (Qwen2.5-0.5B int4, 8 layers: RSS after session
  // creation 356 → 196 MiB, step peak at 256 tokens 911 → 817 MiB, step time 27.4 vs 28.8 s on a loaded machine).
  // A quantized table never reaches MatMulNBits in the training graph (src/train/graph.ts reads it in slices).
  // nf4/fp4 (MatMulBnb4 is not prepacked) keep prepacking, as before.
  //
  // No memory pattern either: from the second run on, ORT would place every planned tensor of the step at the offsets
  // it traced in the first, in one block sized by that trace's packing, which is larger than the tensors alive at
  // once (Qwen2.5-0.5B int4, r16 all-linear, 1 × 512, --recompute: step peak 1276 MiB on the first run, 1652 on the
  // second with the pattern, 1342 without).
  train: { what: 'the training graph', hint: 'is the quantized model directory complete?', defaults: { ...CPU_ALL_CORES, enableCpuMemArena: false, enableMemPattern: false }, prepack: (f) => f === 'nf4' || f === 'fp4' },
  merge: { what: 'the merge graph', hint: 'this is a bug in edgelora; please report it', defaults: { executionProviders: ['cpu'] }, prepack: () => true },
};

export interface SessionRequest {
  readonly kind: SessionKind;
  /** A model file path, or serialized ONNX bytes. */
  readonly model: string | Uint8Array;
  /** The profile's options (providers, threads, …); they win over the kind's defaults. */
  readonly sessionOptions?: SessionOptions | undefined;
  /** Where a graph given as bytes finds its external initializers (read in place, never copied). */
  readonly externalDataDir?: string | undefined;
  /** The base model's quantization, which decides prepacking. */
  readonly format?: QuantFormat | undefined;
  /** The base model's vocabulary table format (manifest `quant.embeddings`; absent = float), which also decides it. */
  readonly embeddings?: EmbeddingFormat | undefined;
  /** Named in errors: the model directory or the job. */
  readonly where: string;
}

type SessionConfig = Record<string, string>;

/** The options ORT receives for `req` (exported so tests can check what a profile's options become). */
export function sessionOptionsFor(req: Omit<SessionRequest, 'model' | 'where'>): SessionOptions {
  const rule = RULES[req.kind];
  const given = req.sessionOptions ?? {};
  const extra = { ...((rule.defaults.extra ?? {}) as Record<string, unknown>), ...((given.extra ?? {}) as Record<string, unknown>) };
  // Session config entries merge key by key: a profile's entries survive the ones set here.
  const session: SessionConfig = { ...((extra.session ?? {}) as SessionConfig) };
  if (!rule.prepack(req.format, req.embeddings)) session.disable_prepacking = '1';
  if (req.externalDataDir !== undefined) session.model_external_initializers_file_folder_path = path.resolve(req.externalDataDir);
  const out: SessionOptions = { ...rule.defaults, ...given };
  return Object.keys(session).length > 0 ? { ...out, extra: { ...extra, session } } : Object.keys(extra).length > 0 ? { ...out, extra } : out;
}

/** Creates an ORT session; an ORT failure becomes an EdgeloraError naming what and where. */
export async function createSession(req: SessionRequest): Promise<ort.InferenceSession> {
  const options = sessionOptionsFor(req);
  const rule = RULES[req.kind];
  try {
    return typeof req.model === 'string' ? await ort.InferenceSession.create(req.model, options) : await ort.InferenceSession.create(req.model, options);
  } catch (err) {
    throw new EdgeloraError(`onnxruntime could not load ${rule.what}: ${(err as Error).message}`, { where: req.where, hint: rule.hint, cause: err });
  }
}
