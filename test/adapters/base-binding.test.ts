// Adapters bind to the source model, not to one quantization of it: the source fingerprint is the same
// for every quantization and table choice of one checkpoint; an nf4 adapter applies to int4 of the same
// checkpoint with a note (and computes the same delta up to the base's quantization difference); another
// source model, an adapter from before source binding and a model from before source fingerprints are
// refused, each naming its case; `adapter merge` refuses another source before writing anything; serve
// lists the note and refuses another model over HTTP.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { runCli as cli } from '../helpers/cli-process.js';
import { tempDir, tinyCheckpoint, quantized, dequantizedWeights } from '../helpers/fixtures.js';
import { referenceForward, relError } from '../helpers/reference.js';
import { randomAdapter, refLoras } from '../helpers/adapters.js';
import { buildDemoTokenizer, makeDemoModel } from '../../src/formats/demo-model.js';
import { importGguf } from '../../src/formats/gguf/import.js';
import { T, handmadeLlama, demoVocab } from '../helpers/gguf-handmade.js';
import { SafetensorsReader, writeSafetensors } from '../../src/formats/safetensors.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { mergeAdapter } from '../../src/adapters/merge.js';
import { ADAPTER_BINDING, ADAPTER_CONFIG, bindingFor, makePeftConfig, peftConfigSchema, saveAdapter, type LoraModule } from '../../src/adapters/peft.js';
import { loadHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';
import { readManifest, type Manifest } from '../../src/model/manifest.js';
import { sourceFingerprintOfCheckpoint } from '../../src/model/source-fingerprint.js';
import { finetune } from '../../src/train/trainer.js';
import { startServe } from '../../src/serve/server.js';

/** Graph vs the independent reference forward: float32 kernels, different summation order (as apply.test.ts). */
const TOL = 1e-4;
const PROMPT = 'My name is Ada and I live in';
const tmp = tempDir();
let hf = '';
let hf2 = '';
let cfg: ModelConfig;
const dirs: Record<string, string> = {};
const manifests: Record<string, Manifest> = {};
/** An adapter bound the way finetune binds one trained on the nf4 model (random B so its delta is large). */
let nf4Adapter = '';
let nf4Modules: LoraModule[] = [];

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
  hf2 = path.join(tmp.dir, 'hf-seed2');
  await makeDemoModel(hf2, { preset: 'tiny', seed: 2 });
  cfg = (await loadHfConfig(hf)).config;
  const variants = {
    nf4: { format: 'nf4' },
    'nf4-int8': { format: 'nf4', embeddings: 'int8' },
    fp4: { format: 'fp4' },
    int4: { format: 'int4' },
    'int4-int8': { format: 'int4', embeddings: 'int8' },
  } as const;
  for (const [name, o] of Object.entries(variants)) {
    dirs[name] = await quantized(hf, tmp.dir, name, o);
    manifests[name] = await readManifest(dirs[name]);
  }
  dirs.other = await quantized(hf2, tmp.dir, 'other-int4', { format: 'int4' });
  manifests.other = await readManifest(dirs.other);
  nf4Adapter = path.join(tmp.dir, 'ad-nf4');
  nf4Modules = await randomAdapter(nf4Adapter, cfg, { r: 8, alpha: 16, targets: ['q_proj', 'v_proj'], seed: 12 });
  await saveAdapter(nf4Adapter, { config: makePeftConfig({ r: 8, alpha: 16, targets: ['q_proj', 'v_proj'] }), modules: nf4Modules, ...bindingFor(manifests.nf4!) });
});
after(() => tmp.cleanup());

test('source fingerprint: one for nf4, fp4, int4 and both table choices of a checkpoint, another for another seed; quantized fingerprints all differ', async () => {
  const names = ['nf4', 'nf4-int8', 'fp4', 'int4', 'int4-int8'];
  const direct = await sourceFingerprintOfCheckpoint(hf);
  for (const n of names) assert.equal(manifests[n]!.sourceFingerprint, direct, `${n}: source fingerprint equals the checkpoint's`);
  assert.match(direct, /^[0-9a-f]{64}$/);
  assert.notEqual(manifests.other!.sourceFingerprint, direct, 'another seed is another source model');
  assert.equal(manifests.other!.sourceFingerprint, await sourceFingerprintOfCheckpoint(hf2));
  const quantizedFps = new Set(names.map((n) => manifests[n]!.fingerprint));
  assert.equal(quantizedFps.size, names.length, `quantized fingerprints must differ: ${names.map((n) => `${n} ${manifests[n]!.fingerprint.slice(0, 12)}`).join(', ')}`);
  assert.ok(!quantizedFps.has(direct), 'the source fingerprint is not any quantized one');
});

/** A copy of a checkpoint with every tensor re-stored as `dtype` (values rounded to it) and torch_dtype to match. */
async function resaved(src: string, out: string, dtype: 'BF16' | 'F32'): Promise<string> {
  await fs.mkdir(out, { recursive: true });
  const reader = await SafetensorsReader.open(src);
  try {
    const entries = [];
    for (const name of reader.names()) entries.push({ name, dtype, shape: [...reader.info(name).shape], data: await reader.readF32(name) });
    await writeSafetensors(path.join(out, 'model.safetensors'), entries, { format: 'pt' });
  } finally {
    await reader.close();
  }
  const config = JSON.parse(await fs.readFile(path.join(src, 'config.json'), 'utf8')) as Record<string, unknown>;
  await fs.writeFile(path.join(out, 'config.json'), JSON.stringify({ ...config, torch_dtype: dtype === 'BF16' ? 'bfloat16' : 'float32' }));
  return out;
}

test('source fingerprint: the same values stored as bf16 or f32 are one model; rounded values are another', async () => {
  const bf16 = await resaved(hf, path.join(tmp.dir, 'hf-bf16'), 'BF16');
  const upcast = await resaved(bf16, path.join(tmp.dir, 'hf-bf16-as-f32'), 'F32');
  const fpBf16 = await sourceFingerprintOfCheckpoint(bf16);
  assert.equal(await sourceFingerprintOfCheckpoint(upcast), fpBf16, 'an f32 upcast of a bf16 checkpoint is the same source model');
  assert.notEqual(fpBf16, manifests.nf4!.sourceFingerprint, 'rounding the weights to bf16 makes another model');
});

test('source fingerprint of a GGUF import: the same file gives the same one, another file another', async () => {
  const vocab = demoVocab(buildDemoTokenizer().tokenizerJson as never);
  const f = path.join(tmp.dir, 'a.gguf');
  const g = path.join(tmp.dir, 'b.gguf');
  handmadeLlama(f, T.Q4_0, vocab, 11);
  handmadeLlama(g, T.Q4_0, vocab, 12);
  const a0 = (await importGguf(f, path.join(tmp.dir, 'gguf-a0'), { accuracyLevel: 0 })).manifest;
  const a4 = (await importGguf(f, path.join(tmp.dir, 'gguf-a4'), { accuracyLevel: 4 })).manifest;
  const b0 = (await importGguf(g, path.join(tmp.dir, 'gguf-b0'), { accuracyLevel: 0 })).manifest;
  assert.match(a0.sourceFingerprint ?? '', /^[0-9a-f]{64}$/);
  assert.equal(a4.sourceFingerprint, a0.sourceFingerprint);
  assert.notEqual(b0.sourceFingerprint, a0.sourceFingerprint);
  assert.notEqual(a0.sourceFingerprint, a0.fingerprint);
});

test('finetune binds its adapter to the source model and records the quantization; adapter_config.json stays a PEFT config', async () => {
  const data = path.join(tmp.dir, 'ft.jsonl');
  await fs.writeFile(data, ['a small test row', 'another row of text'].map((text) => JSON.stringify({ text })).join('\n') + '\n');
  const out = path.join(tmp.dir, 'ft-nf4');
  await finetune({ model: dirs.nf4!, data, out, steps: 1, rank: 2, alpha: 4, targets: ['q_proj'], batchSize: 2, seqLen: 32 });
  const binding = JSON.parse(await fs.readFile(path.join(out, ADAPTER_BINDING), 'utf8')) as Record<string, unknown>;
  assert.deepEqual(binding, {
    format: 'edgelora-adapter/1',
    base_fingerprint: manifests.nf4!.fingerprint,
    source_fingerprint: manifests.nf4!.sourceFingerprint,
    quantization: 'nf4, block 64, float table',
  });
  const peft = JSON.parse(await fs.readFile(path.join(out, ADAPTER_CONFIG), 'utf8')) as Record<string, unknown>;
  assert.ok(peftConfigSchema.safeParse(peft).success);
  assert.ok(!Object.keys(peft).some((k) => /fingerprint|quantization/.test(k)), `adapter_config.json keeps to PEFT's fields: ${Object.keys(peft).join(', ')}`);
  // The trained adapter loads on int4 of the same checkpoint, with the note.
  const rt = await ModelRuntime.load(dirs.int4!);
  try {
    const mgr = new AdapterManager(rt);
    const id = await mgr.load(out);
    assert.match(mgr.list().find((a) => a.id === id)?.baseNote ?? '', /trained on nf4, block 64, float table .* applied to int4, block 32, float table .* same source model/);
  } finally {
    await rt.release();
  }
});

async function logits(dir: string, adapter: string | null): Promise<{ logits: Float32Array; ids: number[]; note: string | null }> {
  const rt = await ModelRuntime.load(dir);
  try {
    const mgr = new AdapterManager(rt);
    let note: string | null = null;
    if (adapter) {
      const id = await mgr.load(adapter);
      mgr.activate(id);
      note = mgr.list().find((a) => a.id === id)?.baseNote ?? null;
    }
    const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
    const res = await rt.forward({ ids: [ids], ...(adapter ? { lora: mgr.feeds() } : {}) });
    return { logits: res.logits, ids, note };
  } finally {
    await rt.release();
  }
}

const maxAbs = (a: Float32Array, b?: Float32Array): number => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - (b ? b[i]! : 0)));
  return m;
};

test('an nf4 adapter on int4 of the same checkpoint: loads with a note, its delta equals the one on nf4 up to the base quantization difference', async () => {
  const nf4Base = await logits(dirs.nf4!, null);
  const nf4With = await logits(dirs.nf4!, nf4Adapter);
  const int4Base = await logits(dirs.int4!, null);
  const int4With = await logits(dirs.int4!, nf4Adapter);
  assert.equal(nf4With.note, null, 'no note on the quantization it was trained on');
  assert.match(int4With.note ?? '', /trained on nf4.*applied to int4.*same source model/);
  const deltaNf4 = Float32Array.from(nf4With.logits, (v, i) => v - nf4Base.logits[i]!);
  const deltaInt4 = Float32Array.from(int4With.logits, (v, i) => v - int4Base.logits[i]!);
  // The delta is computed from activations of the base; those differ between the two quantizations by
  // the relative amount eps the base logits do. To first order the delta then moves by eps · |delta|;
  // 2× that is the tolerance (measured here: 0.18 against a tolerance of ~0.27 and a delta of 0.72).
  const eps = maxAbs(int4Base.logits, nf4Base.logits) / maxAbs(nf4Base.logits);
  const size = maxAbs(deltaNf4);
  const tol = 2 * eps * size;
  const diff = maxAbs(deltaInt4, deltaNf4);
  assert.ok(diff <= tol, `|delta(int4) - delta(nf4)| max ${diff.toExponential(3)} > tolerance ${tol.toExponential(3)} (eps ${eps.toFixed(4)}, |delta| ${size.toFixed(4)})`);
  assert.ok(size > 2 * tol, `the adapter's delta (${size.toFixed(4)}) must be well above the tolerance (${tol.toFixed(4)}) for this to mean anything`);
  // And on int4 the adapter is applied exactly: the independent reference over int4's dequantized weights
  // (at accuracy_level 0, float activations, as forward.test.ts compares int4; level 4 rounds them to int8).
  const exact = await quantized(hf, tmp.dir, 'int4-acc0', { format: 'int4', int4AccuracyLevel: 0 });
  const acc0 = await logits(exact, nf4Adapter);
  assert.match(acc0.note ?? '', /applied to int4/);
  const { W } = await dequantizedWeights(exact);
  const ref = referenceForward(cfg, W, acc0.ids, refLoras([{ modules: nf4Modules, scale: () => 16 / 8 }]));
  const e = relError(acc0.logits, ref);
  assert.ok(e.rel < TOL, `int4 + nf4 adapter vs reference: rel ${e.rel.toExponential(3)} (max abs ${e.maxAbs})`);
});

async function refusal(modelDir: string, adapterDir: string): Promise<string> {
  const rt = await ModelRuntime.load(modelDir);
  try {
    const mgr = new AdapterManager(rt);
    let text = '';
    await assert.rejects(mgr.load(adapterDir), (err: Error) => {
      text = `${err.message} hint: ${String((err as { hint?: string }).hint ?? '')}`;
      return true;
    });
    assert.deepEqual(mgr.list(), [], 'nothing loaded');
    return text;
  } finally {
    await rt.release();
  }
}

test('refused, naming the case: another source model, an adapter from before source binding, a model from before source fingerprints', async () => {
  // Another source model (demo-model seed 2), at int4.
  const other = await refusal(dirs.other!, nf4Adapter);
  assert.match(other, /another base: a different source model/);
  assert.match(other, new RegExp(`${manifests.nf4!.sourceFingerprint!.slice(0, 16)}.*${manifests.other!.sourceFingerprint!.slice(0, 16)}`));
  assert.match(other, /fine-tune/);

  // An adapter written before source binding (base_fingerprint only): its own quantization still takes it.
  const legacy = path.join(tmp.dir, 'ad-legacy');
  await randomAdapter(legacy, cfg, { r: 2, alpha: 4, targets: ['q_proj'], seed: 5, fingerprint: manifests.nf4!.fingerprint });
  assert.deepEqual(Object.keys(JSON.parse(await fs.readFile(path.join(legacy, ADAPTER_BINDING), 'utf8')) as object).sort(), ['base_fingerprint', 'format']);
  const legacyText = await refusal(dirs.int4!, legacy);
  assert.match(legacyText, /predates source-model binding/);
  assert.match(legacyText, /cannot tell another model from another quantization/);
  assert.equal((await logits(dirs.nf4!, legacy)).note, null, 'a legacy adapter still loads on the model it was trained on');

  // A model directory written before source fingerprints (manifest without the field).
  const oldModel = path.join(tmp.dir, 'int4-old');
  await fs.cp(dirs.int4!, oldModel, { recursive: true });
  const m = JSON.parse(await fs.readFile(path.join(oldModel, 'manifest.json'), 'utf8')) as Record<string, unknown>;
  delete m.sourceFingerprint;
  await fs.writeFile(path.join(oldModel, 'manifest.json'), JSON.stringify(m, null, 2));
  const oldText = await refusal(oldModel, nf4Adapter);
  assert.match(oldText, /quantized before edgelora recorded source fingerprints/);
  assert.match(oldText, /re-run `edgelora quantize`/);
  // …while an adapter trained on this very quantization still loads there (same quantized fingerprint).
  const onInt4 = path.join(tmp.dir, 'ad-int4');
  const mods = await randomAdapter(onInt4, cfg, { r: 2, alpha: 4, targets: ['v_proj'], seed: 6 });
  await saveAdapter(onInt4, { config: makePeftConfig({ r: 2, alpha: 4, targets: ['v_proj'] }), modules: mods, ...bindingFor(manifests.int4!) });
  assert.equal((await logits(oldModel, onInt4)).note, null);
});

test('adapter merge: another source model is refused and nothing is written; its own checkpoint merges', async () => {
  const out = path.join(tmp.dir, 'merged-other');
  await assert.rejects(mergeAdapter(hf2, nf4Adapter, out), (err: Error) => {
    assert.match(err.message, /another base: a different source model/);
    return true;
  });
  assert.ok(!existsSync(out), 'the output directory must not exist after a refusal');
  const good = path.join(tmp.dir, 'merged-own');
  const res = await mergeAdapter(hf, nf4Adapter, good);
  assert.equal(res.merged, cfg.numLayers * 2);
  assert.equal(res.note, null);
  // An adapter from before source binding is merged by shape, with a note saying so.
  const legacy = path.join(tmp.dir, 'ad-legacy-merge');
  await randomAdapter(legacy, cfg, { r: 2, alpha: 4, targets: ['o_proj'], seed: 7, fingerprint: manifests.int4!.fingerprint });
  const lr = await mergeAdapter(hf2, legacy, path.join(tmp.dir, 'merged-legacy'));
  assert.equal(lr.merged, cfg.numLayers);
  assert.match(lr.note ?? '', /predates source-model binding.*shapes only/);
});

test('CLI: generate with an nf4 adapter on int4 prints one note on stderr; the Orin Nano profile on nf4 says what runs; adapter merge into another model exits 1 and creates nothing', () => {
  const g = cli(['generate', '--model', dirs.int4!, '--adapter', nf4Adapter, '--prompt', 'Hello', '--max-new-tokens', '2', '--json']);
  assert.equal(g.code, 0, g.stderr);
  const notes = g.stderr.split('\n').filter((l) => l.startsWith('edgelora: note:'));
  assert.equal(notes.length, 1, g.stderr);
  assert.match(notes[0]!, /trained on nf4.*applied to int4.*same source model/);
  // The Orin Nano profile (nf4 preferred) on an nf4 directory without CUDA says what runs, not "defaulting to int4".
  const p = cli(['generate', '--model', dirs.nf4!, '--profile', 'jetson-orin-nano-8gb', '--prompt', 'Hello', '--max-new-tokens', '1', '--json']);
  assert.equal(p.code, 0, p.stderr);
  assert.match(p.stderr, /warning: model is nf4: without the CUDA provider its MatMulBnb4 runs on the CPU here/);
  assert.doesNotMatch(p.stderr, /defaulting to int4/);
  const out = path.join(tmp.dir, 'merged-cli');
  const r = cli(['adapter', 'merge', hf2, nf4Adapter, out]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stderr, /different source model/);
  assert.doesNotMatch(r.stdout, /merged/);
  assert.ok(!existsSync(out));
});

test('serve: an nf4 adapter on an int4 base is listed with its note and source; another source model is a 400 naming the case', async () => {
  const server = await startServe({ modelDir: dirs.int4!, port: 0, ctx: 64, adapters: [{ id: 'me', dir: nf4Adapter, scale: 1 }] });
  try {
    await server.ready;
    const list = (await (await fetch(`${server.url}/v1/adapters`)).json()) as { data: { id: string; base_note: string | null; source_fingerprint: string | null; base_fingerprint: string | null }[] };
    const me = list.data.find((a) => a.id === 'me');
    assert.ok(me, JSON.stringify(list));
    assert.match(me.base_note ?? '', /trained on nf4.*applied to int4.*same source model/);
    assert.equal(me.source_fingerprint, manifests.nf4!.sourceFingerprint);
    assert.equal(me.base_fingerprint, manifests.nf4!.fingerprint);
    // The seed-2 model's own adapter, POSTed to this base: refused with the case.
    const foreign = path.join(tmp.dir, 'ad-other-model');
    const mods = await randomAdapter(foreign, cfg, { r: 2, alpha: 4, targets: ['q_proj'], seed: 9 });
    await saveAdapter(foreign, { config: makePeftConfig({ r: 2, alpha: 4, targets: ['q_proj'] }), modules: mods, ...bindingFor(manifests.other!) });
    const res = await fetch(`${server.url}/v1/adapters`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id: 'foreign', path: foreign }) });
    const body = await res.text();
    assert.equal(res.status, 400, body);
    assert.match(body, /a different source model/);
  } finally {
    await server.close(0);
  }
});
