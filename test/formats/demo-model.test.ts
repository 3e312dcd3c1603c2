// Demo checkpoints: determinism (byte-identical files per seed), Hugging Face layout that our own
// loaders accept, parameter counts, and the init statistics.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { makeDemoModel, DEMO_PRESETS, demoParamCount, demoConfigJson } from '../../src/formats/demo-model.js';
import { SafetensorsReader } from '../../src/formats/safetensors.js';
import { loadHfConfig, checkWeightShapes, expectedWeightShapes } from '../../src/formats/hf-config.js';
import { loadTokenizer } from '../../src/formats/tokenizer.js';
import { EdgeloraError } from '../../src/util/errors.js';

const FILES = ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'];

test('tiny demo model: deterministic, loadable, shapes match config.json', async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-demo-'));
  const a = await makeDemoModel(path.join(root, 'a'), { preset: 'tiny', seed: 1 });
  const b = await makeDemoModel(path.join(root, 'b'), { preset: 'tiny', seed: 1 });
  const c = await makeDemoModel(path.join(root, 'c'), { preset: 'tiny', seed: 2 });
  assert.deepEqual((await fs.readdir(a.dir)).sort(), FILES);
  for (const f of FILES) {
    const fa = await fs.readFile(path.join(a.dir, f));
    const fb = await fs.readFile(path.join(b.dir, f));
    assert.ok(fa.equals(fb), `${f} differs between two runs with the same seed`);
  }
  const wa = await fs.readFile(path.join(a.dir, 'model.safetensors'));
  const wc = await fs.readFile(path.join(c.dir, 'model.safetensors'));
  assert.ok(!wa.equals(wc), 'different seeds should give different weights');

  const { config } = await loadHfConfig(a.dir);
  const spec = DEMO_PRESETS.tiny;
  assert.equal(config.architecture, 'LlamaForCausalLM');
  assert.equal(config.hiddenSize, spec.hiddenSize);
  assert.equal(config.numKvHeads, spec.numKvHeads);
  assert.equal(config.tieWordEmbeddings, true);
  const tok = await loadTokenizer(a.dir);
  assert.ok(tok.vocabSize <= config.vocabSize, `tokenizer ${tok.vocabSize} ids > vocab_size ${config.vocabSize}`);
  assert.equal(config.vocabSize % 64, 0);
  assert.equal(config.bosTokenId, tok.bosTokenId);
  assert.deepEqual(config.eosTokenIds, tok.eosTokenIds);

  const r = await SafetensorsReader.open(a.dir);
  try {
    checkWeightShapes(config, (n) => (r.has(n) ? r.info(n).shape : undefined), a.dir);
    assert.deepEqual(r.names(), [...expectedWeightShapes(config).keys()].sort(), 'no extra tensors');
    let params = 0;
    for (const n of r.names()) {
      assert.equal(r.info(n).dtype, 'F32');
      params += r.info(n).shape.reduce((x, y) => x * y, 1);
    }
    assert.equal(params, a.params);
    assert.equal(params, demoParamCount('tiny'));
    assert.ok(params > 0.5e6 && params < 1.5e6, `tiny should be ~1M parameters, has ${params}`);
    // Init statistics: linears N(0, 0.02²), norms 1 + 0.1·N(0, 1). Tolerances cover sampling noise
    // (n = 16384 for q_proj: the std estimate's relative error is ~1/sqrt(2n) ≈ 0.6%).
    const STD_TOL = 0.05; // relative
    const q = await r.readF32('model.layers.0.self_attn.q_proj.weight');
    const { mean, std } = stats(q);
    assert.ok(Math.abs(mean) < 0.02 * 0.05, `q_proj mean ${mean}`);
    assert.ok(Math.abs(std / 0.02 - 1) < STD_TOL, `q_proj std ${std}, want 0.02`);
    const norm = stats(await r.readF32('model.layers.1.input_layernorm.weight'));
    assert.ok(Math.abs(norm.mean - 1) < 0.05 && norm.std > 0.05 && norm.std < 0.15, `norm mean ${norm.mean} std ${norm.std}`);
  } finally {
    await r.close();
  }

  await assert.rejects(makeDemoModel(a.dir, { preset: 'tiny' }), (e: unknown) => e instanceof EdgeloraError && e.describe().includes(a.dir));
  const again = await makeDemoModel(a.dir, { preset: 'tiny', seed: 2, replace: true });
  assert.ok((await fs.readFile(path.join(again.dir, 'model.safetensors'))).equals(wc));
  // Only the three model directories remain: no temporary siblings.
  assert.deepEqual((await fs.readdir(root)).sort(), ['a', 'b', 'c']);
  await fs.rm(root, { recursive: true });
});

test('small preset is ~100M parameters with vocab 32000 (computed, not written)', () => {
  const cfg = demoConfigJson('small');
  assert.equal(cfg.vocab_size, 32000);
  assert.equal(cfg.hidden_size, 768);
  const n = demoParamCount('small');
  // Independent count: tied embedding V·C + per layer (q,o: C·C; k,v: C·G·D; 3 MLP: C·F; 2 norms) + final norm.
  const C = 768;
  const GD = 4 * 64;
  const F = 2048;
  const perLayer = 2 * C * C + 2 * C * GD + 3 * C * F + 2 * C;
  assert.equal(n, 32000 * C + 12 * perLayer + C);
  assert.ok(n > 90e6 && n < 110e6, `small has ${n} parameters`);
});

function stats(x: Float32Array): { mean: number; std: number } {
  let s = 0;
  for (const v of x) s += v;
  const mean = s / x.length;
  let ss = 0;
  for (const v of x) ss += (v - mean) ** 2;
  return { mean, std: Math.sqrt(ss / x.length) };
}
