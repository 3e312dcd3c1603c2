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

/**
 * Throws an EdgeloraError when `plan.bytes` exceeds `budgetBytes`: the message gives the estimate, the budget and
 * the three biggest items; the hint says what to lower and how to raise the budget if the user knows better.
 */
export function checkMemoryPlan(plan: MemoryPlan, budgetBytes: number, profileId: string): void {
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
  throw new EdgeloraError(
    `${plan.what} needs about ${formatBytes(plan.bytes)} but the device profile allows ${formatBytes(budgetBytes)}` +
      (biggest ? ` (biggest: ${biggest})` : ''),
    {
      where: `profile ${profileId}`,
      hint: `${lower}or, if this device has more room, raise the budget with --profile-set memoryBudgetBytes=<bytes>`,
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
  const breakdown: Record<string, number> = { 'model weights': input.modelBytes, [`KV cache (${input.context} tokens × ${batch})`]: kv, ...(input.extra ?? {}) };
  const bytes = Object.values(breakdown).reduce((a, b) => a + b, 0);
  return { what: `${what} at ${input.context} tokens of context`, bytes, breakdown, lower: opts.lower ?? ['--max-context', '--batch-size'] };
}
