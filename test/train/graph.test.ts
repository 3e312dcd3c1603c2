// The training graph's structure: every node is needed by an output. A node nothing reads is still run by ORT, last,
// and keeps its inputs alive until then; a recomputed layer emitted whole left such nodes (its down_proj copy, its
// residual sums), and with them one [B·T, F] activation per layer alive to the end of the step.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import onnxproto from 'onnx-proto';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { LINEAR_PROJS } from '../../src/model/llama.js';
import { buildTrainGraph, loraTargets } from '../../src/train/graph.js';

interface NodeProto { name: string; input: string[]; output: string[] }
const { onnx } = onnxproto as unknown as { onnx: { ModelProto: { decode(b: Uint8Array): { graph: { node: NodeProto[]; output: { name: string }[] } } } } };

let root: { dir: string; cleanup: () => void };
let hf: string;
before(async () => {
  root = tempDir('edgelora-train-graph-');
  hf = await tinyCheckpoint(root.dir, 3);
});
after(() => root.cleanup());

for (const [format, recompute, maxTokens] of [['int4', true, 16], ['int4', false, undefined], ['nf4', true, undefined]] as const) {
  test(`every node of the training graph feeds an output: ${format}${recompute ? ', recomputed' : ''}${maxTokens ? ', chunked loss' : ''}`, async () => {
    const dir = await quantized(hf, root.dir, `${format}-${recompute}-${maxTokens ?? 0}`, { format, embeddings: 'int8' });
    const manifest = await readManifest(dir);
    const cfg = parseHfConfig(manifest.sourceConfig, dir);
    const tg = await buildTrainGraph(dir, manifest, cfg, { targets: loraTargets(cfg, LINEAR_PROJS, () => 2), dropout: false, recompute, ...(maxTokens ? { maxTokens, lossChunk: 8 } : {}) });
    const graph = onnx.ModelProto.decode(tg.bytes).graph;
    const read = new Set([...graph.node.flatMap((n) => n.input), ...graph.output.map((o) => o.name)]);
    const dead = graph.node.filter((n) => !n.output.some((o) => read.has(o)));
    assert.equal(dead.length, 0, `${dead.length} of ${graph.node.length} nodes feed nothing, e.g. ${dead.slice(0, 3).map((n) => n.name).join(', ')}`);
  });
}
