// The ONNX graph (ORT's kernels: MatMul, MatMulBnb4, MatMulNBits) against the independent TypeScript
// reference forward on the same dequantized weights; KV-cache decode against full recomputation;
// a bnb-4bit checkpoint with double quantization against the direct nf4 path.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized, dequantizedWeights } from '../helpers/fixtures.js';
import { referenceForward, relError } from '../helpers/reference.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { SafetensorsReader, writeSafetensors } from '../../src/formats/safetensors.js';
import { writeBnbWeight } from '../../src/quant/bnb-checkpoint.js';
import { promises as fs } from 'node:fs';
import { LINEAR_PROJS, linearWeightName, linearShape } from '../../src/model/llama.js';
import { Rng } from '../../src/util/rng.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { randomAdapter, refLoras } from '../helpers/adapters.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';

/** Graph vs reference on float weights: float32 kernels, different summation order. */
const TOL_GRAPH = 1e-4;
/** int4 at accuracy_level 4: activations are quantized to int8 inside MatMulNBits (≈ 1/127 steps). */
const TOL_INT4_ACC4 = 3e-2;

const tmp = tempDir();
let hf = '';
const PROMPT = 'The quick brown fox jumps over the lazy dog. 12345!';

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
});
after(() => tmp.cleanup());

async function checkAgainstReference(dir: string, tol: number, label: string): Promise<void> {
  const rt = await ModelRuntime.load(dir);
  try {
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const res = await rt.forward({ ids: [ids] });
    const { cfg, W } = await dequantizedWeights(dir);
    const ref = referenceForward(cfg, W, ids);
    const e = relError(res.logits, ref);
    assert.ok(e.rel < tol, `${label}: logits differ from the reference: rel ${e.rel.toExponential(3)} (max abs ${e.maxAbs.toExponential(3)} at ${e.at}) > ${tol}`);
  } finally {
    await rt.release();
  }
}

/** The tiny checkpoint rewritten in Hugging Face's bnb-4bit layout by the project's own quantizer, nf4. */
async function bnbCheckpoint(name: string, opts: (weight: string) => { blockSize: number; doubleQuant: boolean }): Promise<string> {
  const bnbDir = path.join(tmp.dir, name);
  await fs.mkdir(bnbDir);
  const reader = await SafetensorsReader.open(hf);
  const cfgJson = JSON.parse(await fs.readFile(path.join(hf, 'config.json'), 'utf8')) as Record<string, unknown>;
  const cfg = parseHfConfig(cfgJson, 'config.json');
  const linear = new Set<string>();
  for (let l = 0; l < cfg.numLayers; l++) for (const p of LINEAR_PROJS) linear.add(linearWeightName(l, p));
  const entries = [];
  for (const name of reader.names()) {
    const info = reader.info(name);
    if (linear.has(name)) {
      for (const t of writeBnbWeight(name, await reader.readF32(name), [info.shape[0]!, info.shape[1]!], { quantType: 'nf4', ...opts(name) })) {
        entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, data: t.data });
      }
    } else {
      entries.push({ name, dtype: info.dtype, shape: [...info.shape], data: await reader.readRaw(name) });
    }
  }
  await reader.close();
  await writeSafetensors(path.join(bnbDir, 'model.safetensors'), entries);
  for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) await fs.copyFile(path.join(hf, f), path.join(bnbDir, f));
  return bnbDir;
}

for (const format of ['fp32', 'nf4', 'fp4'] as const) {
  test(`${format} graph logits equal the TypeScript reference forward (rel < ${TOL_GRAPH})`, async () => {
    await checkAgainstReference(await quantized(hf, tmp.dir, `m-${format}`, { format }), TOL_GRAPH, format);
  });
}

test(`int4 (accuracy_level 0) graph logits equal the reference (rel < ${TOL_GRAPH})`, async () => {
  await checkAgainstReference(await quantized(hf, tmp.dir, 'm-int4-a0', { format: 'int4', int4AccuracyLevel: 0 }), TOL_GRAPH, 'int4 acc0');
});

test(`int4 (accuracy_level 4, int8 activations) stays within ${TOL_INT4_ACC4} of the reference`, async () => {
  await checkAgainstReference(await quantized(hf, tmp.dir, 'm-int4-a4', { format: 'int4' }), TOL_INT4_ACC4, 'int4 acc4');
});

// A quantized vocabulary table: the lookup (GatherBlockQuantized) and the lm_head (MatMulNBits at accuracy_level 4,
// int8 activations) against the reference forward on the dequantized table.
for (const [format, embeddings] of [['nf4', 'int8'], ['int4', 'int8'], ['int4', 'int4'], ['fp32', 'int8']] as const) {
  test(`${format} with an ${embeddings} table stays within ${TOL_INT4_ACC4} of the reference on the dequantized table`, async () => {
    const dir = await quantized(hf, tmp.dir, `m-${format}-${embeddings}`, { format, embeddings });
    await checkAgainstReference(dir, TOL_INT4_ACC4, `${format} + ${embeddings} table`);
  });
}

test('decode with the KV cache equals recomputing the whole sequence', async () => {
  const dir = await quantized(hf, tmp.dir, 'm-kv', { format: 'nf4' });
  const rt = await ModelRuntime.load(dir);
  try {
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const V = rt.cfg.vocabSize;
    const full = await rt.forward({ ids: [ids] });
    // Prefill 5 tokens, then decode the rest one by one.
    let step = await rt.forward({ ids: [ids.slice(0, 5)] });
    let worst = 0;
    for (let t = 5; t < ids.length; t++) {
      step = await rt.forward({ ids: [[ids[t]!]], cache: step.cache });
      const e = relError(step.logits, full.logits.subarray(t * V, (t + 1) * V));
      worst = Math.max(worst, e.rel);
    }
    assert.equal(step.cache.length, ids.length);
    assert.ok(worst < 1e-5, `cached decode differs from recomputation: rel ${worst.toExponential(3)}`);
  } finally {
    await rt.release();
  }
});

test('a right-padded batch gives each row the logits it gets alone, at prefill and through decode', async () => {
  const dir = path.join(tmp.dir, 'm-kv');
  const rt = await ModelRuntime.load(dir);
  try {
    const a = rt.tokenizer.encode('short row', { addSpecialTokens: true });
    const b = rt.tokenizer.encode('a somewhat longer second row of text', { addSpecialTokens: true });
    const T = b.length;
    const V = rt.cfg.vocabSize;
    const padded = [...a, ...new Array<number>(T - a.length).fill(rt.tokenizer.padTokenId)];
    const mask = [new Uint8Array(T).fill(1, 0, a.length), new Uint8Array(T).fill(1)];
    let batch = await rt.forward({ ids: [padded, b], mask });
    let soloA = await rt.forward({ ids: [a] });
    let soloB = await rt.forward({ ids: [b] });
    const e = relError(batch.logits.subarray(0, a.length * V), soloA.logits);
    assert.ok(e.rel < 1e-5, `padded row differs: rel ${e.rel}`);
    assert.deepEqual(batch.cache.lengths, [a.length, b.length]);
    // Continued by decode: each row's new token goes at its own real length.
    let worst = 0;
    for (const [x, y] of [[7, 11], [13, 17], [19, 23]] as const) {
      batch = await rt.forward({ ids: [[x], [y]], cache: batch.cache });
      soloA = await rt.forward({ ids: [[x]], cache: soloA.cache });
      soloB = await rt.forward({ ids: [[y]], cache: soloB.cache });
      worst = Math.max(worst, relError(batch.logits.subarray(0, V), soloA.logits).rel, relError(batch.logits.subarray(V, 2 * V), soloB.logits).rel);
    }
    assert.deepEqual(batch.cache.lengths, [a.length + 3, b.length + 3]);
    assert.ok(worst < 1e-5, `batched decode differs from each row alone: rel ${worst.toExponential(3)}`);
  } finally {
    await rt.release();
  }
});

test('a bnb-4bit checkpoint with double quantization converts without re-quantizing and equals the direct nf4 path', async () => {
  // Fixture: the project's own quantizer writes the tiny checkpoint in Hugging Face's bnb-4bit layout.
  const bnbDir = await bnbCheckpoint('hf-bnb', () => ({ blockSize: 64, doubleQuant: true }));
  const fromBnb = await quantized(bnbDir, tmp.dir, 'm-from-bnb', { format: 'nf4', doubleQuant: true });
  const direct = await quantized(hf, tmp.dir, 'm-direct-dq', { format: 'nf4', doubleQuant: true });
  const r1 = await ModelRuntime.load(fromBnb);
  const r2 = await ModelRuntime.load(direct);
  try {
    assert.equal(r1.manifest.quant.source, 'bnb-4bit');
    const ids = r1.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const a = await r1.forward({ ids: [ids] });
    const b = await r2.forward({ ids: [ids] });
    const e = relError(a.logits, b.logits);
    assert.equal(e.maxAbs, 0, `bnb import differs from the direct nf4 path: max abs ${e.maxAbs}`);
  } finally {
    await r1.release();
    await r2.release();
  }
});

test(`a Qwen2 checkpoint (q/k/v biases, fused into the q/k/v group) equals the reference forward (rel < ${TOL_GRAPH})`, async () => {
  // Fixture: the tiny checkpoint as Qwen2ForCausalLM, with random q/k/v biases added.
  const qwenDir = path.join(tmp.dir, 'hf-qwen2');
  await fs.mkdir(qwenDir);
  const reader = await SafetensorsReader.open(hf);
  const cfgJson = JSON.parse(await fs.readFile(path.join(hf, 'config.json'), 'utf8')) as Record<string, unknown>;
  const qwenJson = { ...cfgJson, architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2' };
  const cfg = parseHfConfig(qwenJson, 'config.json');
  assert.equal(cfg.qkvBias, true);
  const rng = new Rng(7);
  const entries = [];
  for (const name of reader.names()) {
    const info = reader.info(name);
    entries.push({ name, dtype: info.dtype, shape: [...info.shape], data: await reader.readRaw(name) });
  }
  await reader.close();
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of ['q_proj', 'k_proj', 'v_proj'] as const) {
      const { N } = linearShape(cfg, p);
      const b = Float32Array.from({ length: N }, () => rng.normal() * 0.5);
      entries.push({ name: linearWeightName(l, p).replace(/weight$/, 'bias'), dtype: 'F32' as const, shape: [N], data: new Uint8Array(b.buffer) });
    }
  }
  await writeSafetensors(path.join(qwenDir, 'model.safetensors'), entries);
  await fs.writeFile(path.join(qwenDir, 'config.json'), JSON.stringify(qwenJson));
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) await fs.copyFile(path.join(hf, f), path.join(qwenDir, f));
  for (const [format, extra] of [['fp32', {}], ['nf4', {}], ['int4', { int4AccuracyLevel: 0 }]] as const) {
    await checkAgainstReference(await quantized(qwenDir, tmp.dir, `m-qwen2-${format}`, { format, ...extra }), TOL_GRAPH, `qwen2 ${format}`);
  }
});

test('a bnb-4bit checkpoint whose q_proj has its own blocksize runs the unfused q/k/v path and equals the reference, with and without an adapter', async () => {
  // q_proj at blocksize 128, everything else at 64: the q/k/v group cannot share one MatMulBnb4, so
  // the graph runs three and concatenates (the fallback of the fused group), LoRA included.
  const bnbDir = await bnbCheckpoint('hf-bnb-mixed', (name) => ({ blockSize: name.includes('q_proj') ? 128 : 64, doubleQuant: false }));
  const dir = await quantized(bnbDir, tmp.dir, 'm-bnb-mixed', { format: 'nf4' });
  await checkAgainstReference(dir, TOL_GRAPH, 'bnb mixed blocksizes');

  const rt = await ModelRuntime.load(dir);
  try {
    const ad = path.join(tmp.dir, 'ad-mixed-qv');
    const mods = await randomAdapter(ad, rt.cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 21, fingerprint: rt.manifest.fingerprint });
    const mgr = new AdapterManager(rt);
    mgr.activate(await mgr.load(ad));
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const res = await rt.forward({ ids: [ids], lora: mgr.feeds() });
    const { W } = await dequantizedWeights(dir);
    const ref = referenceForward(rt.cfg, W, ids, refLoras([{ modules: mods, scale: () => 8 / 4 }]));
    const e = relError(res.logits, ref);
    assert.ok(e.rel < TOL_GRAPH, `unfused q/k/v + adapter vs reference: rel ${e.rel.toExponential(3)} (max abs ${e.maxAbs.toExponential(3)})`);
    assert.ok(relError(res.logits, referenceForward(rt.cfg, W, ids)).rel > 100 * TOL_GRAPH, 'the adapter must change the output for this test to mean anything');
  } finally {
    await rt.release();
  }
});
