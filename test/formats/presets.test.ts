// The real-shape demo presets carry the published shapes (checked through the config parser and the parameter
// count, without writing any weights), and their padded tokenizer gives every id of the vocabulary a token.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildPaddedTokenizer, buildDemoTokenizer, demoConfigJson, demoParamCount } from '../../src/formats/demo-model.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';

// Parameter counts of the published checkpoints (tied embeddings counted once).
const PUBLISHED = [
  { preset: 'qwen2.5-0.5b', params: 494_032_768, C: 896, layers: 24, H: 14, G: 2, D: 64, F: 4864, V: 151_936, qkvBias: true, rope: null, theta: 1e6 },
  { preset: 'llama-3.2-1b', params: 1_235_814_400, C: 2048, layers: 16, H: 32, G: 8, D: 64, F: 8192, V: 128_256, qkvBias: false, rope: 32, theta: 5e5 },
  { preset: 'smollm2-360m', params: 361_821_120, C: 960, layers: 32, H: 15, G: 5, D: 64, F: 2560, V: 49_152, qkvBias: false, rope: null, theta: 1e5 },
] as const;

for (const p of PUBLISHED) {
  test(`${p.preset}: published shapes, bf16, tied, ${p.params} parameters`, () => {
    const json = demoConfigJson(p.preset);
    const cfg = parseHfConfig(json, p.preset);
    assert.deepEqual(
      [cfg.hiddenSize, cfg.numLayers, cfg.numHeads, cfg.numKvHeads, cfg.headDim, cfg.intermediateSize, cfg.vocabSize, cfg.qkvBias, cfg.tieWordEmbeddings, cfg.ropeTheta],
      [p.C, p.layers, p.H, p.G, p.D, p.F, p.V, p.qkvBias, true, p.theta],
    );
    assert.equal(cfg.ropeScaling?.factor ?? null, p.rope);
    assert.equal(json.torch_dtype, 'bfloat16');
    assert.equal(demoParamCount(p.preset), p.params);
  });
}

test('the padded tokenizer gives every id below vocab_size a distinct token and leaves the demo ids alone', () => {
  const V = 4096;
  const base = buildDemoTokenizer();
  const tok = buildPaddedTokenizer(V);
  const vocab = (tok.tokenizerJson.model as { vocab: Record<string, number> }).vocab;
  const added = (tok.tokenizerJson.added_tokens as { id: number }[]).map((t) => t.id);
  const ids = new Set([...Object.values(vocab), ...added]);
  assert.equal(ids.size, V);
  for (let i = 0; i < V; i++) assert.ok(ids.has(i), `id ${i} has no token`);
  assert.deepEqual(tok.ids, base.ids);
  assert.throws(() => buildPaddedTokenizer(base.size - 1), /below the tokenizer/);
});
