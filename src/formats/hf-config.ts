// Hugging Face config.json for the Llama family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
// a zod schema at the boundary, a normalized camelCase ModelConfig with every default resolved, and the
// list of weight names/shapes that such a config implies.
// Dimension letters: C hidden, H heads, G kv heads, D head dim, F intermediate, V vocab.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';
import { expectDir } from './dir-kind.js';

export const SUPPORTED_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

export interface RopeScaling {
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

export interface ModelConfig {
  architecture: Architecture;
  hiddenSize: number; // C
  intermediateSize: number; // F
  numLayers: number;
  numHeads: number; // H
  numKvHeads: number; // G
  headDim: number; // D
  rmsNormEps: number;
  ropeTheta: number;
  /** null: plain RoPE; otherwise Llama 3.1 "llama3" frequency scaling. */
  ropeScaling: RopeScaling | null;
  tieWordEmbeddings: boolean;
  vocabSize: number; // V
  maxPositionEmbeddings: number;
  /** q/k/v projections carry a bias (attention_bias, or always for Qwen2). */
  qkvBias: boolean;
  /** o_proj carries a bias (attention_bias for Llama/Mistral; never for Qwen2). */
  oBias: boolean;
  mlpBias: false;
  bosTokenId?: number;
  eosTokenIds: number[];
  /** torch_dtype (or dtype) as written, e.g. "bfloat16"; informational. */
  torchDtype?: string;
}

const posInt = z.number().int().positive();
const tokenId = z.number().int().nonnegative();

const ropeScalingSchema = z
  .object({
    rope_type: z.string().optional(),
    type: z.string().optional(),
    factor: z.number().positive().optional(),
    low_freq_factor: z.number().positive().optional(),
    high_freq_factor: z.number().positive().optional(),
    original_max_position_embeddings: posInt.optional(),
  })
  .loose();

export const hfConfigSchema = z
  .object({
    architectures: z.array(z.string()).min(1),
    hidden_size: posInt,
    intermediate_size: posInt,
    num_hidden_layers: posInt,
    num_attention_heads: posInt,
    num_key_value_heads: posInt.nullish(),
    head_dim: posInt.nullish(),
    rms_norm_eps: z.number().positive(),
    rope_theta: z.number().positive().nullish(),
    rope_scaling: ropeScalingSchema.nullish(),
    tie_word_embeddings: z.boolean().nullish(),
    vocab_size: posInt,
    max_position_embeddings: posInt,
    attention_bias: z.boolean().nullish(),
    mlp_bias: z.boolean().nullish(),
    hidden_act: z.string().nullish(),
    bos_token_id: tokenId.nullish(),
    eos_token_id: z.union([tokenId, z.array(tokenId)]).nullish(),
    torch_dtype: z.string().nullish(),
    dtype: z.string().nullish(),
  })
  .loose();

export type HfConfigJson = z.infer<typeof hfConfigSchema>;

/** Validates and normalizes a parsed config.json; `where` names the file in errors. */
export function parseHfConfig(json: unknown, where: string): ModelConfig {
  const r = hfConfigSchema.safeParse(json);
  if (!r.success) {
    const issues = r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new EdgeloraError(`invalid config.json: ${issues}`, {
      where,
      hint: 'expected a Hugging Face transformers config for a Llama/Mistral/Qwen2 causal LM',
    });
  }
  const c = r.data;
  const arch = c.architectures[0] as string;
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(arch)) {
    throw new EdgeloraError(`architecture "${arch}" is not supported`, {
      where,
      hint: `edgelora runs ${SUPPORTED_ARCHITECTURES.join(', ')}`,
    });
  }
  const architecture = arch as Architecture;
  const act = c.hidden_act ?? 'silu';
  if (act !== 'silu') {
    throw new EdgeloraError(`hidden_act "${act}" is not supported`, { where, hint: 'the Llama-family MLP here is SwiGLU (silu)' });
  }
  if (c.mlp_bias) {
    throw new EdgeloraError('mlp_bias true is not supported', { where, hint: 'only bias-free MLPs (the Llama default) are implemented' });
  }
  const numHeads = c.num_attention_heads;
  const numKvHeads = c.num_key_value_heads ?? numHeads;
  if (numHeads % numKvHeads !== 0) {
    throw new EdgeloraError(`num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`, { where });
  }
  let headDim: number;
  if (c.head_dim != null) {
    headDim = c.head_dim;
  } else {
    if (c.hidden_size % numHeads !== 0) {
      throw new EdgeloraError(`hidden_size ${c.hidden_size} is not divisible by num_attention_heads ${numHeads}`, {
        where,
        hint: 'set head_dim explicitly',
      });
    }
    headDim = c.hidden_size / numHeads;
  }
  if (headDim % 2 !== 0) throw new EdgeloraError(`head_dim ${headDim} is odd; RoPE rotates halves`, { where });

  let ropeScaling: RopeScaling | null = null;
  if (c.rope_scaling) {
    const kind = c.rope_scaling.rope_type ?? c.rope_scaling.type ?? '(missing)';
    // transformers treats "default" as plain RoPE.
    if (kind === 'llama3') {
      const s = c.rope_scaling;
      if (s.factor === undefined || s.low_freq_factor === undefined || s.high_freq_factor === undefined || s.original_max_position_embeddings === undefined) {
        throw new EdgeloraError('rope_scaling "llama3" needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings', { where });
      }
      ropeScaling = {
        factor: s.factor,
        lowFreqFactor: s.low_freq_factor,
        highFreqFactor: s.high_freq_factor,
        originalMaxPositionEmbeddings: s.original_max_position_embeddings,
      };
    } else if (kind !== 'default') {
      throw new EdgeloraError(`rope_scaling type "${kind}" is not supported`, {
        where,
        hint: 'only "llama3" rope scaling or none (null/absent) are supported',
      });
    }
  }
  const isQwen2 = architecture === 'Qwen2ForCausalLM';
  const attnBias = c.attention_bias ?? false;
  const eos = c.eos_token_id == null ? [] : Array.isArray(c.eos_token_id) ? c.eos_token_id : [c.eos_token_id];
  const cfg: ModelConfig = {
    architecture,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads,
    numKvHeads,
    headDim,
    rmsNormEps: c.rms_norm_eps,
    ropeTheta: c.rope_theta ?? 10000,
    ropeScaling,
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    vocabSize: c.vocab_size,
    maxPositionEmbeddings: c.max_position_embeddings,
    qkvBias: isQwen2 ? true : attnBias,
    oBias: isQwen2 ? false : attnBias,
    mlpBias: false,
    eosTokenIds: eos,
  };
  if (c.bos_token_id != null) cfg.bosTokenId = c.bos_token_id;
  const dtype = c.torch_dtype ?? c.dtype;
  if (dtype != null) cfg.torchDtype = dtype;
  return cfg;
}

/** Reads `<dir>/config.json`: the normalized config plus the raw JSON (to copy or fingerprint). */
export async function loadHfConfig(dir: string): Promise<{ config: ModelConfig; raw: Record<string, unknown> }> {
  const file = path.join(dir, 'config.json');
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    await expectDir(dir, 'hf-checkpoint');
    throw new EdgeloraError(`cannot read config.json: ${(err as Error).message}`, {
      where: file,
      hint: 'pass a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)',
    });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`config.json is not valid JSON: ${(err as Error).message}`, { where: file });
  }
  const config = parseHfConfig(raw, file);
  return { config, raw: raw as Record<string, unknown> };
}

/**
 * Every weight a checkpoint with this config must hold, with its PyTorch shape ([out, in] for
 * linears), in model order. `lm_head.weight` appears only when embeddings are untied.
 */
export function expectedWeightShapes(cfg: ModelConfig): Map<string, number[]> {
  const C = cfg.hiddenSize;
  const F = cfg.intermediateSize;
  const V = cfg.vocabSize;
  const HD = cfg.numHeads * cfg.headDim;
  const GD = cfg.numKvHeads * cfg.headDim;
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [V, C]);
  for (let i = 0; i < cfg.numLayers; i++) {
    const p = `model.layers.${i}`;
    m.set(`${p}.input_layernorm.weight`, [C]);
    m.set(`${p}.self_attn.q_proj.weight`, [HD, C]);
    if (cfg.qkvBias) m.set(`${p}.self_attn.q_proj.bias`, [HD]);
    m.set(`${p}.self_attn.k_proj.weight`, [GD, C]);
    if (cfg.qkvBias) m.set(`${p}.self_attn.k_proj.bias`, [GD]);
    m.set(`${p}.self_attn.v_proj.weight`, [GD, C]);
    if (cfg.qkvBias) m.set(`${p}.self_attn.v_proj.bias`, [GD]);
    m.set(`${p}.self_attn.o_proj.weight`, [C, HD]);
    if (cfg.oBias) m.set(`${p}.self_attn.o_proj.bias`, [C]);
    m.set(`${p}.post_attention_layernorm.weight`, [C]);
    m.set(`${p}.mlp.gate_proj.weight`, [F, C]);
    m.set(`${p}.mlp.up_proj.weight`, [F, C]);
    m.set(`${p}.mlp.down_proj.weight`, [C, F]);
  }
  m.set('model.norm.weight', [C]);
  if (!cfg.tieWordEmbeddings) m.set('lm_head.weight', [V, C]);
  return m;
}

/**
 * Checks that every weight the config implies is present with the right shape. `shapeOf` returns a
 * tensor's shape, or undefined when the checkpoint lacks it. Throws naming the tensor, both shapes
 * and a hint. Extra tensors in the checkpoint are not checked here.
 */
export function checkWeightShapes(cfg: ModelConfig, shapeOf: (name: string) => readonly number[] | undefined, where: string): void {
  for (const [name, want] of expectedWeightShapes(cfg)) {
    const got = shapeOf(name);
    if (!got) {
      throw new EdgeloraError(`tensor "${name}" (shape [${want.join(', ')}]) is missing`, {
        where,
        hint: 'is this checkpoint for the architecture named in config.json? (tied embeddings: check tie_word_embeddings)',
      });
    }
    if (want.length !== got.length || want.some((d, i) => d !== got[i])) {
      throw new EdgeloraError(`tensor "${name}" has shape [${got.join(', ')}] but config.json implies [${want.join(', ')}]`, {
        where,
        hint: 'the weights and config.json come from different models (or model sizes); use the config.json shipped with these weights',
      });
    }
  }
}
