// Memory plans: an estimate of what a job needs, itemized, checked against the device profile's budget before the
// job starts, so a job that would not fit is refused instead of being killed by the OOM killer halfway.
import { EdgeloraError } from '../util/errors.js';

export interface MemoryPlan {
  /** What the plan is for, e.g. "generate with TinyLlama-1.1B at 2048 tokens". */
  what: string;
  /** Total estimate in bytes (normally the sum of the breakdown). */
  bytes: number;
  /** Items in bytes, e.g. { "model weights": …, "KV cache": … }. */
  breakdown: Record<string, number>;
  /** What the user can lower, as flags or actions, e.g. ["--seq-len", "--batch-size", "use --recompute"]. */
  lower: string[];
}

/** Bytes as "5.20 GB" (decimal GB, as memory budgets in profiles are written). */
export function formatBytes(bytes: number): string {
  if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(2)} GB`;
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(1)} MB`;
  if (bytes >= 1e3) return `${(bytes / 1e3).toFixed(1)} kB`;
  return `${bytes} B`;
}

/** Who set a memory budget: a device profile (its id), or a flag such as `{ flag: 'memory-budget' }`. */
export type BudgetSource = string | { readonly flag: string };

/**
 * Throws an EdgeloraError when `plan.bytes` exceeds `budgetBytes`: the message gives the estimate, the budget and
 * the three biggest items; the hint says what to lower and how to raise the budget if the user knows better
 * (the profile's `--profile-set memoryBudgetBytes`, or the flag that set it).
 */
export function checkMemoryPlan(plan: MemoryPlan, budgetBytes: number, source: BudgetSource): void {
  if (!Number.isFinite(plan.bytes) || plan.bytes < 0) {
    throw new EdgeloraError(`memory plan for ${plan.what} has a bad total: ${plan.bytes}`, { where: 'memory plan' });
  }
  if (plan.bytes <= budgetBytes) return;
  const biggest = Object.entries(plan.breakdown)
    .sort((a, b) => b[1] - a[1])
    .slice(0, 3)
    .map(([k, v]) => `${k} ${formatBytes(v)}`)
    .join(', ');
  const lower = plan.lower.length === 0 ? '' : `lower ${joinOr(plan.lower)}; `;
  const flag = typeof source === 'string' ? null : `--${source.flag}`;
  throw new EdgeloraError(
    `${plan.what} needs about ${formatBytes(plan.bytes)} but ${flag ?? 'the device profile'} allows ${formatBytes(budgetBytes)}` +
      (biggest ? ` (biggest: ${biggest})` : ''),
    {
      where: flag ?? `profile ${source as string}`,
      hint: flag ? `${lower}or raise ${flag}` : `${lower}or, if this device has more room, raise the budget with --profile-set memoryBudgetBytes=<bytes>`,
    },
  );
}

function joinOr(items: readonly string[]): string {
  if (items.length <= 1) return items.join('');
  return `${items.slice(0, -1).join(', ')}, or ${items[items.length - 1]}`;
}

export interface InferenceMemoryInput {
  /** Bytes of the model on disk (model.onnx + model.onnx.data): the 4-bit weights, embeddings and norms. */
  modelBytes: number;
  /** num_hidden_layers. */
  layers: number;
  /** num_key_value_heads (G). */
  kvHeads: number;
  /** head_dim (D). */
  headDim: number;
  /** Context S the KV cache is sized for (prompt + new tokens). */
  context: number;
  /** Sequences decoded together (B); default 1. */
  batch?: number;
  /** Bytes per KV element; default 4 (float32 cache). */
  kvBytesPerElement?: number;
  /** Other items the caller knows about (logits, activations, adapters), in bytes. */
  extra?: Record<string, number>;
  /**
   * What the edgelora runtime adds around the weights, when known: the process itself, ORT's prepacked
   * copies, the KV cache's in-graph copy and a prefill's activations. Without it the plan is weights +
   * KV cache only (an underestimate: on the small preset, int4 peaked at 2.8x that).
   */
  runtime?: {
    format: 'fp32' | 'nf4' | 'fp4' | 'int4';
    vocab: number;
    hidden: number;
    intermediate: number;
    tiedEmbeddings: boolean;
    /** Tokens of the longest prefill (one forward). */
    prefillTokens: number;
    /** The vocabulary table's storage (quantize --embeddings); default float. */
    embeddings?: 'float' | 'int8' | 'int4';
    /** Elements of C per table scale (quantized tables). */
    embeddingBlockSize?: number;
  };
}

/**
 * Bytes ORT's MatMulNBits prepacking holds for a weight whose packed codes are `data` bytes and float scales
 * `scales` bytes (x86-64, accuracy_level 4): the codes, plus ~3.5× the scales (scales and per-block sums in its
 * own layout). Measured on Qwen2.5-0.5B's 151,936 × 896 table: 186 MiB at 8 bits (130 + 16.2), 121 MiB at 4 bits
 * (65 + 16.2), RSS after load less the process.
 */
export function prepackedNBitsBytes(data: number, scales: number): number {
  return data + 3.5 * scales;
}

/**
 * Node 20 + onnxruntime-node 1.30 + the bundled edgelora, before a model is loaded: 64 MiB of RSS
 * measured on x86-64 (bench:inference's bundled children; Node + onnxruntime-node alone is 55 MiB).
 */
export const RUNTIME_BASE_BYTES = 64 * 2 ** 20;

/**
 * The ORT session's own structures, its arena and the JS heap's garbage between collections: 30–45
 * MiB beyond weights, caches and activations on the small preset (bench:inference, all formats).
 */
export const SESSION_OVERHEAD_BYTES = 40 * 2 ** 20;

/** The runtime's items beyond weights and KV buffers (see InferenceMemoryInput.runtime). */
function runtimeItems(input: InferenceMemoryInput, kvBytes: number): Record<string, number> {
  const r = input.runtime;
  if (!r) return {};
  const batch = input.batch ?? 1;
  const floatHead = r.vocab * r.hidden * 4; // the lm_head, float32 [V, C]
  const floats = floatHead * (r.tiedEmbeddings ? 1 : 2);
  const items: Record<string, number> = { 'runtime (Node + onnxruntime)': RUNTIME_BASE_BYTES, 'session, arena, JS heap': SESSION_OVERHEAD_BYTES };
  const emb = r.embeddings ?? 'float';
  if (emb !== 'float') {
    // A quantized table: MatMulNBits prepacks the lm_head's copy and releases it; the lookup's alias mapping keeps
    // only the rows it reads resident. So the table counts once, as its prepacked size, not as on-disk bytes.
    const bs = r.embeddingBlockSize ?? 32;
    const data = (r.vocab * r.hidden * (emb === 'int8' ? 8 : 4)) / 8;
    const scales = (r.vocab * r.hidden * 4) / bs;
    const tables = r.tiedEmbeddings ? 1 : 2;
    items['model weights'] = -tables * (data + scales); // taken off the on-disk figure below
    items['prepacked lm_head'] = tables * prepackedNBitsBytes(data, scales);
    if (r.format === 'int4') items['prepacked int4 weights'] = Math.max(0, input.modelBytes - tables * (data + scales));
  }
  // ORT prepacks the lm_head Gemm (a second copy of the float table) and, for int4, every
  // MatMulNBits weight; nf4/fp4 sessions skip prepacking (MatMulBnb4 does not use it).
  if (emb === 'float' && (r.format === 'fp32' || r.format === 'int4')) items['prepacked lm_head'] = floatHead;
  if (emb === 'float' && r.format === 'int4') items['prepacked int4 weights'] = Math.max(0, input.modelBytes - floats);
  // GroupQueryAttention builds its present cache (past + new) inside the graph each forward.
  items['KV cache, in-graph copy'] = kvBytes;
  // A prefill's activations: hidden states, the q/k/v and gate/up group outputs, attention; for
  // nf4/fp4 MatMulBnb4 dequantizes the largest group's weights to float32 when T > 1.
  const T = r.prefillTokens * batch;
  let act = T * (6 * r.hidden + 3 * r.intermediate) * 4 + batch * r.vocab * 4;
  if (r.format === 'nf4' || r.format === 'fp4') act += 2 * r.intermediate * r.hidden * 4;
  items['activations (prefill)'] = act;
  return items;
}

/**
 * Inference estimate: model bytes + KV cache, where the KV cache is 2 (K and V) · layers · G · D · S · bytes · B.
 * `opts.what` names the job in the error; `opts.lower` lists the flags the caller takes (default: --max-context,
 * --batch-size).
 */
export function estimateInferenceMemory(input: InferenceMemoryInput, opts: { what?: string; lower?: string[] } = {}): MemoryPlan {
  const what = opts.what ?? 'this model';
  const batch = input.batch ?? 1;
  const elem = input.kvBytesPerElement ?? 4;
  const kv = 2 * input.layers * input.kvHeads * input.headDim * input.context * elem * batch;
  const rt = runtimeItems(input, kv);
  const breakdown: Record<string, number> = {
    // A quantized table's on-disk bytes are replaced by its prepacked copy (runtimeItems' negative 'model weights').
    'model weights': input.modelBytes + (rt['model weights'] ?? 0),
    [`KV cache (${input.context} tokens × ${batch})`]: kv,
    ...Object.fromEntries(Object.entries(rt).filter(([k]) => k !== 'model weights')),
    ...(input.extra ?? {}),
  };
  const bytes = Object.values(breakdown).reduce((a, b) => a + b, 0);
  return { what: `${what} at ${input.context} tokens of context`, bytes, breakdown, lower: opts.lower ?? ['--max-context', '--batch-size'] };
}
