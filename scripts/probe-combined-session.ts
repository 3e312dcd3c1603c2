// Probe for the open half of issue #12 (serve and train over ONE copy of the base): the resident
// memory of ORT sessions over the small int4 preset, each variant in its own child process: the
// serving LoRA twin alone, the training graph alone (r8 q,v, dropout, 128 tokens), both as two
// sessions (what serve + a job held before serving paused during jobs), and ONE session whose main
// graph holds the base initializers once and an If node whose branches are the training and the
// serving graph (ORT reads outer-scope initializers inside branches). It only creates the sessions
// (no run): the figures are what the sessions hold at rest, not a job's peak. Prints a table and
// writes bench-results/combined-session.json. Run under `flock /tmp/edgelora-bench.lock`.
//   node --import tsx scripts/probe-combined-session.ts
import onnxproto from 'onnx-proto';
import ort from 'onnxruntime-node';
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { readManifest } from '../src/model/manifest.js';
import { parseHfConfig } from '../src/formats/hf-config.js';
import { buildLoraInferenceGraph } from '../src/model/infer-graph.js';
import { buildTrainGraph, loraTargets } from '../src/train/graph.js';
import { sessionOptionsFor } from '../src/runtime/sessions.js';
import { benchModel, printTable, writeJson } from './bench-common.js';
const { onnx } = onnxproto;
// The protobuf interfaces (ITensorProto, …), as the static create() methods take them.
type I<F extends (...a: never[]) => unknown> = NonNullable<Parameters<F>[0]>;
type TensorP = I<typeof onnx.TensorProto.create>;
type ValueInfoP = I<typeof onnx.ValueInfoProto.create>;
type GraphP = I<typeof onnx.GraphProto.create>;
type OpsetP = I<typeof onnx.OperatorSetIdProto.create>;
const VARIANTS = ['serve', 'train', 'both', 'combined'] as const;
const variant = process.argv[2];
if (variant === undefined) {
  const rows: Record<string, string | number>[] = [];
  const results: Record<string, unknown>[] = [];
  await benchModel('int4', 'small');
  for (const v of VARIANTS) {
    const r = spawnSync(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), v], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`variant ${v} failed: ${r.stderr}`);
    const res = JSON.parse(r.stdout.trim().split('\n').pop()!) as { variant: string; rss_before_mib: number; rss_after_mib: number; hwm_mib: number; note?: string };
    results.push(res);
    rows.push({ sessions: v, 'RSS before (MiB)': res.rss_before_mib, 'RSS after (MiB)': res.rss_after_mib, 'peak (MiB)': res.hwm_mib, note: res.note ?? '' });
  }
  printTable(rows);
  console.log(`wrote ${await writeJson('combined-session.json', { preset: 'small', format: 'int4', targets: ['q_proj', 'v_proj'], rank: 8, results })}`);
  process.exit(0);
}
const dir = await benchModel('int4', 'small');
const manifest = await readManifest(dir);
const cfg = parseHfConfig(manifest.sourceConfig, dir);
const targets = loraTargets(cfg, ['q_proj', 'v_proj'], () => 8);
const hwm = () => Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;
const rss = () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;
const sBytes = await buildLoraInferenceGraph(dir, manifest, cfg);
const tg = await buildTrainGraph(dir, manifest, cfg, { targets, dropout: true, maxTokens: 128, bnb4Backward: 'dequantize' });
const before = rss();
const fmt = manifest.quant.format;
const opt = (kind: 'lora-twin' | 'train') => sessionOptionsFor({ kind, externalDataDir: dir, format: fmt, embeddings: manifest.quant.embeddings });
const sessions: ort.InferenceSession[] = [];
let note = '';
if (variant === 'serve' || variant === 'both') sessions.push(await ort.InferenceSession.create(sBytes, opt('lora-twin')));
if (variant === 'train' || variant === 'both') sessions.push(await ort.InferenceSession.create(tg.bytes, opt('train')));
if (variant === 'combined') {
  const S = onnx.ModelProto.decode(sBytes);
  const T = onnx.ModelProto.decode(tg.bytes);
  const inits = new Map<string, TensorP>();
  let dupDiff = 0;
  for (const g of [S.graph!, T.graph!]) for (const t of g.initializer ?? []) {
    const prev = inits.get(t.name!);
    if (prev && JSON.stringify(prev.externalData) !== JSON.stringify(t.externalData)) dupDiff++;
    if (!prev) inits.set(t.name!, t);
  }
  const inputs = new Map<string, ValueInfoP>();
  for (const g of [S.graph!, T.graph!]) for (const i of g.input ?? []) if (!inputs.has(i.name!)) inputs.set(i.name!, i);
  const so = S.graph!.output!, to = T.graph!.output!;
  const n = Math.max(so.length, to.length);
  const branch = (g: GraphP, outs: typeof so, tag: string) => {
    const nodes = [...(g.node ?? [])];
    const o = [...outs];
    for (let k = outs.length; k < n; k++) {
      const name = `${tag}.pad.${k}`;
      nodes.push(onnx.NodeProto.create({ opType: 'Constant', output: [name], attribute: [onnx.AttributeProto.create({ name: 'value', type: onnx.AttributeProto.AttributeType.TENSOR, t: onnx.TensorProto.create({ dataType: 1, dims: [0], floatData: [] }) })] }));
      o.push(onnx.ValueInfoProto.create({ name, type: { tensorType: { elemType: 1 } } }));
    }
    return onnx.GraphProto.create({ name: tag, node: nodes, output: o, valueInfo: g.valueInfo ?? [] });
  };
  const types = (outs: typeof so) => outs.map((x) => x.type?.tensorType?.elemType);
  // Branch outputs pair up by position; the pads are float [0], so every output must be float.
  if ([...types(so), ...types(to)].some((t) => t !== 1)) throw new Error('an output is not float32: pads would not match');
  if (dupDiff > 0) throw new Error(`${dupDiff} initializers share a name but not their data`);
  const mode = onnx.ValueInfoProto.create({ name: 'edgelora.train', type: { tensorType: { elemType: 9, shape: { dim: [] } } } });
  const outNames = Array.from({ length: n }, (_, k) => `out.${k}`);
  const ifNode = onnx.NodeProto.create({ opType: 'If', input: ['edgelora.train'], output: outNames, attribute: [
    onnx.AttributeProto.create({ name: 'then_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch(T.graph!, to, 'train') }),
    onnx.AttributeProto.create({ name: 'else_branch', type: onnx.AttributeProto.AttributeType.GRAPH, g: branch(S.graph!, so, 'serve') }),
  ] });
  const opsets = new Map<string, OpsetP>();
  for (const m of [S, T]) for (const o of m.opsetImport ?? []) opsets.set(o.domain ?? '', o);
  const M = onnx.ModelProto.create({ irVersion: S.irVersion, opsetImport: [...opsets.values()], producerName: 'edgelora-proto', graph: onnx.GraphProto.create({ name: 'combined', node: [ifNode], initializer: [...inits.values()], input: [...inputs.values(), mode], output: outNames.map((name) => onnx.ValueInfoProto.create({ name, type: { tensorType: { elemType: 1 } } })) }) });
  const bytes = onnx.ModelProto.encode(M).finish();
  const t0 = performance.now();
  sessions.push(await ort.InferenceSession.create(bytes, opt('train')));
  note = `${inits.size} initializers once, ${n} outputs, created in ${Math.round(performance.now() - t0)} ms`;
}
console.log(JSON.stringify({ variant, rss_before_mib: Math.round(before), rss_after_mib: Math.round(rss()), hwm_mib: Math.round(hwm()), note }));
