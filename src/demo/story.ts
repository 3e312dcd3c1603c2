// The whole story in one process (what `npm start` runs): an embedded MQTT broker (aedes), a hub and
// N devices, each an `edgelora serve` server (src/serve/server.ts, in this process) with its fleet
// agent inside, on loopback. device-a personalizes through its HTTP API: the user's data goes up as
// a file (POST /v1/files), a fine-tuning job trains on the device's own base (POST
// /v1/fine_tuning/jobs, upload: true) and its adapter is served at once, then uploaded to the hub
// through the agent's sealed, resumable upload; the hub signs it and publishes it to the fleet; every
// device receives, verifies and activates it at a token boundary; then both devices answer the
// personal prompts through /v1/chat/completions, while the base had not.
import path from 'node:path';
import os from 'node:os';
import { existsSync, promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import { makeDemoModel } from '../formats/demo-model.js';
import { quantizeModel } from '../model/quantize.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../adapters/peft.js';
import { Hub, startEmbeddedBroker, generateSigningKey, type Agent, type EmbeddedBroker } from '../sync/index.js';
import { generateEncKey } from '../sync/protocol/envelope.js';
import { enroll, enrolmentFromStatus } from '../sync/hub/enrolment.js';
import { startServe, type RunningServer } from '../serve/server.js';
import { EdgeloraError } from '../util/errors.js';
import { Progress } from '../util/progress.js';

export interface StoryOptions {
  /** Working directory for models, device state and the hub store (default .cache/demo). */
  readonly cache: string;
  /** External broker URL instead of the embedded one. */
  readonly broker?: string;
  /** Number of devices, ≥ 2 (default 2). */
  readonly devices: number;
  /** Fine-tuning steps (default 150). */
  readonly steps: number;
  /** JSONL data of the fictional user. */
  readonly data: string;
  /** Probes: a user's chat message → what the personalized answer must contain. */
  readonly probes: readonly (readonly [string, string])[];
  readonly seed: number;
  /** Print nothing but the final JSON. */
  readonly json: boolean;
  /** Keep the broker, hub and servers running after the story (until Ctrl-C). */
  readonly keepRunning: boolean;
  readonly say: (line: string) => void;
}

export interface Answer {
  readonly prompt: string;
  readonly text: string;
  readonly personalized: boolean;
}

export interface DeviceReport {
  readonly device: string;
  readonly url: string;
  readonly adapter: string | null;
  readonly version: number | null;
  readonly sha256: string | null;
  readonly adapterFilesSha256: string | null;
  /** GET /v1/models after the rollout. */
  readonly models: string[];
  readonly answers: Answer[];
}

export interface StoryReport {
  readonly ok: boolean;
  readonly broker: string;
  readonly stages: { name: string; seconds: number }[];
  /** The base's answers on each device before the rollout, by device. */
  readonly baseAnswers: Record<string, Answer[]>;
  readonly lossBefore: number;
  readonly lossAfter: number;
  readonly job: { id: string; fine_tuned_model: string | null; uploaded_sha256: string | null; adapterDir: string; answers: Answer[] };
  readonly devices: DeviceReport[];
  readonly seconds: number;
}

interface Device {
  readonly id: string;
  readonly server: RunningServer;
  readonly stateDir: string;
  agent: Agent;
}

/** Seed of the demo checkpoint (the personalization test uses the same model). */
const DEMO_SEED = 1;
/** The base's model id on every device's server. */
const MODEL_ID = 'tiny';
/** The job's suffix (fine_tuned_model tiny:anouk on device-a) and the name the hub publishes it under. */
const SUFFIX = 'anouk';
const FLEET_NAME = 'personal';

/** sha256 over a PEFT adapter's two files (config and weights), to compare devices byte for byte. */
async function adapterFilesHash(dir: string): Promise<string> {
  const h = createHash('sha256');
  for (const f of [ADAPTER_CONFIG, ADAPTER_WEIGHTS]) h.update(await fs.readFile(path.join(dir, f)));
  return h.digest('hex');
}

async function waitFor<T>(what: string, ms: number, poll: () => T | null | Promise<T | null>): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await poll();
    if (v !== null) return v;
    if (Date.now() - t0 > ms) throw new EdgeloraError(`timed out after ${ms / 1000} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** JSON over HTTP to a device's server; a non-2xx answer is an error naming the route and the server's message. */
async function http<T>(url: string, route: string, body?: unknown): Promise<T> {
  const r = await fetch(`${url}${route}`, body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const text = await r.text();
  if (!r.ok) {
    let msg = text;
    try {
      msg = (JSON.parse(text) as { error?: { message?: string } }).error?.message ?? text;
    } catch {
      /* not JSON */
    }
    throw new EdgeloraError(`${body === undefined ? 'GET' : 'POST'} ${route} answered ${r.status}: ${msg}`, { where: url });
  }
  return JSON.parse(text) as T;
}

interface JobObject {
  id: string;
  status: string;
  fine_tuned_model: string | null;
  uploaded_sha256: string | null;
  error: { message: string } | null;
}
interface JobEventObject {
  level: string;
  message: string;
  type: string;
  data: { step?: number; train_loss?: number } | null;
}

export async function runStory(o: StoryOptions): Promise<StoryReport> {
  const t0 = performance.now();
  const stages: { name: string; seconds: number }[] = [];
  const stage = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const s = performance.now();
    try {
      const v = await fn();
      stages.push({ name, seconds: (performance.now() - s) / 1000 });
      return v;
    } catch (err) {
      throw new EdgeloraError(`demo stage "${name}" failed: ${(err as Error).message}`, {
        cause: err,
        hint: err instanceof EdgeloraError ? err.hint ?? 'run with EDGELORA_DEBUG=1 for the stack' : 'run with EDGELORA_DEBUG=1 for the stack',
      });
    }
  };
  const debug = (who: string) => (process.env.EDGELORA_DEBUG ? (l: string) => process.stderr.write(`[${who}] ${l}\n`) : () => undefined);
  const cache = path.resolve(o.cache);
  // The last run's hub store and device state stay here for inspection; each run replaces them.
  const run = path.join(cache, 'run');
  await fs.rm(run, { recursive: true, force: true });
  await fs.mkdir(run, { recursive: true });
  let broker: EmbeddedBroker | null = null;
  let hub: Hub | null = null;
  const devices: Device[] = [];
  const shutdown = async () => {
    await Promise.allSettled(devices.map((d) => d.server.close(0)));
    if (hub) await hub.stop().catch(() => undefined);
    if (broker) await broker.close().catch(() => undefined);
  };
  try {
    const brokerUrl = await stage('broker', async () => {
      if (o.broker) {
        o.say(`broker      ${o.broker} (external)`);
        return o.broker;
      }
      broker = await startEmbeddedBroker(0);
      o.say(`broker      ${broker.url} (embedded aedes, MQTT 3.1.1)`);
      return broker.url;
    });

    const modelDir = await stage('model', async () => {
      const hf = path.join(cache, `tiny-hf-seed${DEMO_SEED}`);
      const q = path.join(cache, `tiny-nf4-seed${DEMO_SEED}`);
      const cached = existsSync(q);
      if (!existsSync(hf)) await makeDemoModel(hf, { preset: 'tiny', seed: DEMO_SEED });
      if (!cached) await quantizeModel(hf, q, { format: 'nf4', blockSize: 64, doubleQuant: false });
      o.say(`base model  ${q} (tiny demo checkpoint, NF4; ${cached ? 'cached' : 'made now, cached for later runs'})`);
      return q;
    });

    const key = generateSigningKey();
    // The hub's X25519 key: device-a's job seals its upload to it; the devices' keys are enrolled below.
    const encKey = generateEncKey();
    hub = await stage('hub', async () => {
      const h = new Hub({ broker: { url: brokerUrl }, storeDir: path.join(run, 'hub-store'), key, encKey, log: debug('hub') });
      await h.start();
      o.say(`hub         signing key ${key.keyId}, store ${path.join(run, 'hub-store')}`);
      return h;
    });

    await stage('devices (serve + agent)', async () => {
      for (let i = 0; i < o.devices; i++) {
        const id = `device-${String.fromCharCode(97 + i)}`;
        const stateDir = path.join(run, id);
        // What `edgelora serve --model … --broker … --device-id ID --fleet demo --trust hub.pub --state DIR` starts.
        const server = await startServe({
          modelDir,
          port: 0,
          modelId: MODEL_ID,
          maxBatch: 2,
          ctx: 256,
          fleet: {
            agent: { broker: { url: brokerUrl }, deviceId: id, fleet: 'demo', stateDir, trustedKey: key.publicKey, hubEncKey: { raw: encKey.raw, keyId: encKey.keyId }, quietMs: 500, log: debug(id) },
            defaultAdapter: 'fleet',
          },
          jobs: { stateDir, budgetBytes: os.totalmem(), servingBytes: 0, profileId: 'demo', log: debug(`${id} jobs`) },
        });
        const d: Device = { id, server, stateDir, agent: null as unknown as Agent };
        devices.push(d);
        await server.ready;
        d.agent = await waitFor(`${id}'s fleet agent to connect`, 30_000, () => server.agent());
      }
      // What `edgelora fleet enroll <id>` does: trust the key each device announced.
      for (const d of devices) {
        await waitFor(`${d.id}'s status at the hub`, 30_000, () => (hub!.devices.get(d.id)?.encKey ? true : null));
        await enroll(path.join(run, 'hub-store'), enrolmentFromStatus(hub!.devices.get(d.id)!));
      }
      o.say(`devices     ${devices.map((d) => `${d.id} ${d.server.url}`).join(', ')}`);
      o.say(`            each an edgelora serve process with its fleet agent inside (fleet "demo"; X25519 keys enrolled: ${devices.map((d) => d.agent.encKey?.keyId ?? '?').join(', ')})`);
    });

    const ask = async (d: Device, model: string): Promise<Answer[]> => {
      const out: Answer[] = [];
      for (const [prompt, want] of o.probes) {
        const r = await http<{ choices: { message: { content: string } }[] }>(d.server.url, '/v1/chat/completions', { model, messages: [{ role: 'user', content: prompt }], max_tokens: 16, temperature: 0 });
        const text = r.choices[0]?.message.content ?? '';
        out.push({ prompt, text, personalized: text.includes(want) });
      }
      return out;
    };

    const a = devices[0]!;
    const baseAnswers = await stage('base answers', async () => {
      o.say(`\nthe base model, before personalization (POST /v1/chat/completions, model "${MODEL_ID}"):`);
      const all: Record<string, Answer[]> = {};
      for (const d of devices) {
        all[d.id] = await ask(d, MODEL_ID);
        for (const x of all[d.id]!) o.say(`  the base on ${d.id}: ${x.prompt} →${JSON.stringify(x.text)}`);
      }
      return all;
    });

    const { job, lossBefore, lossAfter } = await stage('fine-tuning job (device-a, over HTTP)', async () => {
      const content = await fs.readFile(o.data, 'utf8');
      const file = await http<{ id: string; rows: number }>(a.server.url, '/v1/files', { purpose: 'fine-tune', filename: path.basename(o.data), content });
      o.say(`\n${a.id}: POST /v1/files ${path.relative(process.cwd(), o.data) || o.data} → ${file.id} (${file.rows} rows validated)`);
      const created = await http<JobObject>(a.server.url, '/v1/fine_tuning/jobs', {
        training_file: file.id,
        suffix: SUFFIX,
        upload: true,
        hyperparameters: { steps: o.steps, batch_size: 8, rank: 16, alpha: 32, targets: 'all-linear', learning_rate: 1e-2, schedule: 'constant', lora_dropout: 0, seed: o.seed, checkpoint_steps: 50 },
      });
      o.say(`${a.id}: POST /v1/fine_tuning/jobs → ${created.id}: a rank-16 adapter, ${o.steps} steps, on the device's own base (serving queues while it trains)`);
      const bar = new Progress({ total: o.steps, label: '  job', silent: o.json, plainIntervalMs: 3000, stream: process.stdout });
      const losses: number[] = [];
      const j = await waitFor(`job ${created.id} to end`, 600_000, async () => {
        await new Promise((r) => setTimeout(r, 200));
        const now = await http<JobObject>(a.server.url, `/v1/fine_tuning/jobs/${created.id}`);
        const ev = (await http<{ data: JobEventObject[] }>(a.server.url, `/v1/fine_tuning/jobs/${created.id}/events?limit=10000`)).data;
        // Events come newest first (as OpenAI lists them); the losses in step order.
        const metrics = ev.filter((e) => e.type === 'metrics' && e.data?.train_loss !== undefined && e.data.step !== undefined).sort((x, y) => x.data!.step! - y.data!.step!);
        losses.splice(0, losses.length, ...metrics.map((e) => e.data!.train_loss!));
        const last = metrics[metrics.length - 1];
        if (last?.data?.step !== undefined) bar.update(last.data.step, { loss: last.data.train_loss ?? NaN });
        if (now.status === 'failed' || now.status === 'cancelled') throw new EdgeloraError(`job ${now.id} ${now.status}: ${now.error?.message ?? ''}`);
        const uploadFailed = ev.find((e) => e.level === 'error');
        if (uploadFailed) throw new EdgeloraError(`job ${now.id}: ${uploadFailed.message}`);
        // The job uploads after it succeeded; the sha256 appears once the hub acknowledged the whole file.
        return now.status === 'succeeded' && now.uploaded_sha256 ? now : null;
      });
      bar.update(o.steps, { loss: losses[losses.length - 1] ?? NaN });
      if (losses.length === 0) throw new EdgeloraError(`job ${j.id} reported no training step`);
      return { job: j, lossBefore: losses[0]!, lossAfter: losses[losses.length - 1]! };
    });
    o.say(`  loss ${lossBefore.toFixed(3)} → ${lossAfter.toFixed(3)}; succeeded: ${a.id} serves ${job.fine_tuned_model} at once`);
    const jobAnswers = await ask(a, job.fine_tuned_model!);
    for (const x of jobAnswers) o.say(`  ${a.id} (${job.fine_tuned_model}): ${x.prompt} →${JSON.stringify(x.text)}`);
    o.say(`  uploaded to the hub (sealed, resumable): sha256 ${job.uploaded_sha256!.slice(0, 16)}…`);
    const sha = job.uploaded_sha256!;

    await stage('sign + publish (hub → fleet)', async () => {
      const m = await hub!.publish(sha, { kind: 'fleet', name: 'demo' }, FLEET_NAME);
      o.say(`\nhub signed and published ${m.adapter.id} v${m.adapter.version} to fleet "demo" (${m.blob.chunks} chunk${m.blob.chunks === 1 ? '' : 's'}, ${m.enc ? `sealed for ${m.enc.recipients.length} enrolled devices` : 'in clear'})`);
    });

    await stage('rollout (verify + activate)', async () => {
      await waitFor('every device to activate the adapter', 60_000, () => (devices.every((d) => d.agent.active?.sha256 === sha) ? true : null));
      for (const d of devices) o.say(`  ${d.id}: verified signature, sha256 and base fingerprint; decrypted; activated at a token boundary`);
    });

    const reports = await stage('personalized answers', async () => {
      const rs: DeviceReport[] = [];
      for (const d of devices) {
        const inst = d.agent.active;
        const dir = d.agent.activeDir;
        const models = (await http<{ data: { id: string }[] }>(d.server.url, '/v1/models')).data.map((m) => m.id);
        rs.push({ device: d.id, url: d.server.url, adapter: inst?.id ?? null, version: inst?.version ?? null, sha256: inst?.sha256 ?? null, adapterFilesSha256: dir ? await adapterFilesHash(dir) : null, models, answers: await ask(d, MODEL_ID) });
      }
      return rs;
    });

    o.say(`\nwith the fleet's adapter, every device (POST /v1/chat/completions, model "${MODEL_ID}" now serves ${MODEL_ID}:${FLEET_NAME}):`);
    for (const r of reports) for (const x of r.answers) o.say(`  ${r.device}: ${x.prompt} →${JSON.stringify(x.text)}${x.personalized ? '' : '   ✗ not personalized'}`);
    for (const r of reports) o.say(`  ${r.device} GET /v1/models: ${r.models.join(', ')}`);

    const adapterDir = path.join(a.stateDir, 'jobs', job.id, 'adapter');
    const sourceHash = await adapterFilesHash(adapterDir);
    const ok =
      reports.every((r) => r.answers.every((x) => x.personalized) && r.adapterFilesSha256 === sourceHash) &&
      jobAnswers.every((x) => x.personalized) &&
      Object.values(baseAnswers).every((ans) => ans.every((x) => !x.personalized));
    const seconds = (performance.now() - t0) / 1000;
    const report: StoryReport = { ok, broker: brokerUrl, stages, baseAnswers, lossBefore, lossAfter, job: { id: job.id, fine_tuned_model: job.fine_tuned_model, uploaded_sha256: sha, adapterDir, answers: jobAnswers }, devices: reports, seconds };
    printTable(o, report);
    if (o.keepRunning && !o.json) {
      o.say(`\nkeeping the broker (${brokerUrl}), hub and servers (${devices.map((d) => d.server.url).join(', ')}) running; Ctrl-C to stop`);
      await new Promise<void>((resolve) => process.once('SIGINT', () => resolve()));
    }
    return report;
  } finally {
    await shutdown();
  }
}

function printTable(o: StoryOptions, r: StoryReport): void {
  const rows = r.devices.map((d) => [d.device, d.adapter ? `${d.adapter} v${d.version}` : '-', d.sha256 ? `${d.sha256.slice(0, 16)}…` : '-', d.adapterFilesSha256 ? `${d.adapterFilesSha256.slice(0, 16)}…` : '-', d.answers.every((x) => x.personalized) ? 'yes' : 'NO']);
  const head = ['device', 'active adapter', 'blob sha256', 'PEFT files sha256', 'personalized'];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (c: string[]) => '  ' + c.map((s, i) => s.padEnd(w[i]!)).join('  ');
  o.say('\n' + line(head));
  for (const row of rows) o.say(line(row));
  o.say(`\n  loss before ${r.lossBefore.toFixed(3)}, after ${r.lossAfter.toFixed(3)}`);
  o.say('  stages: ' + r.stages.map((s) => `${s.name} ${s.seconds.toFixed(1)} s`).join(' · '));
  o.say(`  ${r.ok ? 'done' : 'FAILED'} in ${r.seconds.toFixed(1)} s`);
}
