// GGUF against llama.cpp itself (node-llama-cpp 3.21.1's prebuilt CPU build): the imported model's
// logits on the same file, greedy tokens, tokenizer ids, and our exported LoRA adapter on our exported
// base. Every comparison prints its max difference; tolerances are named and derived below.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { T, handmadeLlama, demoVocab, spmVocab } from '../helpers/gguf-handmade.js';
import { llamaLogProbs, llamaGreedy, llamaTokenize, compareLogProbs } from '../helpers/llama-cpp.js';
import { randomAdapter } from '../helpers/adapters.js';
import { buildDemoTokenizer, makeDemoModel } from '../../src/formats/demo-model.js';
import { importGguf } from '../../src/formats/gguf/import.js';
import { exportGgufBase, exportGgufAdapter } from '../../src/formats/gguf/export.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { generate } from '../../src/runtime/generate.js';
import { quantizeModel } from '../../src/model/quantize.js';
import { LINEAR_PROJS } from '../../src/model/llama.js';

/** Float weights, float activations on both sides: float32 rounding only. */
const TOL_FLOAT = 1e-3;
/**
 * llama.cpp's CPU kernels round the activations before each quantized matmul: to 8 bits (Q8_0 / Q8_1
 * blocks of 32 for Q4_0/Q4_1/Q5_0/Q8_0 weights, Q8_K blocks of 256 for Q4_K/Q6_K), to bf16 for BF16 weights. edgelora
 * keeps them float32 (accuracy level 0), so the two differ by llama.cpp's rounding, not ours:
 *   8 bits: step amax/127 per block, rms error (amax/rms)/(127·√12) ≈ 3.9/440 ≈ 8.9e-3 of an activation
 *   (amax ≈ 3.9 rms for 256 Gaussian values); 14 linears (2 layers × 7) add independent errors,
 *   ·√14 → 3.3e-2 rms of the logits' scale; the max over ~7k compared log-probs is ≈ 3 rms → 0.1.
 *   bf16: unit roundoff 2^-8, rms 2^-8/√3 ≈ 2.3e-3, ·√14 → 8.4e-3, ·3 → 2.5e-2.
 * A decoder that misplaces nibbles, scales or rows is off by O(1) of the scale (see the negative check).
 */
const TOL_ACT8 = 0.1;
const TOL_BF16 = 2.5e-2;

let tmp: { dir: string; cleanup: () => void };
const vocab = demoVocab(buildDemoTokenizer().tokenizerJson as never);
const ids = [vocab.bos, 40, 300, 12, 45, 99, 250, 3, 600, 17, 18, 19, 77, 5, 200, 31];

before(() => {
  tmp = tempDir('edgelora-gguf-llama-');
});
after(() => tmp.cleanup());

async function ourLogits(dir: string, lora?: string): Promise<{ logits: Float32Array; V: number }> {
  const rt = await ModelRuntime.load(dir, { sessionOptions: { intraOpNumThreads: 1 } });
  let feeds;
  if (lora) {
    const mgr = new AdapterManager(rt);
    mgr.activate(await mgr.load(lora), 1);
    feeds = mgr.feeds();
  }
  const r = await rt.forward({ ids: [ids], ...(feeds ? { lora: feeds } : {}) });
  return { logits: r.logits, V: r.dims[2] };
}

const HANDMADE: [string, number, number, number?][] = [
  ['F32', T.F32, TOL_FLOAT],
  ['F16', T.F16, TOL_FLOAT],
  ['BF16', T.BF16, TOL_BF16],
  ['Q8_0', T.Q8_0, TOL_ACT8],
  ['Q6_K', T.Q6_K, TOL_ACT8],
  ['Q5_0', T.Q5_0, TOL_ACT8],
  ['Q4_0', T.Q4_0, TOL_ACT8],
  ['Q4_1', T.Q4_1, TOL_ACT8],
  ['Q4_K', T.Q4_K, TOL_ACT8],
  // Like llama.cpp's Q4_K_M: attn_v and ffn_down in Q6_K, so a q/k/v group mixes 4- and 8-bit weights.
  ['Q4_K+Q6_K', T.Q4_K, TOL_ACT8, T.Q6_K],
];

for (const [name, type, tol, mixed] of HANDMADE) {
  test(`hand-made ${name} GGUF: imported logits = llama.cpp's on the same file (rel ≤ ${tol}); on its f32 export (rel ≤ ${TOL_FLOAT})`, async () => {
    const f = path.join(tmp.dir, `hm-${name}.gguf`);
    const m = handmadeLlama(f, type, vocab, 11, mixed === undefined ? {} : { mixed });
    const dir = path.join(tmp.dir, `hm-${name}`);
    await importGguf(f, dir, { accuracyLevel: 0 });
    const ours = await ourLogits(dir);
    const same = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f, ids, m.vocab));
    console.log(`${name}: vs llama.cpp on the file: max |Δ log-prob| ${same.maxAbs.toExponential(3)}, scale ${same.scale.toFixed(2)}, rel ${same.rel.toExponential(3)} (tolerance ${tol})`);
    assert.ok(same.compared > ids.length * 100, 'compared most of the vocabulary');
    assert.ok(same.rel <= tol, `${name}: rel ${same.rel} > ${tol} (max |Δ| ${same.maxAbs})`);
    // The same weights as f32 (our exporter), where llama.cpp keeps activations float: the strict check
    // of the graph, the q/k un-permutation and rope.
    const f32 = path.join(tmp.dir, `hm-${name}-f32.gguf`);
    await exportGgufBase(dir, f32, { type: 'f32', tableType: 'f32' });
    const strict = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f32, ids, m.vocab));
    console.log(`${name}: vs llama.cpp on its f32 export: max |Δ| ${strict.maxAbs.toExponential(3)}, rel ${strict.rel.toExponential(3)} (tolerance ${TOL_FLOAT})`);
    assert.ok(strict.rel <= TOL_FLOAT, `${name} as f32: rel ${strict.rel} > ${TOL_FLOAT} (max |Δ| ${strict.maxAbs})`);
  });
}

test(`hand-made qwen2 Q8_0 GGUF (q/k/v biases, no q/k permutation): imported logits = llama.cpp's (rel ≤ ${TOL_ACT8}; f32 export ≤ ${TOL_FLOAT})`, async () => {
  const f = path.join(tmp.dir, 'hm-qwen2.gguf');
  const m = handmadeLlama(f, T.Q8_0, vocab, 13, { arch: 'qwen2' });
  const dir = path.join(tmp.dir, 'hm-qwen2');
  await importGguf(f, dir, { accuracyLevel: 0 });
  const ours = await ourLogits(dir);
  const same = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f, ids, m.vocab));
  const f32 = path.join(tmp.dir, 'hm-qwen2-f32.gguf');
  await exportGgufBase(dir, f32, { type: 'f32', tableType: 'f32' });
  const strict = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f32, ids, m.vocab));
  console.log(`qwen2 Q8_0: on the file rel ${same.rel.toExponential(3)} (tolerance ${TOL_ACT8}); f32 export rel ${strict.rel.toExponential(3)} (tolerance ${TOL_FLOAT})`);
  assert.ok(same.rel <= TOL_ACT8, `qwen2: rel ${same.rel} (max |Δ| ${same.maxAbs})`);
  assert.ok(strict.rel <= TOL_FLOAT, `qwen2 as f32: rel ${strict.rel} (max |Δ| ${strict.maxAbs})`);
});

test('negative check: the same Q4_0 file read as another seed is far outside TOL_ACT8', async () => {
  // Guards the tolerance's power: a model whose weights are all different must not pass.
  const f = path.join(tmp.dir, 'neg-a.gguf');
  const g = path.join(tmp.dir, 'neg-b.gguf');
  const m = handmadeLlama(f, T.Q4_0, vocab, 11);
  handmadeLlama(g, T.Q4_0, vocab, 12);
  const dir = path.join(tmp.dir, 'neg-b');
  await importGguf(g, dir, { accuracyLevel: 0 });
  const ours = await ourLogits(dir);
  const c = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f, ids, m.vocab));
  console.log(`negative: rel ${c.rel.toExponential(3)}`);
  assert.ok(c.rel > 3 * TOL_ACT8, `a different model came within ${c.rel}`);
});

test('GGUF written by our exporter (f32, q8_0, q4_0) imports to llama.cpp-equal logits', async () => {
  const hf = await tinyCheckpoint(tmp.dir, 5);
  const fp32 = await quantized(hf, tmp.dir, 'fp32', { format: 'fp32' });
  for (const [type, tol] of [['f32', TOL_FLOAT], ['q8_0', TOL_ACT8], ['q4_0', TOL_ACT8]] as const) {
    const f = path.join(tmp.dir, `ours-${type}.gguf`);
    await exportGgufBase(fp32, f, { type, tableType: 'f32' });
    const dir = path.join(tmp.dir, `ours-${type}`);
    await importGguf(f, dir, { accuracyLevel: 0 });
    const ours = await ourLogits(dir);
    const c = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(f, ids, ours.V));
    console.log(`exported ${type}: max |Δ| ${c.maxAbs.toExponential(3)}, rel ${c.rel.toExponential(3)} (tolerance ${tol})`);
    assert.ok(c.rel <= tol, `${type}: rel ${c.rel} > ${tol}`);
  }
});

test('our LoRA adapter GGUF on our f32 base in llama.cpp = edgelora with the adapter (r8 q,v; r16 all seven)', async () => {
  const hf = await tinyCheckpoint(path.join(tmp.dir, 'lora'), 6);
  const fp32 = await quantized(hf, tmp.dir, 'fp32-lora', { format: 'fp32' });
  const base = path.join(tmp.dir, 'lora-base.gguf');
  await exportGgufBase(fp32, base, { type: 'f32', tableType: 'f32' });
  const { readManifest } = await import('../../src/model/manifest.js');
  const { parseHfConfig } = await import('../../src/formats/hf-config.js');
  const man = await readManifest(fp32);
  const cfg = parseHfConfig(man.sourceConfig, fp32);
  const noLora = await ourLogits(fp32);
  for (const [label, r, alpha, targets] of [['r8 q,v', 8, 16, ['q_proj', 'v_proj']], ['r16 all seven', 16, 32, [...LINEAR_PROJS]]] as const) {
    const adir = path.join(tmp.dir, `lora-${r}`);
    await randomAdapter(adir, cfg, { r, alpha, targets: [...targets], seed: r, fingerprint: man.fingerprint, std: 0.08 });
    const gg = path.join(tmp.dir, `lora-${r}.gguf`);
    await exportGgufAdapter(adir, gg, fp32);
    const ours = await ourLogits(fp32, adir);
    const c = compareLogProbs(ours.logits, ours.V, await llamaLogProbs(base, ids, ours.V, gg));
    // The adapter must matter, or the check says nothing.
    const moved = compareLogProbs(noLora.logits, noLora.V, await llamaLogProbs(base, ids, ours.V, gg));
    console.log(`LoRA ${label}: max |Δ| ${c.maxAbs.toExponential(3)}, rel ${c.rel.toExponential(3)} (tolerance ${TOL_FLOAT}); without the adapter rel ${moved.rel.toExponential(3)}`);
    assert.ok(moved.rel > 100 * TOL_FLOAT, `${label}: the adapter hardly changes the logits (${moved.rel})`);
    assert.ok(c.rel <= TOL_FLOAT, `${label}: rel ${c.rel} > ${TOL_FLOAT} (max |Δ| ${c.maxAbs})`);
  }
});

test('llama3 rope scaling travels as rope_freqs: llama.cpp on our export = edgelora over 160 positions; import recovers rope_scaling', async () => {
  const { promises: fs } = await import('node:fs');
  const { readManifest } = await import('../../src/model/manifest.js');
  const hf = await tinyCheckpoint(path.join(tmp.dir, 'rope'), 8);
  const plain = await quantized(hf, tmp.dir, 'rope-plain', { format: 'fp32' });
  // low 1 / high 8 / original 256 puts three of the 16 frequencies (head_dim 32) in the blend, so the
  // parameters are fitted, not guessed.
  const scaling = { rope_type: 'llama3', factor: 16, low_freq_factor: 1, high_freq_factor: 8, original_max_position_embeddings: 256 };
  const cfgFile = path.join(hf, 'config.json');
  const raw = JSON.parse(await fs.readFile(cfgFile, 'utf8')) as Record<string, unknown>;
  await fs.writeFile(cfgFile, JSON.stringify({ ...raw, rope_theta: 500000, rope_scaling: scaling }));
  const scaled = await quantized(hf, tmp.dir, 'rope-scaled', { format: 'fp32' });
  const f = path.join(tmp.dir, 'rope-scaled.gguf');
  await exportGgufBase(scaled, f, { type: 'f32', tableType: 'f32' });
  const long = Array.from({ length: 160 }, (_, i) => (i * 37 + 11) % 600);
  const logitsOf = async (dir: string) => {
    const rt = await ModelRuntime.load(dir, { sessionOptions: { intraOpNumThreads: 1 } });
    const r = await rt.forward({ ids: [long] });
    return { logits: r.logits, V: r.dims[2] };
  };
  const ours = await logitsOf(scaled);
  const ref = await llamaLogProbs(f, long, ours.V);
  const c = compareLogProbs(ours.logits, ours.V, ref);
  const plainOurs = await logitsOf(plain);
  const off = compareLogProbs(plainOurs.logits, plainOurs.V, ref);
  console.log(`llama3 rope: rel ${c.rel.toExponential(3)} (tolerance ${TOL_FLOAT}); the same weights without rope scaling: rel ${off.rel.toExponential(3)}`);
  assert.ok(c.rel <= TOL_FLOAT, `llama3 rope: rel ${c.rel} (max |Δ| ${c.maxAbs})`);
  assert.ok(off.rel > 5 * TOL_FLOAT, `rope scaling hardly matters here (${off.rel}): the check would not see it`);
  const back = path.join(tmp.dir, 'rope-imported');
  await importGguf(f, back, { accuracyLevel: 0 });
  const rs = (await readManifest(back)).sourceConfig.rope_scaling as typeof scaling;
  console.log(`recovered rope_scaling ${JSON.stringify(rs)}`);
  assert.equal(rs.rope_type, 'llama3');
  assert.equal(rs.factor, 16);
  assert.equal(rs.original_max_position_embeddings, 256);
  assert.ok(Math.abs(rs.low_freq_factor - 1) < 1e-4 && Math.abs(rs.high_freq_factor - 8) < 1e-4, 'low/high fitted back');
  const again = await logitsOf(back);
  const d = compareLogProbs(again.logits, again.V, ref);
  assert.ok(d.rel <= TOL_FLOAT, `imported llama3 model: rel ${d.rel}`);
});

test('SentencePiece vocabulary (tokenizer.ggml.model "llama"): imported tokenizer ids = llama.cpp tokenize', async () => {
  const { Rng } = await import('../../src/util/rng.js');
  const { loadTokenizer } = await import('../../src/formats/tokenizer.js');
  const words = ['the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'hello', 'world', 'there', 'then', 'quiet', 'brow'];
  const spm = spmVocab(words, new Rng(21));
  const f = path.join(tmp.dir, 'spm.gguf');
  handmadeLlama(f, T.Q8_0, vocab, 21, { spm });
  const dir = path.join(tmp.dir, 'spm');
  await importGguf(f, dir);
  const tok = await loadTokenizer(dir);
  for (const text of ['The quick brown fox jumps over the lazy dog.', 'hello  world', 'then there, quietly!', 'naïve café ☃ Zebra', ' leading space', 'brow brown browse']) {
    const ours = tok.encode(text);
    const theirs = await llamaTokenize(f, text);
    console.log(`${JSON.stringify(text)} → ${ours.length} ids: ${ours.join(" ")}`);
    assert.deepEqual(ours, theirs, `ids for ${JSON.stringify(text)}`);
    assert.equal(tok.decode(ours), text, `decode round trip of ${JSON.stringify(text)}`);
  }
});

test('small preset in F32: greedy tokens equal llama.cpp for 32 tokens; tokenizer ids equal', async () => {
  const hf = path.join(tmp.dir, 'small-hf');
  await makeDemoModel(hf, { preset: 'small', seed: 1 });
  const fp32 = path.join(tmp.dir, 'small-fp32');
  await quantizeModel(hf, fp32, { format: 'fp32', blockSize: 64, doubleQuant: false });
  const f = path.join(tmp.dir, 'small-f32.gguf');
  await exportGgufBase(fp32, f, { type: 'f32', tableType: 'f32' });
  const dir = path.join(tmp.dir, 'small-imported');
  await importGguf(f, dir);
  const rt = await ModelRuntime.load(dir, { sessionOptions: { intraOpNumThreads: 1 } });
  const text = 'The quick brown fox jumps over the lazy dog. Hello! How are you today? 2024, 42 and 100.';
  const ourIds = rt.tokenizer.encode(text);
  const theirs = await llamaTokenize(f, text);
  assert.deepEqual(ourIds, theirs, 'imported tokenizer ids = llama.cpp tokenize');
  const prompt = [rt.tokenizer.bosTokenId!, ...ourIds];
  const got = await generate(rt, prompt, { maxNewTokens: 32, seed: 1, temperature: 0, topK: 0, topP: 1, stopAtEos: false });
  const ref = await llamaGreedy(f, prompt, 32);
  const firstDiff = got.tokenIds.findIndex((t, i) => t !== ref[i]);
  console.log(`greedy: ${got.tokenIds.length} tokens, first difference at ${firstDiff}`);
  assert.deepEqual(got.tokenIds, ref);
});
