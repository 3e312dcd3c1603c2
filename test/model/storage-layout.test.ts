// How a quantized model lies in its data file and what ORT is given to read, for the inference memory of
// issue 13: a projection group's weights are one span of the file (no Concat for ORT to fold into a copy), the
// lm_head over a quantized table is split into slices (ORT prepacks one at a time), and the token lookup is
// fed the stored rows (no mapping of the table stays). Each is checked in the graph and by logits.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import onnxproto from 'onnx-proto';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { readManifest, MODEL_FILE } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { QuantizedWeights, WEIGHT_SUFFIX } from '../../src/model/weights.js';
import { Graph } from '../../src/graph/builder.js';
import { toOnnxBytes } from '../../src/graph/onnx.js';
import { buildLlama, INPUT } from '../../src/model/llama.js';

const { onnx } = onnxproto;
const tmp = tempDir();
let hf = '';
let int8 = '';

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
  int8 = await quantized(hf, tmp.dir, 'int4-int8', { format: 'int4', embeddings: 'int8' });
});
after(() => tmp.cleanup());

async function graphOf(dir: string): Promise<InstanceType<typeof onnx.ModelProto>> {
  return onnx.ModelProto.decode(await fs.readFile(path.join(dir, MODEL_FILE)));
}

test('int4: every projection group is one MatMulNBits over one stored span, with no Concat of weights', async () => {
  const m = await graphOf(int8);
  const inits = new Set((m.graph?.initializer ?? []).map((t) => t.name));
  const concatsOfWeights = (m.graph?.node ?? []).filter((n) => n.opType === 'Concat' && (n.input ?? []).some((i) => inits.has(i)) && (n.input ?? []).some((i) => i.endsWith(WEIGHT_SUFFIX.int4) || i.endsWith(WEIGHT_SUFFIX.scales)));
  assert.deepEqual(concatsOfWeights.map((n) => n.name), [], 'Concat nodes over stored weights');
  const qkv = (m.graph?.node ?? []).find((n) => n.opType === 'MatMulNBits' && (n.input?.[1] ?? '').startsWith('model.layers.0.qkv_proj'));
  assert.ok(qkv, 'layer 0 reads its q/k/v weights as one initializer');
  // The projections themselves stay findable by name (training and merge read them one by one).
  const qw = await QuantizedWeights.open(int8, await readManifest(int8));
  for (const proj of ['q_proj', 'k_proj', 'v_proj']) assert.ok(qw.tensors.get(`model.layers.0.self_attn.${proj}.weight${WEIGHT_SUFFIX.int4}`)?.external, `${proj} is listed`);
});

test('a quantized table: the decoder is fed token rows and never gathers from the stored table', async () => {
  const m = await graphOf(int8);
  const inputs = (m.graph?.input ?? []).map((i) => i.name);
  assert.ok(inputs.includes(INPUT.tokenRows) && !inputs.includes(INPUT.ids), `inputs: ${inputs.slice(0, 6).join(', ')}…`);
  const inits = new Set((m.graph?.initializer ?? []).map((t) => t.name));
  const gathers = (m.graph?.node ?? []).filter((n) => n.opType === 'GatherBlockQuantized');
  assert.ok(gathers.length === 1 && !inits.has(gathers[0]!.input![0]!), 'the one GatherBlockQuantized reads a fed input');
});

test('the lm_head in table slices gives the logits of the whole-table lm_head, token for token', async () => {
  const manifest = await readManifest(int8);
  const cfg = parseHfConfig(manifest.sourceConfig, int8);
  // A copy of the model whose decoder splits the table into slices of 64 rows.
  const sliced = path.join(tmp.dir, 'int4-int8-sliced');
  await fs.mkdir(sliced);
  for (const f of await fs.readdir(int8)) if (f !== MODEL_FILE) await fs.link(path.join(int8, f), path.join(sliced, f));
  const qw = await QuantizedWeights.open(int8, manifest);
  const g = new Graph({ external: qw.referencingSink('test') });
  const rowBytes = (cfg.hiddenSize / manifest.quant.embeddingBlockSize!) * (manifest.quant.embeddingBlockSize! + 4);
  await buildLlama(g, cfg, qw, { mode: 'infer', inferLora: false, lmHeadSliceBytes: 64 * rowBytes });
  await fs.writeFile(path.join(sliced, MODEL_FILE), toOnnxBytes(g));
  const heads = (await graphOf(sliced)).graph!.node!.filter((n) => n.opType === 'MatMulNBits' && (n.input?.[1] ?? '').includes(WEIGHT_SUFFIX.table));
  assert.equal(heads.length, Math.ceil(cfg.vocabSize / 64), `lm_head slices (vocab ${cfg.vocabSize})`);

  const whole = await ModelRuntime.load(int8);
  const parts = await ModelRuntime.load(sliced);
  try {
    const ids = whole.tokenizer.encode('The quick brown fox jumps over the lazy dog.', { addSpecialTokens: true });
    const a = await whole.forward({ ids: [ids, ids.slice().reverse()], logits: 'all' });
    const b = await parts.forward({ ids: [ids, ids.slice().reverse()], logits: 'all' });
    let max = 0;
    for (let i = 0; i < a.logits.length; i++) max = Math.max(max, Math.abs(a.logits[i]! - b.logits[i]!));
    assert.ok(max <= 1e-6, `sliced vs whole lm_head: max |Δlogit| ${max.toExponential(3)} > 1e-6`);
  } finally {
    await whole.release();
    await parts.release();
  }
});
