// Probe for the open half of issue #12 (serve and train over ONE copy of the base): the resident
// memory of ORT sessions over the small int4 preset, each variant in its own child process: the
// serving LoRA twin alone, the training graph alone (r8 q,v, dropout, 128 tokens), both as two
// sessions (what serve + a job held before serving paused during jobs), and ONE session whose main
// graph holds the base initializers once and an If node whose branches are the training and the
// serving graph (ORT reads outer-scope initializers inside branches). It only creates the sessions
// (no run): the figures are what the sessions hold at rest, not a job's peak. "verify" (its memory
// figures mean nothing: it holds every session) checks that both branches give what the sessions
// alone give: one training step (loss, every LoRA gradient) through the train branch against
// TrainSession, and a prefill + decode step through the serve branch against ModelRuntime's LoRA
// twin, each fed the other branch's inputs as tiny dummies. Prints a table and writes
// bench-results/combined-session.json. Run under `flock /tmp/edgelora-bench.lock`.
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
const VARIANTS = ['serve', 'train', 'both', 'combined', 'verify'] as const;
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
let checked = '';
if (variant === 'serve' || variant === 'both') sessions.push(await ort.InferenceSession.create(sBytes, opt('lora-twin')));
if (variant === 'train' || variant === 'both') sessions.push(await ort.InferenceSession.create(tg.bytes, opt('train')));
if (variant === 'combined' || variant === 'verify') {
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
  if (variant === 'verify') {
    // One training step through the combined session's train branch against the training session alone.
    const combined = sessions[0]!;
    const dummy: Record<string, ort.Tensor> = {};
    const trainInputs = new Set((T.graph!.input ?? []).map((i) => i.name!));
    for (const i of S.graph!.input ?? []) {
      if (trainInputs.has(i.name!)) continue;
      const dims = (i.type?.tensorType?.shape?.dim ?? []).map((d) => (d.dimValue != null ? Number(d.dimValue) : 1));
      const size = dims.reduce((a, b) => a * b, 1);
      const et = i.type?.tensorType?.elemType;
      dummy[i.name!] = et === 7 ? new ort.Tensor('int64', new BigInt64Array(size), dims) : et === 6 ? new ort.Tensor('int32', new Int32Array(size), dims) : et === 2 ? new ort.Tensor('uint8', new Uint8Array(size), dims) : new ort.Tensor('float32', new Float32Array(size), dims);
    }
    const view = {
      async run(feeds: Record<string, ort.Tensor>) {
        const out = await combined.run({ ...feeds, ...dummy, 'edgelora.train': new ort.Tensor('bool', Uint8Array.of(1), []) });
        return Object.fromEntries(to.map((o, k) => [o.name!, out[`out.${k}`]!]));
      },
      release: () => combined.release(),
    };
    const { TrainSession, NO_DROPOUT } = await import('../src/train/session.js');
    const { loadTokenizer } = await import('../src/formats/tokenizer.js');
    const tok = await loadTokenizer(dir);
    const alone = await TrainSession.create(dir, manifest, cfg, targets, { dropout: true, maxTokens: 128, bnb4Backward: 'dequantize', padTokenId: tok.padTokenId });
    // The private constructor, with the view as its session (the prototype's stand-in for a factory option).
    const Ctor = TrainSession as unknown as new (...a: unknown[]) => typeof alone;
    const constFeeds: Record<string, ort.Tensor> = {};
    for (const [name, f] of tg.runtimeFeeds) constFeeds[name] = new ort.Tensor(f.dtype as 'float32', f.data as Float32Array, f.shape);
    const through = new Ctor(cfg, targets, true, view, constFeeds, tok.padTokenId, 128);
    let seed = 1;
    const rnd = () => ((seed = (seed * 16807) % 2147483647) / 2147483647 - 0.5) * 0.1;
    const params = new Map(targets.map((t) => [`${t.layer}.${t.proj}`, { layer: t.layer, proj: t.proj, r: t.rank, K: t.K, N: t.N, alpha: 16, scale: 2, a: Float32Array.from({ length: t.rank * t.K }, rnd), b: Float32Array.from({ length: t.N * t.rank }, rnd) }]));
    const ids = tok.encode('My name is Anouk Verhoeven and I live in Valparaiso.', { addSpecialTokens: true });
    const batch = { inputIds: [ids], labels: [ids] };
    const mask = NO_DROPOUT;
    const a = await alone.step(batch, params, 1 / ids.length, mask);
    const b = await through.step(batch, params, 1 / ids.length, mask);
    let worst = 0;
    for (const [k, g] of a.grads) {
      const h = b.grads.get(k)!;
      for (const [x, y] of [[g.a, h.a], [g.b, h.b]] as const) for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i]! - y[i]!));
    }
    // One prefill + one decode step through the serve branch against the LoRA twin alone (ModelRuntime).
    const trainDummy: Record<string, ort.Tensor> = {};
    const serveInputs = new Set((S.graph!.input ?? []).map((i) => i.name!));
    for (const i of T.graph!.input ?? []) {
      if (serveInputs.has(i.name!)) continue;
      const dims = (i.type?.tensorType?.shape?.dim ?? []).map((d) => (d.dimValue != null ? Number(d.dimValue) : 1));
      const size = dims.reduce((x, y) => x * y, 1);
      const et = i.type?.tensorType?.elemType;
      trainDummy[i.name!] = et === 7 ? new ort.Tensor('int64', new BigInt64Array(size), dims) : et === 6 ? new ort.Tensor('int32', new Int32Array(size), dims) : et === 2 ? new ort.Tensor('uint8', new Uint8Array(size), dims) : new ort.Tensor('float32', new Float32Array(size), dims);
    }
    const serveView = {
      inputNames: (S.graph!.input ?? []).map((i) => i.name!),
      async run(feeds: Record<string, ort.Tensor>) {
        const out = await combined.run({ ...feeds, ...trainDummy, 'edgelora.train': new ort.Tensor('bool', Uint8Array.of(0), []) });
        return Object.fromEntries(so.map((o, k) => [o.name!, out[`out.${k}`]!]));
      },
      release: async () => undefined,
    };
    const { ModelRuntime } = await import('../src/runtime/model.js');
    const rt = await ModelRuntime.load(dir);
    await rt.enableLora();
    const prompt = tok.encode('The fleet pushed an adapter', { addSpecialTokens: true });
    const r1 = await rt.forward({ ids: [prompt], logits: 'last', reserve: prompt.length + 2 });
    const d1 = await rt.forward({ ids: [[5]], cache: r1.cache });
    const ref = [r1.logits.slice(), d1.logits.slice()];
    const inner = rt as unknown as { current: unknown; inputNames: Set<string> };
    inner.current = serveView;
    inner.inputNames = new Set(serveView.inputNames);
    const r2 = await rt.forward({ ids: [prompt], logits: 'last', reserve: prompt.length + 2 });
    const d2 = await rt.forward({ ids: [[5]], cache: r2.cache });
    let worstLogit = 0;
    for (const [x, y] of [[ref[0]!, r2.logits], [ref[1]!, d2.logits]] as const) for (let i = 0; i < x.length; i++) worstLogit = Math.max(worstLogit, Math.abs(x[i]! - y[i]!));
    checked = `; prefill + decode logits max |diff| vs the LoRA twin alone ${worstLogit}`;
    checked += `; loss alone ${a.loss} vs through the If ${b.loss}; max |grad diff| ${worst}`;
  }
  note = `${inits.size} initializers once, ${n} outputs, created in ${Math.round(performance.now() - t0)} ms`;
}
console.log(JSON.stringify({ variant, rss_before_mib: Math.round(before), rss_after_mib: Math.round(rss()), hwm_mib: Math.round(hwm()), note: note + checked }));
