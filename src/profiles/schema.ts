// The device profile schema (one JSON file per device in device-profiles/) and its validation.
// A profile says what the runtime may use on a device: memory budget, execution providers, 4-bit format, threads,
// context length and fine-tuning defaults. `sources` says where each figure comes from (JSON has no comments).
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';

/** Execution providers edgelora knows how to ask onnxruntime-node for, by their onnxruntime-node names. */
export const EP_NAMES = ['tensorrt', 'cuda', 'cpu'] as const;
export type EpName = (typeof EP_NAMES)[number];

/** ORT provider option values, passed as strings to Update{TensorRT,CUDA}ProviderOptions by a patched binding. */
const providerOptionValue = z.union([z.string(), z.number(), z.boolean()]);

export const executionProviderSchema = z.strictObject({
  name: z.enum(EP_NAMES),
  /** GPU index for cuda/tensorrt; default 0. The only option the stock onnxruntime-node binding passes on. */
  deviceId: z.number().int().min(0).optional(),
  /** TensorRT: build engines in fp16 (sets trt_fp16_enable). Only for GPUs with fast fp16 (Volta and newer). */
  fp16: z.boolean().optional(),
  /**
   * Further ORT provider options by their C API key (e.g. trt_engine_cache_enable, trt_engine_cache_path,
   * gpu_mem_limit). A leading "~/" in a string value is expanded to the home directory. Honoured only by a binding
   * built with native/build-ort-jetson.sh (the stock binding passes deviceId alone).
   */
  providerOptions: z.record(z.string(), providerOptionValue).optional(),
});
export type ExecutionProviderEntry = z.infer<typeof executionProviderSchema>;

const byteRange = z.strictObject({ min: z.number().positive().optional(), max: z.number().positive().optional() });

/** A profile matches when every rule it states holds; the profile stating the most rules wins. */
export const matchSchema = z.strictObject({
  /** Case-insensitive substrings of /proc/device-tree/model; any one of them is enough. */
  model: z.array(z.string().min(1)).min(1).optional(),
  /** Node's process.arch values, e.g. "arm64", "x64". */
  arch: z.array(z.string().min(1)).min(1).optional(),
  /** true: /etc/nv_tegra_release must exist (a Jetson running L4T); false: it must not. */
  tegra: z.boolean().optional(),
  /** L4T major releases (the "R36" in nv_tegra_release) this profile is for. */
  l4tMajor: z.array(z.number().int().positive()).min(1).optional(),
  /** MemTotal from /proc/meminfo, in bytes: tells the 4 GB and 8 GB modules of one family apart. */
  memTotalBytes: byteRange.optional(),
});
export type MatchRules = z.infer<typeof matchSchema>;

export const finetuneDefaultsSchema = z.strictObject({
  /** Sequences per optimizer step. */
  batchSize: z.number().int().positive(),
  /** Tokens per training sequence. */
  seqLen: z.number().int().positive(),
  /** LoRA rank R. */
  rank: z.number().int().positive(),
  /** LoRA alpha (scaling = alpha / rank). */
  alpha: z.number().positive(),
  /** PEFT target module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). */
  targets: z.array(z.string().min(1)).min(1),
  /** Activation recomputation (gradient checkpointing): trade compute for activation memory. */
  recompute: z.boolean(),
});
export type FinetuneDefaults = z.infer<typeof finetuneDefaultsSchema>;

export const deviceProfileSchema = z
  .strictObject({
    /** Lower-case id, the file name without .json; what `--profile <id>` selects. */
    id: z.string().regex(/^[a-z0-9][a-z0-9-]*$/, 'lower-case letters, digits and dashes'),
    name: z.string().min(1),
    match: matchSchema,
    /** Bytes of memory the runtime may use (weights + KV cache + activations + optimizer state). Wins over the fraction. */
    memoryBudgetBytes: z.number().positive().optional(),
    /** For hosts of unknown size: the budget is this fraction of the detected MemTotal. */
    memoryBudgetFraction: z.number().gt(0).lte(1).optional(),
    /** In order of preference; edgelora uses every one the installed onnxruntime-node really offers. */
    executionProviders: z.array(executionProviderSchema).min(1),
    /** The 4-bit format `quantize` defaults to: nf4 (MatMulBnb4) where it runs on the GPU, int4 (MatMulNBits) on CPU. */
    defaultFormat: z.enum(['nf4', 'int4']),
    /** intra-op threads; "auto" = the detected CPU count. Clamped to the detected CPU count. */
    threads: z.union([z.number().int().positive(), z.literal('auto')]),
    /** Longest context (prompt + generated tokens) the runtime plans for. */
    maxContext: z.number().int().positive(),
    finetune: finetuneDefaultsSchema,
    /** Where each figure comes from, by field name. Required for shipped profiles (checked by a test). */
    sources: z.record(z.string(), z.string()).optional(),
  })
  .superRefine((p, ctx) => {
    if (p.memoryBudgetBytes === undefined && p.memoryBudgetFraction === undefined) {
      ctx.addIssue({ code: 'custom', path: ['memoryBudgetBytes'], message: 'give memoryBudgetBytes or memoryBudgetFraction' });
    }
    const seen = new Set<string>();
    p.executionProviders.forEach((ep, i) => {
      if (seen.has(ep.name)) ctx.addIssue({ code: 'custom', path: ['executionProviders', i, 'name'], message: `"${ep.name}" is listed twice` });
      seen.add(ep.name);
      if (ep.fp16 !== undefined && ep.name !== 'tensorrt') {
        ctx.addIssue({ code: 'custom', path: ['executionProviders', i, 'fp16'], message: 'fp16 is a TensorRT option' });
      }
    });
  });
export type DeviceProfile = z.infer<typeof deviceProfileSchema>;

/** The dotted path of a zod issue, with unrecognized keys appended so the user sees the misspelt field itself. */
function issueField(issue: z.core.$ZodIssue): string {
  const parts = issue.path.map((p) => String(p));
  if (issue.code === 'unrecognized_keys') parts.push(issue.keys.join(','));
  return parts.length === 0 ? '(top level)' : parts.join('.');
}

/**
 * Validates a parsed profile. On failure throws an EdgeloraError whose `where` is `file` and whose message names
 * every bad field, e.g. `field "executionProviders.0.name": Invalid option: expected one of "tensorrt"|"cuda"|"cpu"`.
 */
export function validateProfile(raw: unknown, file: string): DeviceProfile {
  const r = deviceProfileSchema.safeParse(raw);
  if (r.success) return r.data;
  const lines = r.error.issues.map((i) => `field "${issueField(i)}": ${i.message}`);
  throw new EdgeloraError(`invalid device profile: ${lines.join('; ')}`, {
    where: file,
    hint: 'compare with a shipped profile in device-profiles/ (docs/device-profiles.md lists every field)',
  });
}
