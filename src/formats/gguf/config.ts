// GGUF metadata ↔ Hugging Face config.json for the llama and qwen2 architectures. The metadata keys
// are llama.cpp's (gguf-py constants): {arch}.embedding_length, .block_count, .attention.head_count…
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import type { ModelConfig } from '../hf-config.js';
import type { GgufValue } from './reader.js';
import type { GgufMeta } from './writer.js';
import { llama3FromRopeFactors } from './rope.js';

export const GGUF_ARCHITECTURES = { llama: 'LlamaForCausalLM', qwen2: 'Qwen2ForCausalLM' } as const;
export type GgufArch = keyof typeof GGUF_ARCHITECTURES;

const uint = z.number().int().nonnegative();
const pos = z.number().int().positive();

function archSchema(a: string) {
  return z
    .object({
      [`${a}.context_length`]: pos,
      [`${a}.embedding_length`]: pos,
      [`${a}.block_count`]: pos,
      [`${a}.feed_forward_length`]: pos,
      [`${a}.attention.head_count`]: pos,
      [`${a}.attention.head_count_kv`]: pos.optional(),
      [`${a}.attention.key_length`]: pos.optional(),
      [`${a}.attention.layer_norm_rms_epsilon`]: z.number().positive(),
      [`${a}.rope.freq_base`]: z.number().positive().optional(),
      [`${a}.rope.scaling.type`]: z.string().optional(),
      [`${a}.rope.scaling.original_context_length`]: pos.optional(),
      [`${a}.vocab_size`]: pos.optional(),
      'tokenizer.ggml.bos_token_id': uint.optional(),
      'tokenizer.ggml.eos_token_id': uint.optional(),
    })
    .loose();
}

/** config.json (raw, as Hugging Face writes it) for a GGUF model's metadata. */
export function hfConfigFromGguf(
  meta: ReadonlyMap<string, GgufValue>,
  facts: { vocabSize: number; tied: boolean; attentionBias: boolean; ropeFreqs: Float32Array | null },
  where: string,
): { arch: GgufArch; raw: Record<string, unknown> } {
  const arch = meta.get('general.architecture');
  if (typeof arch !== 'string' || !(arch in GGUF_ARCHITECTURES)) {
    throw new EdgeloraError(`general.architecture is ${JSON.stringify(arch ?? null)}; edgelora imports ${Object.keys(GGUF_ARCHITECTURES).join(' and ')}`, {
      where: `${where} (metadata general.architecture)`,
      hint: 'only Llama-family decoders (llama, qwen2) map onto edgelora\'s model definition',
    });
  }
  const a = arch as GgufArch;
  const r = archSchema(a).safeParse(Object.fromEntries(meta));
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new EdgeloraError(`metadata ${i.path.join('.')}: ${i.message}`, { where, hint: 'is this a complete llama.cpp model file?' });
  }
  const m = r.data as Record<string, number | string | undefined>;
  const num = (k: string): number | undefined => m[`${a}.${k}`] as number | undefined;
  const scaling = m[`${a}.rope.scaling.type`];
  if (scaling !== undefined && scaling !== 'none') {
    throw new EdgeloraError(`rope scaling "${scaling}" is not imported`, {
      where: `${where} (metadata ${a}.rope.scaling.type)`,
      hint: 'plain RoPE and Llama 3 scaling (a rope_freqs tensor) import',
    });
  }
  const C = num('embedding_length')!;
  const H = num('attention.head_count')!;
  const headDim = num('attention.key_length');
  const theta = num('rope.freq_base') ?? 10000;
  const rope = facts.ropeFreqs
    ? llama3FromRopeFactors(facts.ropeFreqs, theta, headDim ?? C / H, num('rope.scaling.original_context_length'), where)
    : null;
  const raw: Record<string, unknown> = {
    architectures: [GGUF_ARCHITECTURES[a]],
    model_type: a,
    hidden_size: C,
    intermediate_size: num('feed_forward_length'),
    num_hidden_layers: num('block_count'),
    num_attention_heads: H,
    num_key_value_heads: num('attention.head_count_kv') ?? H,
    ...(headDim !== undefined && headDim !== C / H ? { head_dim: headDim } : {}),
    rms_norm_eps: num('attention.layer_norm_rms_epsilon'),
    rope_theta: theta,
    ...(rope
      ? {
          rope_scaling: {
            rope_type: 'llama3',
            factor: rope.factor,
            low_freq_factor: rope.lowFreqFactor,
            high_freq_factor: rope.highFreqFactor,
            original_max_position_embeddings: rope.originalMaxPositionEmbeddings,
          },
        }
      : {}),
    vocab_size: facts.vocabSize,
    max_position_embeddings: num('context_length'),
    tie_word_embeddings: facts.tied,
    ...(a === 'llama' ? { attention_bias: facts.attentionBias } : {}),
    ...(m['tokenizer.ggml.bos_token_id'] !== undefined ? { bos_token_id: m['tokenizer.ggml.bos_token_id'] } : {}),
    ...(m['tokenizer.ggml.eos_token_id'] !== undefined ? { eos_token_id: m['tokenizer.ggml.eos_token_id'] } : {}),
    hidden_act: 'silu',
    torch_dtype: 'float32',
  };
  return { arch: a, raw };
}

/** The GGUF metadata llama.cpp needs for a model with this config (architecture keys; llama3 rope scaling travels as the rope_freqs tensor). */
export function ggufMetaFromConfig(cfg: ModelConfig, name: string): { arch: GgufArch; meta: [string, GgufMeta][] } {
  const arch: GgufArch = cfg.architecture === 'Qwen2ForCausalLM' ? 'qwen2' : 'llama';
  const u = (value: number): GgufMeta => ({ type: 'u32', value });
  const meta: [string, GgufMeta][] = [
    ['general.architecture', { type: 'string', value: arch }],
    ['general.name', { type: 'string', value: name }],
    [`${arch}.context_length`, u(cfg.maxPositionEmbeddings)],
    [`${arch}.embedding_length`, u(cfg.hiddenSize)],
    [`${arch}.block_count`, u(cfg.numLayers)],
    [`${arch}.feed_forward_length`, u(cfg.intermediateSize)],
    [`${arch}.attention.head_count`, u(cfg.numHeads)],
    [`${arch}.attention.head_count_kv`, u(cfg.numKvHeads)],
    [`${arch}.attention.key_length`, u(cfg.headDim)],
    [`${arch}.attention.value_length`, u(cfg.headDim)],
    [`${arch}.rope.dimension_count`, u(cfg.headDim)],
    [`${arch}.attention.layer_norm_rms_epsilon`, { type: 'f32', value: cfg.rmsNormEps }],
    [`${arch}.rope.freq_base`, { type: 'f32', value: cfg.ropeTheta }],
    [`${arch}.vocab_size`, u(cfg.vocabSize)],
    ...(cfg.ropeScaling ? ([[`${arch}.rope.scaling.original_context_length`, u(cfg.ropeScaling.originalMaxPositionEmbeddings)]] as [string, GgufMeta][]) : []),
  ];
  return { arch, meta };
}
