// One process per device (issue #12), small int4 preset, two measurements:
//  1. peak RSS of `edgelora serve --state` running a fine-tuning job (VmHWM of the serve process,
//     from /proc, after the job succeeded) against `edgelora finetune` alone with the same settings
//     (its own peak RSS, from --json); target ≤ 1.15×.
//  2. requests that fail (error, or a text that is neither the old nor the new adapter's greedy
//     text) while 4 clients stream continuously and the hub pushes 20 adapters in turn to
//     `edgelora serve --broker …`; target 0. Mosquitto, the hub and serve are separate processes.
// Writes bench-results/device.json and prints a table. Run it alone (`flock
// /tmp/edgelora-bench.lock npm run bench:device`): figures are noisy on a shared machine.
// Flags: --steps N (job and finetune, default 20), --pushes N (default 20), --clients N (default 4).
import path from 'node:path';
import { promises as fs, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { spawn, type ChildProcess } from 'node:child_process';
import { parseArgs } from 'node:util';
import { benchModel, printTable, writeJson } from './bench-common.js';
import { Mosquitto, waitFor } from '../test/sync/helpers.ts';
import { writeKeyPair } from '../src/sync/protocol/signing.js';
import { readManifest } from '../src/model/manifest.js';
import { parseHfConfig } from '../src/formats/hf-config.js';
import { Rng } from '../src/util/rng.js';
import { saveAdapter, makePeftConfig, moduleRankAlpha, type LoraModule } from '../src/adapters/peft.js';
import { linearShape, type Proj } from '../src/model/llama.js';

const { values: flags } = parseArgs({ options: { steps: { type: 'string' }, pushes: { type: 'string' }, clients: { type: 'string' } } });
const STEPS = Number(flags.steps ?? 20);
const PUSHES = Number(flags.pushes ?? 20);
const CLIENTS = Number(flags.clients ?? 4);
const CLI = path.resolve('src/cli/main.ts');
const DATA = path.resolve('examples/personal.jsonl');
const work = mkdtempSync(path.join(os.tmpdir(), 'edgelora-bench-device-'));
const HP = { steps: STEPS, batch_size: 1, seq_len: 128, rank: 8, alpha: 16, targets: ['q_proj', 'v_proj'] as Proj[], learning_rate: 2e-4, lora_dropout: 0.05, seed: 0 };

interface Proc { child: ChildProcess; out: string; err: string }
function start(args: string[]): Proc {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const p: Proc = { child, out: '', err: '' };
  child.stdout?.on('data', (d: Buffer) => (p.out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (p.err += d.toString()));
  return p;
}
const exited = (p: Proc) => new Promise<number | null>((r) => (p.child.exitCode !== null ? r(p.child.exitCode) : p.child.once('exit', r)));
async function stop(p: Proc): Promise<void> {
  if (p.child.exitCode !== null) return;
  p.child.kill('SIGTERM');
  await exited(p);
}
async function startServe(args: string[]): Promise<{ p: Proc; url: string }> {
  const p = start(['serve', ...args, '--port', '0']);
  await waitFor('serve ready', () => /ready/.test(p.out) || p.child.exitCode !== null, 120_000);
  if (p.child.exitCode !== null) throw new Error(`serve exited: ${p.err}`);
  return { p, url: /listening on (http:\S+)/.exec(p.out)![1]! };
}
const vmHwm = (pid: number) => Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;
const post = (url: string, body: unknown) => fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

const model = await benchModel('int4', 'small');
const manifest = await readManifest(model);
const cfg = parseHfConfig(manifest.sourceConfig, model);
const MiB = (b: number) => Number((b / 2 ** 20).toFixed(1));

// ---- 1. peak RSS: finetune alone vs serve + the same job ----
const ft = start(['finetune', '--model', model, '--data', DATA, '--out', path.join(work, 'ft-alone'), '--steps', String(STEPS), '--batch-size', '1', '--seq-len', '128', '--rank', '8', '--alpha', '16', '--targets', 'q_proj,v_proj', '--lr', '2e-4', '--lora-dropout', '0.05', '--seed', '0', '--profile', 'generic-x86-64', '--json']);
if ((await exited(ft)) !== 0) throw new Error(`finetune failed: ${ft.err}`);
const alone = JSON.parse(ft.out.trim().split('\n').pop()!) as { peak_rss_bytes: number; tokens_per_s: number };

const s1 = await startServe(['--model', model, '--ctx', '256', '--max-batch', '4', '--state', path.join(work, 'state-rss'), '--profile', 'generic-x86-64']);
const rssServeIdle = vmHwm(s1.p.child.pid!);
const f = (await (await post(`${s1.url}/v1/files`, { purpose: 'fine-tune', filename: 'personal.jsonl', content: await fs.readFile(DATA, 'utf8') })).json()) as { id: string };
const jr = await post(`${s1.url}/v1/fine_tuning/jobs`, { training_file: f.id, hyperparameters: HP });
if (jr.status !== 200) throw new Error(`job refused: ${await jr.text()}`);
const job = (await jr.json()) as { id: string };
// One client keeps asking while the job runs: its requests queue during training and are answered after.
let served = 0;
let serving = true;
const during = (async () => {
  while (serving) {
    const r = await post(`${s1.url}/v1/completions`, { model: path.basename(model), prompt: 'Hello', max_tokens: 16, temperature: 0 });
    if (r.ok) served++;
    await r.text();
  }
})();
await waitFor('job done', async () => ['succeeded', 'failed', 'cancelled'].includes(((await (await fetch(`${s1.url}/v1/fine_tuning/jobs/${job.id}`)).json()) as { status: string }).status), 600_000);
serving = false;
await during;
const rssServeJob = vmHwm(s1.p.child.pid!);
const jobDone = (await (await fetch(`${s1.url}/v1/fine_tuning/jobs/${job.id}`)).json()) as { status: string; error: unknown };
await stop(s1.p);
if (jobDone.status !== 'succeeded') throw new Error(`job ${jobDone.status}: ${JSON.stringify(jobDone.error)}`);

// ---- 2. 20 pushes while 4 clients stream ----
async function adapter(dir: string, seed: number): Promise<void> {
  const config = makePeftConfig({ r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], rslora: false });
  const rng = new Rng(seed);
  const modules: LoraModule[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of ['q_proj', 'v_proj'] as Proj[]) {
      const { N, K } = linearShape(cfg, p);
      const { r, alpha, scale } = moduleRankAlpha(config, l, p);
      modules.push({ layer: l, proj: p, r, alpha, scale, a: Float32Array.from({ length: r * K }, () => rng.normal() * 0.05), b: Float32Array.from({ length: N * r }, () => rng.normal() * 0.05) });
    }
  }
  await saveAdapter(dir, { config, modules, baseFingerprint: manifest.fingerprint });
}
const keys = await writeKeyPair(path.join(work, 'hub'));
const mosq = await Mosquitto.start();
const hub = start(['hub', '--broker', mosq.url, '--store', path.join(work, 'store'), '--key', keys.keyFile, '--allow-plaintext', '--coalesce-ms', '50', '--quiet']);
const s2 = await startServe(['--model', model, '--ctx', '256', '--max-batch', '8', '--broker', mosq.url, '--device-id', 'dev-1', '--fleet', 'bench', '--trust', keys.pubFile, '--state', path.join(work, 'state-push'), '--profile', 'generic-x86-64']);
const base = path.basename(model);
const fleetActive = async () => ((await (await fetch(`${s2.url}/health`)).json()) as { fleet: { fleet_active: string | null; swaps_with_rows_in_flight: number } }).fleet;
let streams = 0;
let failed = 0;
let running = true;
const failures: string[] = [];
const clients = Array.from({ length: CLIENTS }, async () => {
  while (running) {
    try {
      const r = await post(`${s2.url}/v1/completions`, { model: base, prompt: 'Once upon a time', max_tokens: 48, temperature: 0, stream: true });
      const text = await r.text();
      if (!r.ok || !text.includes('data: [DONE]') || text.includes('"error"')) {
        failed++;
        failures.push(text.slice(0, 200));
      }
      streams++;
    } catch (err) {
      failed++;
      failures.push((err as Error).message);
    }
  }
});
const pushMs: number[] = [];
for (let i = 0; i < PUSHES; i++) {
  const dir = path.join(work, 'push', `p${i}`);
  await adapter(dir, 1000 + i);
  const t0 = performance.now();
  const pub = start(['publish', dir, '--broker', mosq.url, '--to', 'fleet:bench', '--name', `p${i}`]);
  if ((await exited(pub)) !== 0) throw new Error(`publish ${i} failed: ${pub.err}`);
  await waitFor(`p${i} active`, async () => (await fleetActive()).fleet_active === `${base}:p${i}`, 120_000);
  pushMs.push(performance.now() - t0);
}
running = false;
await Promise.all(clients);
const fleet = await fleetActive();
await stop(s2.p);
await stop(hub);
await mosq.stop();
await fs.rm(work, { recursive: true, force: true });

const ratio = rssServeJob / alone.peak_rss_bytes;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const result = {
  preset: 'small', format: 'int4', steps: STEPS, hyperparameters: HP,
  rss: { finetune_alone_mib: MiB(alone.peak_rss_bytes), serve_idle_mib: MiB(rssServeIdle), serve_plus_job_mib: MiB(rssServeJob), ratio: Number(ratio.toFixed(3)), target: 1.15, requests_served_during_job: served },
  pushes: { pushes: PUSHES, clients: CLIENTS, streams, failed, target_failed: 0, swaps_with_rows_in_flight: fleet.swaps_with_rows_in_flight, push_to_active_ms_median: Math.round(median(pushMs)), failures: failures.slice(0, 5) },
};
printTable([
  { measure: 'peak RSS finetune alone', value: `${result.rss.finetune_alone_mib} MiB`, target: '' },
  { measure: 'peak RSS serve idle (base loaded)', value: `${result.rss.serve_idle_mib} MiB`, target: '' },
  { measure: 'peak RSS serve + job', value: `${result.rss.serve_plus_job_mib} MiB`, target: '' },
  { measure: 'serve+job / finetune alone', value: `${result.rss.ratio}×`, target: '≤ 1.15×' },
  { measure: `requests failed (${PUSHES} pushes, ${CLIENTS} streaming clients, ${streams} streams)`, value: failed, target: '0' },
  { measure: 'swaps with streams in flight', value: fleet.swaps_with_rows_in_flight, target: '' },
  { measure: 'push → active, median', value: `${result.pushes.push_to_active_ms_median} ms`, target: '' },
]);
console.log(`wrote ${await writeJson('device.json', result)}`);
