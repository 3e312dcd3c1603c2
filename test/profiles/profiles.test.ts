// Device profiles: shipped files validate, fake device roots are detected, bad files are named, providers fall back,
// over-budget plans are refused, overrides apply.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync, readFileSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { EdgeloraError } from '../../src/util/errors.js';
import {
  applyOverrides,
  builtinProfilesDir,
  checkMemoryPlan,
  estimateInferenceMemory,
  loadBuiltinProfiles,
  loadProfileFile,
  parseProfileSets,
  readDeviceFacts,
  resolveProfile,
  staticProber,
  type EpName,
} from '../../src/profiles/index.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixture = (name: string) => path.join(here, 'fixtures', name);
const tmp = mkdtempSync(path.join(os.tmpdir(), 'edgelora-profiles-'));
const quiet = () => {};

/** MemTotal straight from a fixture's meminfo, parsed here independently of detect.ts. */
function fixtureMemTotal(name: string): number {
  const line = readFileSync(path.join(fixture(name), 'proc/meminfo'), 'utf8').split('\n').find((l) => l.startsWith('MemTotal:'));
  assert.ok(line, 'fixture has MemTotal');
  return Number(line.split(/\s+/)[1]) * 1024;
}

function rejects(fn: () => unknown, ...parts: string[]): EdgeloraError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof EdgeloraError, `expected EdgeloraError, got ${String(err)}`);
    const text = err.describe();
    for (const p of parts) assert.ok(text.includes(p), `error should mention ${JSON.stringify(p)}:\n${text}`);
    return err;
  }
  assert.fail(`expected an error mentioning ${parts.join(', ')}`);
}

test('every shipped profile validates, is named after its id and cites a source for each figure', () => {
  const dir = builtinProfilesDir();
  const files = readdirSync(dir).filter((f) => f.endsWith('.json'));
  const loaded = loadBuiltinProfiles(dir);
  assert.equal(loaded.length, files.length);
  const ids = loaded.map((l) => l.profile.id);
  for (const want of ['jetson-orin-nano-8gb', 'jetson-orin-nx-16gb', 'jetson-agx-orin-32gb', 'jetson-agx-orin-64gb', 'jetson-xavier-nx', 'raspberry-pi-5-8gb', 'generic-x86-64']) {
    assert.ok(ids.includes(want), `missing shipped profile ${want}`);
  }
  for (const { profile: p } of loaded) {
    const budgetKey = p.memoryBudgetBytes !== undefined ? 'memoryBudgetBytes' : 'memoryBudgetFraction';
    for (const key of ['match', budgetKey, 'executionProviders', 'defaultFormat', 'threads', 'maxContext', 'finetune']) {
      assert.ok(p.sources?.[key], `${p.id}: sources.${key} missing`);
    }
    const names = p.executionProviders.map((e) => e.name);
    assert.equal(names[names.length - 1], 'cpu', `${p.id}: CPU must be the last resort`);
    const gpu = names.includes('cuda');
    // nf4 only where MatMulBnb4 can run on the GPU; CPU-only devices default to int4.
    assert.equal(p.defaultFormat, gpu ? 'nf4' : 'int4', `${p.id}: format`);
    if (names.includes('tensorrt')) assert.equal(p.executionProviders[0]?.fp16, true, `${p.id}: TensorRT fp16`);
  }
  const nano = loaded.find((l) => l.profile.id === 'jetson-orin-nano-8gb')?.profile;
  assert.equal(nano?.memoryBudgetBytes, 5.2e9);
  assert.deepEqual(nano?.executionProviders.map((e) => e.name), ['tensorrt', 'cuda', 'cpu']);
});

const cases: { fixture: string; arch: string; cpus: number; want: string }[] = [
  { fixture: 'orin-nano-8gb', arch: 'arm64', cpus: 6, want: 'jetson-orin-nano-8gb' },
  { fixture: 'xavier-nx', arch: 'arm64', cpus: 6, want: 'jetson-xavier-nx' },
  { fixture: 'raspberry-pi-5', arch: 'arm64', cpus: 4, want: 'raspberry-pi-5-8gb' },
  { fixture: 'generic-x86', arch: 'x64', cpus: 16, want: 'generic-x86-64' },
  { fixture: 'orin-nano-4gb', arch: 'arm64', cpus: 6, want: 'generic-aarch64' },
];
for (const c of cases) {
  test(`detects ${c.fixture} as ${c.want}`, async () => {
    const r = await resolveProfile({ root: fixture(c.fixture), arch: c.arch, cpus: c.cpus, probe: staticProber(['cpu']), warn: quiet });
    assert.equal(r.profile.id, c.want, `why: ${r.why.join('; ')}`);
    assert.equal(r.chosenBy, 'auto');
    assert.ok(r.why.length > 0);
    assert.equal(r.facts.memTotalBytes, fixtureMemTotal(c.fixture));
  });
}

test('detection reads the model without its NUL, the L4T release and MemTotal, and explains the choice', async () => {
  const f = readDeviceFacts({ root: fixture('orin-nano-8gb'), arch: 'arm64', cpus: 6 });
  assert.equal(f.model, 'NVIDIA Jetson Orin Nano Developer Kit');
  assert.deepEqual(f.l4t, { major: 36, revision: '4.3' });
  const probe = staticProber(['tensorrt', 'cuda', 'cpu'], { customBuild: { providerOptionsPatch: true } });
  const r = await resolveProfile({ root: fixture('orin-nano-8gb'), arch: 'arm64', cpus: 6, probe, warn: quiet });
  assert.ok(r.why.some((w) => w.includes('contains "Orin Nano"')), r.why.join('; '));
  assert.ok(r.why.some((w) => w.includes('MemTotal')), r.why.join('; '));
  assert.equal(r.threads, 6);
  assert.equal(r.memoryBudgetBytes, 5.2e9);
  assert.deepEqual(r.warnings, []);
});

test('an Orin Nano 4 GB is not taken for the 8 GB one: generic profile, with a warning naming the memory', async () => {
  const warned: string[] = [];
  const r = await resolveProfile({ root: fixture('orin-nano-4gb'), arch: 'arm64', cpus: 6, probe: staticProber(['cpu']), warn: (m) => warned.push(m) });
  assert.equal(r.profile.id, 'generic-aarch64');
  assert.ok(warned.some((w) => w.includes('jetson-orin-nano-8gb') && w.includes('MemTotal')), warned.join('\n'));
});

test('a fraction budget is that fraction of the detected MemTotal', async () => {
  const r = await resolveProfile({ root: fixture('generic-x86'), arch: 'x64', cpus: 16, probe: staticProber(['cpu']), warn: quiet });
  assert.equal(r.memoryBudgetBytes, Math.floor(0.6 * fixtureMemTotal('generic-x86')));
  assert.equal(r.threads, 16);
});

test('bad profiles: the error names the file and the field', () => {
  const good = JSON.parse(readFileSync(path.join(builtinProfilesDir(), 'raspberry-pi-5-8gb.json'), 'utf8')) as Record<string, unknown>;
  const write = (name: string, value: unknown) => {
    const file = path.join(tmp, name);
    writeFileSync(file, typeof value === 'string' ? value : JSON.stringify(value));
    return file;
  };
  let file = write('bad-ep.json', { ...good, executionProviders: [{ name: 'vulkan' }] });
  rejects(() => loadProfileFile(file), file, 'field "executionProviders.0.name"');
  file = write('typo.json', { ...good, memoryBudgetByte: 4e9 });
  rejects(() => loadProfileFile(file), file, 'memoryBudgetByte');
  const { memoryBudgetBytes: _drop, ...noBudget } = good;
  file = write('no-budget.json', noBudget);
  rejects(() => loadProfileFile(file), file, 'field "memoryBudgetBytes"');
  file = write('neg-threads.json', { ...good, finetune: { ...(good.finetune as object), seqLen: -1 } });
  rejects(() => loadProfileFile(file), file, 'field "finetune.seqLen"');
  file = write('not-json.json', '{ "id": ');
  rejects(() => loadProfileFile(file), file, 'not valid JSON');
});

test('--profile ./file.json loads and validates a user profile; --profile <id> picks a shipped one', async () => {
  const good = JSON.parse(readFileSync(path.join(builtinProfilesDir(), 'generic-x86-64.json'), 'utf8')) as Record<string, unknown>;
  const file = path.join(tmp, 'my-device.json');
  writeFileSync(file, JSON.stringify({ ...good, id: 'my-device', memoryBudgetFraction: undefined, memoryBudgetBytes: 3e9, threads: 3 }));
  const r = await resolveProfile({ profile: file, root: fixture('generic-x86'), arch: 'x64', cpus: 16, probe: staticProber(['cpu']), warn: quiet });
  assert.equal(r.profile.id, 'my-device');
  assert.equal(r.chosenBy, 'file');
  assert.equal(r.memoryBudgetBytes, 3e9);
  assert.equal(r.threads, 3);
  const warned: string[] = [];
  const named = await resolveProfile({ profile: 'jetson-agx-orin-64gb', root: fixture('generic-x86'), arch: 'x64', cpus: 16, probe: staticProber(['cpu']), warn: (m) => warned.push(m) });
  assert.equal(named.profile.id, 'jetson-agx-orin-64gb');
  assert.equal(named.threads, 12);
  assert.ok(warned.some((w) => w.includes('does not match this device')), warned.join('\n'));
  await assert.rejects(resolveProfile({ profile: 'jetson-nano-2gb', probe: staticProber(['cpu']), warn: quiet }), /unknown device profile "jetson-nano-2gb"/);
});

async function orinWith(available: EpName[], customBuild: Record<string, unknown> | null = null) {
  const warned: string[] = [];
  const r = await resolveProfile({ root: fixture('orin-nano-8gb'), arch: 'arm64', cpus: 6, probe: staticProber(available, { customBuild }), warn: (m) => warned.push(m) });
  return { r, warned };
}

test('TensorRT missing: CUDA then CPU, with a warning naming TensorRT; nf4 stays', async () => {
  const { r, warned } = await orinWith(['cuda', 'cpu']);
  assert.deepEqual(r.providers.use, ['cuda', 'cpu']);
  assert.equal(warned.length, 1, warned.join('\n'));
  assert.match(warned[0] ?? '', /TensorRT execution provider is not available.*falling back to CUDA/);
  assert.equal(r.defaultFormat, 'nf4');
  const so = r.sessionOptions();
  assert.deepEqual(so.executionProviders, [{ name: 'cuda', deviceId: 0 }, 'cpu']);
  assert.equal(so.intraOpNumThreads, 6);
  assert.equal(r.sessionOptions({ intraOpNumThreads: 2 }).intraOpNumThreads, 2);
});

test('no GPU provider: CPU only, warnings name TensorRT and CUDA, format falls back to int4', async () => {
  const { r, warned } = await orinWith(['cpu']);
  assert.deepEqual(r.providers.use, ['cpu']);
  assert.deepEqual(r.sessionOptions().executionProviders, ['cpu']);
  assert.ok(warned.some((w) => w.startsWith('TensorRT') && w.includes('falling back to CPU')), warned.join('\n'));
  assert.ok(warned.some((w) => w.startsWith('CUDA') && w.includes('falling back to CPU')), warned.join('\n'));
  assert.equal(r.defaultFormat, 'int4');
  assert.ok(warned.some((w) => w.includes('int4')));
});

test('all present on a native/ build: TensorRT gets fp16 and the engine cache via providerOptions, no warnings', async () => {
  const { r, warned } = await orinWith(['tensorrt', 'cuda', 'cpu'], { providerOptionsPatch: true });
  assert.deepEqual(warned, []);
  const eps = r.sessionOptions().executionProviders ?? [];
  assert.deepEqual(eps[0], {
    name: 'tensorrt',
    deviceId: 0,
    providerOptions: { trt_fp16_enable: '1', trt_engine_cache_enable: '1', trt_engine_cache_path: `${os.homedir()}/.cache/edgelora/trt` },
  });
  for (const build of [null, { providerOptionsPatch: false }]) {
    const stock = await orinWith(['tensorrt', 'cuda', 'cpu'], build);
    assert.ok(stock.warned.some((w) => w.includes('passes only deviceId')), stock.warned.join('\n'));
  }
});

test('a profile whose providers are all missing is refused, naming them', async () => {
  const file = path.join(tmp, 'gpu-only.json');
  const good = JSON.parse(readFileSync(path.join(builtinProfilesDir(), 'jetson-orin-nano-8gb.json'), 'utf8')) as { executionProviders: unknown[] };
  writeFileSync(file, JSON.stringify({ ...good, id: 'gpu-only', executionProviders: good.executionProviders.slice(0, 2) }));
  await assert.rejects(
    resolveProfile({ profile: file, root: fixture('orin-nano-8gb'), arch: 'arm64', cpus: 6, probe: staticProber(['cpu']), warn: quiet }),
    (err: unknown) => err instanceof EdgeloraError && err.message.includes('TensorRT, CUDA') && (err.hint ?? '').includes('cpu'),
  );
});

test('inference estimate: model bytes + 2·layers·kvHeads·headDim·ctx·4·batch', () => {
  const input = { modelBytes: 700e6, layers: 22, kvHeads: 4, headDim: 64, context: 2048, batch: 2 };
  // Independent count: one K and one V float32 per (layer, head, dim, position, sequence).
  let kv = 0;
  for (let l = 0; l < input.layers; l++) kv += 2 * input.kvHeads * input.headDim * input.context * input.batch * 4;
  const plan = estimateInferenceMemory(input, { what: 'TinyLlama' });
  assert.equal(plan.bytes, input.modelBytes + kv);
  assert.equal(plan.breakdown['model weights'], input.modelBytes);
});

test('over-budget plans are refused with the estimate, the budget, the biggest items and what to lower', async () => {
  const { r } = await orinWith(['cuda', 'cpu']);
  const fits = estimateInferenceMemory({ modelBytes: 700e6, layers: 22, kvHeads: 4, headDim: 64, context: 2048 });
  r.checkMemoryPlan(fits); // 0.79 GB < 5.2 GB: no throw
  const big = estimateInferenceMemory({ modelBytes: 4.5e9, layers: 32, kvHeads: 8, headDim: 128, context: 8192 }, { what: 'Llama-3-8B' });
  rejects(() => r.checkMemoryPlan(big), 'Llama-3-8B', '5.20 GB', 'model weights 4.50 GB', 'KV cache', '--max-context', 'jetson-orin-nano-8gb');
  const finetune = {
    what: 'fine-tune (batch 4 × 1024 tokens)',
    bytes: 6.1e9,
    breakdown: { 'base weights': 2.2e9, activations: 3.1e9, 'LoRA + Adam state': 0.8e9 },
    lower: ['--seq-len', '--batch-size', 'use --recompute'],
  };
  rejects(() => r.checkMemoryPlan(finetune), 'needs about 6.10 GB', 'allows 5.20 GB', 'activations 3.10 GB', '--seq-len, --batch-size, or use --recompute');
  rejects(() => checkMemoryPlan({ ...finetune, bytes: Number.NaN }, 1e9, 'x'), 'bad total');
});

test('overrides: --profile-set values parse, apply by dotted path or alias, and are validated', async () => {
  const sets = parseProfileSets(['memoryBudgetBytes=4e9', 'finetune.seqLen=128', 'finetune.targets=q_proj,v_proj,o_proj', 'defaultFormat=int4', 'recompute=false']);
  assert.deepEqual(sets, { memoryBudgetBytes: 4e9, 'finetune.seqLen': 128, 'finetune.targets': ['q_proj', 'v_proj', 'o_proj'], defaultFormat: 'int4', recompute: false });
  const r = await resolveProfile({ root: fixture('generic-x86'), arch: 'x64', cpus: 16, overrides: sets, probe: staticProber(['cpu']), warn: quiet });
  assert.equal(r.memoryBudgetBytes, 4e9);
  assert.equal(r.memoryBudgetWhy, 'override');
  assert.equal(r.finetuneDefaults.seqLen, 128);
  assert.equal(r.finetuneDefaults.recompute, false);
  assert.deepEqual(r.finetuneDefaults.targets, ['q_proj', 'v_proj', 'o_proj']);
  const nano = loadBuiltinProfiles().find((l) => l.profile.id === 'jetson-orin-nano-8gb')?.profile;
  assert.ok(nano);
  assert.equal(applyOverrides(nano, { 'executionProviders.0.fp16': false }).executionProviders[0]?.fp16, false);
  rejects(() => applyOverrides(nano, { threads: 0 }), '--profile-set threads', 'field "threads"');
  rejects(() => applyOverrides(nano, { 'nosuch.field': 1 }), 'nosuch.field');
  rejects(() => applyOverrides(nano, { defaultFormat: 'fp8' }), 'field "defaultFormat"');
  rejects(() => parseProfileSets(['memoryBudgetBytes']), 'KEY=VALUE');
});

test('the inference plan with runtime details adds the process, prepacked copies, the in-graph KV copy and activations', () => {
  const base = { modelBytes: 140e6, layers: 12, kvHeads: 4, headDim: 64, context: 256 };
  const runtime = { vocab: 32000, hidden: 768, intermediate: 2048, tiedEmbeddings: true, prefillTokens: 128 };
  const kv = 2 * 12 * 4 * 64 * 256 * 4;
  const plain = estimateInferenceMemory(base);
  const nf4 = estimateInferenceMemory({ ...base, runtime: { ...runtime, format: 'nf4' } });
  const int4 = estimateInferenceMemory({ ...base, runtime: { ...runtime, format: 'int4' } });
  assert.equal(plain.bytes, base.modelBytes + kv);
  assert.equal(nf4.breakdown['KV cache, in-graph copy'], kv);
  assert.equal(nf4.breakdown['prepacked lm_head'], undefined, 'nf4 sessions do not prepack');
  assert.equal(int4.breakdown['prepacked lm_head'], 32000 * 768 * 4);
  // int4 linears at block 32: per weight 0.5 byte of codes, 4/32 of scales, 0.5/32 of zero points. ORT keeps the
  // codes packed plus three scales' worth (prepackedNBitsBytes); the linears' bytes leave the file-backed figure.
  const lin = 140e6 - 32000 * 768 * 4;
  const scales = (lin * (4 / 32)) / (0.5 + 4.5 / 32);
  const codes = lin - scales - scales / 8;
  assert.ok(Math.abs(int4.breakdown['prepacked int4 weights']! - (codes + 3 * scales)) < 1, `prepacked int4 weights ${int4.breakdown['prepacked int4 weights']}`);
  assert.ok(Math.abs(int4.breakdown['model weights']! - (140e6 - codes - scales)) < 1, `model weights ${int4.breakdown['model weights']}`);
  for (const plan of [nf4, int4]) {
    const sum = Object.values(plan.breakdown).reduce((a, b) => a + b, 0);
    assert.equal(plan.bytes, sum, 'the total is the sum of the items');
  }
  assert.ok(int4.bytes > nf4.bytes && nf4.bytes > plain.bytes);
});

test('the 4-bit format message says what happens for the model directory at hand', async () => {
  const orin = async (modelFormat: 'nf4' | 'fp4' | 'int4' | undefined, available: EpName[] = ['cpu']) => {
    const warned: string[] = [];
    const r = await resolveProfile({ profile: 'jetson-orin-nano-8gb', root: fixture('orin-nano-8gb'), arch: 'arm64', cpus: 6, probe: staticProber(available), warn: (m) => warned.push(m), ...(modelFormat ? { modelFormat } : {}) });
    return { r, format: warned.filter((w) => /nf4|int4|fp4|MatMulBnb4/.test(w) && !/falling back/.test(w)) };
  };
  // An nf4 model without CUDA: what runs (MatMulBnb4 on the CPU) and what to do, not "defaulting to int4".
  const nf4 = await orin('nf4');
  assert.equal(nf4.format.length, 1, nf4.format.join('\n'));
  assert.match(nf4.format[0]!, /^model is nf4: .*MatMulBnb4 runs on the CPU here .*7x slower than int4.*re-quantize .*--format int4 for speed$/);
  assert.doesNotMatch(nf4.format[0]!, /defaulting/);
  assert.match((await orin('fp4')).format[0] ?? '', /^model is fp4: /);
  // An int4 model on the CPU is what the CPU runs well: nothing to say.
  assert.deepEqual((await orin('int4')).format, []);
  // With CUDA an nf4 model runs its MatMulBnb4 on the GPU: nothing to say either.
  assert.deepEqual((await orin('nf4', ['cuda', 'cpu'])).format, []);
  // No model yet (a format is being chosen, doctor): the int4 default is named, as before.
  const choosing = await orin(undefined);
  assert.equal(choosing.r.defaultFormat, 'int4');
  assert.equal(choosing.format.length, 1, choosing.format.join('\n'));
  assert.match(choosing.format[0]!, /profile prefers nf4.*defaulting to int4 \(quantize with --format int4\)/);
});
