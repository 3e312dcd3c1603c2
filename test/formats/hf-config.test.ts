// config.json parsing: defaults, the three architectures, rope scaling, errors, expected weight shapes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseHfConfig, loadHfConfig, expectedWeightShapes, checkWeightShapes } from '../../src/formats/hf-config.js';
import { EdgeloraError } from '../../src/util/errors.js';

// Shape of meta-llama/Llama-3.2-1B's config.json (values as published).
const llama32 = {
  architectures: ['LlamaForCausalLM'],
  attention_bias: false,
  bos_token_id: 128000,
  eos_token_id: 128001,
  head_dim: 64,
  hidden_act: 'silu',
  hidden_size: 2048,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: 'llama',
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  vocab_size: 128256,
};

// Shape of Qwen/Qwen2-0.5B's config.json.
const qwen2 = {
  architectures: ['Qwen2ForCausalLM'],
  bos_token_id: 151643,
  eos_token_id: 151643,
  hidden_act: 'silu',
  hidden_size: 896,
  intermediate_size: 4864,
  max_position_embeddings: 131072,
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  sliding_window: 131072,
  tie_word_embeddings: true,
  torch_dtype: 'bfloat16',
  use_sliding_window: false,
  vocab_size: 151936,
};

function expectErr(fn: () => unknown, mustName: string[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, String(err));
    const text = err.describe();
    for (const s of mustName) assert.ok(text.includes(s), `"${text}" should mention "${s}"`);
    return true;
  });
}

test('Llama 3.2 config normalizes with llama3 rope scaling', () => {
  const c = parseHfConfig(llama32, 'cfg.json');
  assert.deepEqual(c, {
    architecture: 'LlamaForCausalLM',
    hiddenSize: 2048,
    intermediateSize: 8192,
    numLayers: 16,
    numHeads: 32,
    numKvHeads: 8,
    headDim: 64,
    rmsNormEps: 1e-5,
    ropeTheta: 500000,
    ropeScaling: { factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
    tieWordEmbeddings: true,
    vocabSize: 128256,
    maxPositionEmbeddings: 131072,
    qkvBias: false,
    oBias: false,
    mlpBias: false,
    bosTokenId: 128000,
    eosTokenIds: [128001],
    torchDtype: 'bfloat16',
  });
  // "type" is accepted in place of "rope_type"; eos may be a list.
  const c2 = parseHfConfig({ ...llama32, rope_scaling: { ...llama32.rope_scaling, rope_type: undefined, type: 'llama3' }, eos_token_id: [1, 2] }, 'x');
  assert.equal(c2.ropeScaling?.factor, 32);
  assert.deepEqual(c2.eosTokenIds, [1, 2]);
});

test('defaults: kv heads, head_dim, rope_theta, tie, attention_bias', () => {
  const minimal = {
    architectures: ['MistralForCausalLM'],
    hidden_size: 256,
    intermediate_size: 512,
    num_hidden_layers: 2,
    num_attention_heads: 8,
    rms_norm_eps: 1e-6,
    vocab_size: 1000,
    max_position_embeddings: 2048,
  };
  const c = parseHfConfig(minimal, 'x');
  assert.equal(c.numKvHeads, 8);
  assert.equal(c.headDim, 32);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.ropeScaling, null);
  assert.equal(c.tieWordEmbeddings, false);
  assert.equal(c.qkvBias, false);
  assert.equal(c.oBias, false);
  assert.equal(c.bosTokenId, undefined);
  assert.deepEqual(c.eosTokenIds, []);
  const biased = parseHfConfig({ ...minimal, attention_bias: true, rope_scaling: null }, 'x');
  assert.equal(biased.qkvBias, true);
  assert.equal(biased.oBias, true);
});

test('Qwen2 implies q/k/v bias without o_proj bias', () => {
  const c = parseHfConfig(qwen2, 'x');
  assert.equal(c.headDim, 64);
  assert.equal(c.qkvBias, true);
  assert.equal(c.oBias, false);
  const shapes = expectedWeightShapes(c);
  assert.deepEqual(shapes.get('model.layers.0.self_attn.q_proj.bias'), [896]);
  assert.deepEqual(shapes.get('model.layers.0.self_attn.k_proj.bias'), [128]);
  assert.deepEqual(shapes.get('model.layers.23.self_attn.v_proj.bias'), [128]);
  assert.equal(shapes.has('model.layers.0.self_attn.o_proj.bias'), false);
  assert.equal(shapes.has('lm_head.weight'), false);
});

test('errors name the file and the problem', () => {
  expectErr(() => parseHfConfig({ ...llama32, architectures: ['GPT2LMHeadModel'] }, 'dir/config.json'), ['dir/config.json', 'GPT2LMHeadModel']);
  expectErr(() => parseHfConfig({ ...llama32, rope_scaling: { type: 'yarn', factor: 4 } }, 'dir/config.json'), [
    'dir/config.json',
    'yarn',
    'llama3',
  ]);
  expectErr(() => parseHfConfig({ ...llama32, hidden_size: 'big' }, 'c.json'), ['c.json', 'hidden_size']);
  expectErr(() => parseHfConfig({ ...llama32, num_key_value_heads: 5 }, 'c.json'), ['c.json', 'num_key_value_heads']);
  expectErr(() => parseHfConfig({ ...llama32, hidden_act: 'gelu' }, 'c.json'), ['c.json', 'gelu']);
  expectErr(() => parseHfConfig({ ...llama32, rope_scaling: { rope_type: 'llama3', factor: 8 } }, 'c.json'), ['c.json', 'low_freq_factor']);
  expectErr(() => parseHfConfig('nope', 'c.json'), ['c.json']);
});

test('expectedWeightShapes lists every Llama weight with its shape', () => {
  const c = parseHfConfig({ ...llama32, num_hidden_layers: 2, tie_word_embeddings: false }, 'x');
  const s = expectedWeightShapes(c);
  // 1 embedding + 2 layers × 9 + final norm + lm_head.
  assert.equal(s.size, 1 + 2 * 9 + 1 + 1);
  assert.deepEqual(s.get('model.embed_tokens.weight'), [128256, 2048]);
  assert.deepEqual(s.get('model.layers.1.input_layernorm.weight'), [2048]);
  assert.deepEqual(s.get('model.layers.1.self_attn.q_proj.weight'), [32 * 64, 2048]);
  assert.deepEqual(s.get('model.layers.1.self_attn.k_proj.weight'), [8 * 64, 2048]);
  assert.deepEqual(s.get('model.layers.1.self_attn.v_proj.weight'), [8 * 64, 2048]);
  assert.deepEqual(s.get('model.layers.1.self_attn.o_proj.weight'), [2048, 32 * 64]);
  assert.deepEqual(s.get('model.layers.1.post_attention_layernorm.weight'), [2048]);
  assert.deepEqual(s.get('model.layers.1.mlp.gate_proj.weight'), [8192, 2048]);
  assert.deepEqual(s.get('model.layers.1.mlp.up_proj.weight'), [8192, 2048]);
  assert.deepEqual(s.get('model.layers.1.mlp.down_proj.weight'), [2048, 8192]);
  assert.deepEqual(s.get('model.norm.weight'), [2048]);
  assert.deepEqual(s.get('lm_head.weight'), [128256, 2048]);
  assert.equal(s.has('model.layers.2.input_layernorm.weight'), false);

  const ok = new Map(s);
  checkWeightShapes(c, (n) => ok.get(n), 'model.safetensors');
  const wrong = new Map(s);
  wrong.set('model.layers.1.mlp.down_proj.weight', [8192, 2048]);
  expectErr(() => checkWeightShapes(c, (n) => wrong.get(n), 'model.safetensors'), [
    'model.safetensors',
    'model.layers.1.mlp.down_proj.weight',
    '[8192, 2048]',
    '[2048, 8192]',
  ]);
  const missing = new Map(s);
  missing.delete('lm_head.weight');
  expectErr(() => checkWeightShapes(c, (n) => missing.get(n), 'model.safetensors'), ['lm_head.weight', 'missing']);
});

test('loadHfConfig reads config.json from a directory', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-cfg-'));
  await fs.writeFile(path.join(dir, 'config.json'), JSON.stringify(qwen2));
  const { config, raw } = await loadHfConfig(dir);
  assert.equal(config.architecture, 'Qwen2ForCausalLM');
  assert.equal(raw.sliding_window, 131072);
  await fs.writeFile(path.join(dir, 'config.json'), '{"architectures": [');
  await assert.rejects(loadHfConfig(dir), (e: unknown) => e instanceof EdgeloraError && e.describe().includes('config.json'));
  await fs.rm(path.join(dir, 'config.json'));
  await assert.rejects(loadHfConfig(dir), (e: unknown) => e instanceof EdgeloraError && e.describe().includes('config.json'));
  await fs.rm(dir, { recursive: true });
});
