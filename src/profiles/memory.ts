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
    /** Elements of K per scale of the 4-bit linears (manifest quant.blockSize); default 32. */
    blockSize?: number;
    /** Weights in all linear projections (Σ N·K), which splits int4 bytes into codes and scales. */
    linearParams?: number;
  };
}

/**
 * Bytes a MatMulNBits weight costs once ORT has prepacked it (x86-64, accuracy_level 4), for packed codes of `data`
 * bytes and float scales of `scales` bytes: the packed codes and two more scales' worth in anonymous memory (its
 * scale copy and per-block sums), while the kernel keeps reading the original scales from the mapped file. Measured
 * with weights of Llama-3.2-1B's shapes, 4-bit and 8-bit, blocks 32 to 128 (marginal RSS per weight): codes + 2.0–2.3 ×
 * scales anonymous, + 1 × scales file-backed.
 */
export function prepackedNBitsBytes(data: number, scales: number): number {
  return data + 3 * scales;
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
export const SESSION_OVERHEAD_BYTES = 30 * 2 ** 20;

/**
 * The tokenizer's JS heap per vocabulary entry (@huggingface/tokenizers' maps and strings): RSS after loading a
 * byte-level BPE tokenizer.json of 151,936 entries rose 64–100 MiB, of 128,256 entries 68 MiB.
 */
export const TOKENIZER_BYTES_PER_ENTRY = 500;

/** The fixed part of the run-time growth item (see runtimeItems). */
export const RUN_TIME_GROWTH_BYTES = 40 * 2 ** 20;

/** The runtime's items beyond weights and KV buffers (see InferenceMemoryInput.runtime). */
function runtimeItems(input: InferenceMemoryInput, kvBytes: number): Record<string, number> {
  const r = input.runtime;
  if (!r) return {};
  const batch = input.batch ?? 1;
  const floatHead = r.vocab * r.hidden * 4; // the lm_head, float32 [V, C]
  const floats = floatHead * (r.tiedEmbeddings ? 1 : 2);
  const items: Record<string, number> = {
    'runtime (Node + onnxruntime)': RUNTIME_BASE_BYTES,
    'session, arena, JS heap': SESSION_OVERHEAD_BYTES,
    tokenizer: r.vocab * TOKENIZER_BYTES_PER_ENTRY,
  };
  const emb = r.embeddings ?? 'float';
  // What ORT prepacks leaves the file's pages once packed (their mapping is released), so it is taken off the
  // on-disk figure ('model weights' below) and counted at its packed size instead.
  let released = 0;
  if (emb !== 'float') {
    // A quantized table: the lm_head's MatMulNBits slices are prepacked and released, and the lookup reads its
    // rows from the file without mapping it (src/runtime/table-rows.ts). So the table counts once, prepacked.
    const bs = r.embeddingBlockSize ?? 32;
    const data = (r.vocab * r.hidden * (emb === 'int8' ? 8 : 4)) / 8;
    const scales = (r.vocab * r.hidden * 4) / bs;
    const tables = r.tiedEmbeddings ? 1 : 2;
    released += tables * (data + scales);
    items['prepacked lm_head'] = tables * prepackedNBitsBytes(data, scales);
  }
  if (r.format === 'int4') {
    // Every int4 linear is prepacked: 4-bit codes, float scales and packed zero points per block of `blockSize`.
    const tableBytes = emb === 'float' ? floats : released;
    const lin = Math.max(0, input.modelBytes - tableBytes);
    const bs = r.blockSize ?? 32;
    const scales = r.linearParams !== undefined ? (r.linearParams * 4) / bs : (lin * (4 / bs)) / (0.5 + 4.5 / bs);
    const data = Math.max(0, lin - scales - scales / 8);
    released += data + scales;
    items['prepacked int4 weights'] = prepackedNBitsBytes(data, scales);
  }
  // ORT prepacks the lm_head Gemm: a second copy of the float table (nf4/fp4 sessions skip prepacking).
  if (emb === 'float' && (r.format === 'fp32' || r.format === 'int4')) items['prepacked lm_head'] = floatHead;
  items['model weights'] = -released; // taken off the on-disk figure in estimateInferenceMemory
  // GroupQueryAttention builds its present cache (past + new) inside the graph each forward.
  items['KV cache, in-graph copy'] = kvBytes;
  // A prefill's activations: hidden states, the q/k/v and gate/up group outputs, attention; for
  // nf4/fp4 MatMulBnb4 dequantizes the largest group's weights to float32 when T > 1.
  const T = r.prefillTokens * batch;
  const hidden = T * (6 * r.hidden + 3 * r.intermediate) * 4 + batch * r.vocab * 4;
  let act = hidden;
  if (r.format === 'nf4' || r.format === 'fp4') act += 2 * r.intermediate * r.hidden * 4;
  items['activations (prefill)'] = act;
  // What RSS gains between load and the end of a 128 + 128 generation beyond the items above (ORT's arena and
  // run-time buffers, onnxruntime-node's output copies): measured +52 MiB (small), +60 (Qwen2.5-0.5B), +128
  // (Llama-3.2-1B) after load (int4), fitted as a fixed part and 4× the prefill's hidden activations (not nf4's
  // dequantized weight, which does not grow with the run). Calibrated, not itemized.
  items['run-time growth (calibrated)'] = RUN_TIME_GROWTH_BYTES + 4 * hidden;
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
