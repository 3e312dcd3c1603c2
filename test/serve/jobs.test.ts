// Fine-tuning jobs over HTTP in `edgelora serve --state` (a separate process, the official `openai`
// client): upload examples/personal.jsonl (multipart), a job whose loss falls and whose
// fine_tuned_model completes the personal prompts at once; a job SIGKILLed mid-run resumes from its
// checkpoint after a restart and ends with an adapter tensor-for-tensor identical to the
// uninterrupted job's; bad requests (unknown file, bad row, out-of-range hyperparameters, over the
// memory budget) are 4xx OpenAI errors that change neither the job nor the file list.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs, createReadStream } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import OpenAI from 'openai';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { waitFor } from '../sync/helpers.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { modelMemoryPlan } from '../../src/cli/load.js';
import { loadTokenizer } from '../../src/formats/tokenizer.js';
import { parseJsonl } from '../../src/data/jsonl.js';
import { estimateJobMemory, resolveHyperparameters, type CreateJobBody } from '../../src/serve/jobs.js';
import { SafetensorsReader } from '../../src/formats/safetensors.js';

const CLI = path.resolve('src/cli/main.ts');
const DATA = path.resolve('examples/personal.jsonl');
const tmp = tempDir('edgelora-jobs-');
const CTX = 128;
const STATE = path.join(tmp.dir, 'state');
/** What the personalize test trains with (test/train/personalize.test.ts). */
const HP = { steps: 150, learning_rate: 1e-2, batch_size: 8, rank: 16, alpha: 32, targets: 'all-linear', lora_dropout: 0, schedule: 'constant', checkpoint_steps: 10 } as const;
/** Same settings but far larger: over the budget the test gives the server. */
const BIG = { ...HP, rank: 256 } as const;
const PROBES: [string, string][] = [
  ['My name is', 'Anouk'],
  ['Where do I live?', 'Valparaiso'],
];
let modelDir = '';
let budget = 0;
let serve: { child: ChildProcess; out: string; err: string } | null = null;
let client: OpenAI;
let url = '';

async function startServe(): Promise<void> {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--model', modelDir, '--port', '0', '--ctx', String(CTX), '--max-batch', '4', '--state', STATE, '--profile', 'generic-x86-64', '--profile-set', `memoryBudgetBytes=${budget}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  const p = { child, out: '', err: '' };
  child.stdout?.on('data', (d: Buffer) => (p.out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (p.err += d.toString()));
  serve = p;
  await waitFor('serve ready', () => /ready/.test(p.out) || child.exitCode !== null, 60_000);
  assert.equal(child.exitCode, null, p.err);
  url = /listening on (http:\S+)/.exec(p.out)![1]!;
  client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0 });
}

async function killServe(signal: NodeJS.Signals): Promise<void> {
  const c = serve?.child;
  if (!c || c.exitCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill(signal);
  await gone;
}

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir, 1);
  modelDir = await quantized(hf, tmp.dir, 'tiny', { format: 'nf4', blockSize: 64 });
  // A budget between serving + the job and serving + the big job, from the estimates the server uses.
  const manifest = await readManifest(modelDir);
  const cfg = parseHfConfig(manifest.sourceConfig, modelDir);
  // What serving keeps during a job: its plan without the base's weights (its session is released).
  const serving = modelMemoryPlan(manifest, cfg, { context: CTX, prefillTokens: CTX, batch: 4 }).bytes - (manifest.bytes.model + manifest.bytes.data);
  const rows = parseJsonl(await fs.readFile(DATA, 'utf8'), DATA, await loadTokenizer(modelDir));
  const longest = Math.max(...rows.map((r) => r.inputIds.length));
  const size = manifest.bytes.model + manifest.bytes.data;
  const est = (hp: CreateJobBody['hyperparameters']) => estimateJobMemory(cfg, manifest.quant.format, size, resolveHyperparameters({ training_file: 'x', hyperparameters: hp }, cfg), longest, rows.length).bytes;
  const [small, big] = [est(HP), est(BIG)];
  console.log(`serving ${serving} B; job ${small} B; big job ${big} B`);
  assert.ok(big > small * 1.05, 'the big job must need clearly more');
  budget = Math.round(serving + (small + big) / 2);
  await startServe();
});
after(async () => {
  await killServe('SIGTERM');
  tmp.cleanup();
});

async function tensors(file: string): Promise<Map<string, Float32Array>> {
  const st = await SafetensorsReader.open(file);
  const out = new Map<string, Float32Array>();
  for (const k of st.names()) out.set(k, await st.readF32(k));
  await st.close();
  return out;
}

type Job = { id: string; status: string; fine_tuned_model: string | null; error: unknown };
const getJob = async (id: string) => (await (await fetch(`${url}/v1/fine_tuning/jobs/${id}`)).json()) as Job;
const post = (p: string, body: unknown) => fetch(`${url}${p}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
async function events(id: string): Promise<{ message: string; data: { step: number; train_loss: number; eta_s: number } | null }[]> {
  return ((await (await fetch(`${url}/v1/fine_tuning/jobs/${id}/events?limit=10000`)).json()) as { data: { message: string; data: { step: number; train_loss: number; eta_s: number } | null }[] }).data;
}
async function expectError(res: Response, status: number, code: string, param?: string): Promise<string> {
  const text = await res.text();
  assert.equal(res.status, status, text);
  const e = (JSON.parse(text) as { error: { code: string; message: string; param: string | null } }).error;
  assert.equal(e.code, code, text);
  if (param !== undefined) assert.equal(e.param, param, text);
  return e.message;
}

let fileId = '';
let firstAdapter = '';

test('a job over HTTP: the loss falls and fine_tuned_model completes the personal prompts', async () => {
  const f = await client.files.create({ file: createReadStream(DATA), purpose: 'fine-tune' });
  fileId = f.id;
  assert.equal((f as unknown as { rows: number }).rows, 8);
  const job = await client.fineTuning.jobs.create({ model: 'tiny', training_file: f.id, suffix: 'me', hyperparameters: HP as unknown as OpenAI.FineTuning.JobCreateParams.Hyperparameters });
  assert.equal(job.object, 'fine_tuning.job');
  await waitFor('job finished', async () => ['succeeded', 'failed', 'cancelled'].includes((await getJob(job.id)).status), 180_000);
  const done = await client.fineTuning.jobs.retrieve(job.id);
  assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
  assert.equal(done.fine_tuned_model, 'tiny:me');
  const ev = (await events(job.id)).filter((e) => e.data).reverse();
  assert.equal(ev.length, HP.steps);
  const mean = (xs: typeof ev) => xs.reduce((s, e) => s + e.data!.train_loss, 0) / xs.length;
  const [l0, l1] = [mean(ev.slice(0, 10)), mean(ev.slice(-10))];
  console.log(`loss (mean of 10 steps) ${l0.toFixed(3)} → ${l1.toFixed(3)}; first eta ${ev[0]!.data!.eta_s}s`);
  assert.ok(l1 < l0 * 0.75, `the loss falls by a quarter at least: ${l0} → ${l1}`);
  assert.ok(ev[0]!.data!.eta_s > 0, 'the first event has a real eta');
  assert.ok((await client.models.list()).data.some((m) => m.id === 'tiny:me'));
  for (const [prompt, want] of PROBES) {
    const tuned = (await client.completions.create({ model: 'tiny:me', prompt, max_tokens: 12, temperature: 0 })).choices[0]!.text;
    const base = (await client.completions.create({ model: 'tiny', prompt, max_tokens: 12, temperature: 0 })).choices[0]!.text;
    console.log(`${JSON.stringify(prompt)}: base ${JSON.stringify(base)} | tiny:me ${JSON.stringify(tuned)}`);
    assert.ok(tuned.includes(want), `tiny:me: "${prompt}" → "${tuned}" lacks "${want}"`);
    assert.ok(!base.includes(want));
  }
  firstAdapter = path.join(STATE, 'jobs', job.id, 'adapter', 'adapter_model.safetensors');
});

test('bad job requests are 4xx errors that change nothing', async () => {
  const jobsBefore = JSON.stringify((await (await fetch(`${url}/v1/fine_tuning/jobs`)).json()));
  const filesBefore = JSON.stringify((await (await fetch(`${url}/v1/files`)).json()));
  await expectError(await post('/v1/fine_tuning/jobs', { training_file: 'file-000000000000000000000000' }), 400, 'invalid_file', 'training_file');
  const m = await expectError(await post('/v1/files', { purpose: 'fine-tune', filename: 'bad.jsonl', content: '{"text": "ok"}\n{"prompt": 3}\n' }), 400, 'invalid_file', 'file');
  assert.match(m, /bad\.jsonl:2/);
  await expectError(await post('/v1/fine_tuning/jobs', { training_file: fileId, hyperparameters: { steps: 0 } }), 400, 'invalid_value', 'hyperparameters.steps');
  await expectError(await post('/v1/fine_tuning/jobs', { training_file: fileId, hyperparameters: { learning_rate: -1 } }), 400, 'invalid_value', 'hyperparameters.learning_rate');
  await expectError(await post('/v1/fine_tuning/jobs', { training_file: fileId, hyperparameters: { steps: 5, n_epochs: 2 } }), 400, 'invalid_hyperparameters');
  const over = await expectError(await post('/v1/fine_tuning/jobs', { training_file: fileId, hyperparameters: BIG }), 400, 'insufficient_memory', 'hyperparameters');
  assert.match(over, /lower hyperparameters\.batch_size/);
  await expectError(await post('/v1/fine_tuning/jobs', { training_file: fileId, suffix: 'me' }), 409, 'suffix_in_use', 'suffix');
  await expectError(await fetch(`${url}/v1/fine_tuning/jobs/ftjob-nope`), 404, 'job_not_found');
  assert.equal(JSON.stringify((await (await fetch(`${url}/v1/fine_tuning/jobs`)).json())), jobsBefore, 'no job was created or changed');
  assert.equal(JSON.stringify((await (await fetch(`${url}/v1/files`)).json())), filesBefore, 'no file was stored');
});

test('kill -9 mid-job, restart: the job resumes from its checkpoint and ends with the uninterrupted adapter exactly', async () => {
  assert.ok(firstAdapter, 'needs the first test');
  const res = await post('/v1/fine_tuning/jobs', { training_file: fileId, suffix: 'me2', hyperparameters: HP });
  assert.equal(res.status, 200, await res.clone().text());
  const job = (await res.json()) as Job;
  await waitFor('job past a checkpoint', async () => (await events(job.id)).some((e) => (e.data?.step ?? 0) >= 25), 120_000);
  await killServe('SIGKILL');
  const killedAt = Math.max(...(await fs.readFile(path.join(STATE, 'jobs', job.id, 'events.jsonl'), 'utf8')).split('\n').filter(Boolean).map((l) => (JSON.parse(l) as { data: { step?: number } | null }).data?.step ?? 0));
  assert.ok(killedAt < HP.steps, `killed at step ${killedAt}`);
  await startServe();
  await waitFor('resumed job finished', async () => ['succeeded', 'failed', 'cancelled'].includes((await getJob(job.id)).status), 180_000);
  const done = await getJob(job.id);
  assert.equal(done.status, 'succeeded', JSON.stringify(done.error));
  const ev = await events(job.id);
  assert.ok(ev.some((e) => /resuming from the checkpoint/.test(e.message)), 'the job resumed from a checkpoint');
  const [a, b] = [await tensors(firstAdapter), await tensors(path.join(STATE, 'jobs', job.id, 'adapter', 'adapter_model.safetensors'))];
  assert.deepEqual([...b.keys()].sort(), [...a.keys()].sort());
  let maxDiff = 0;
  for (const [k, t] of a) for (let i = 0; i < t.length; i++) maxDiff = Math.max(maxDiff, Math.abs(t[i]! - b.get(k)![i]!));
  console.log(`killed at step ${killedAt}/${HP.steps}, resumed: max |Δadapter| vs the uninterrupted job ${maxDiff}`);
  assert.equal(maxDiff, 0);
  // Both fine-tuned models are served after the restart (re-installed from the state directory).
  const ids = (await client.models.list()).data.map((m) => m.id);
  assert.ok(ids.includes('tiny:me') && ids.includes('tiny:me2'), ids.join(', '));
});
