// The whole story in one process (what `npm start` runs): an embedded MQTT broker (aedes), a hub and
// N device agents on loopback; device A fine-tunes an adapter on a user's data, uploads it; the hub
// signs it and publishes it to the fleet; every device receives, verifies and activates it; then the
// devices answer the personal prompts with the personalized completion while the base does not.
import path from 'node:path';
import { existsSync, promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import { makeDemoModel } from '../formats/demo-model.js';
import { quantizeModel } from '../model/quantize.js';
import { ModelRuntime } from '../runtime/model.js';
import { AdapterManager } from '../adapters/manager.js';
import { RuntimeActivator } from '../adapters/activator.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../adapters/peft.js';
import { generate } from '../runtime/generate.js';
import { finetune } from '../train/trainer.js';
import { Hub, Agent, startEmbeddedBroker, generateSigningKey, type EmbeddedBroker } from '../sync/index.js';
import { generateEncKey } from '../sync/protocol/envelope.js';
import { enroll, enrolmentFromStatus } from '../sync/hub/enrolment.js';
import { EdgeloraError } from '../util/errors.js';
import { Progress } from '../util/progress.js';
import { LINEAR_PROJS, type Proj } from '../model/llama.js';

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
  /** Probes: prompt → what the personalized answer must contain. */
  readonly probes: readonly (readonly [string, string])[];
  readonly seed: number;
  /** Print nothing but the final JSON. */
  readonly json: boolean;
  /** Keep the broker, hub and agents running after the story (until Ctrl-C). */
  readonly keepRunning: boolean;
  readonly say: (line: string) => void;
}

export interface DeviceReport {
  readonly device: string;
  readonly adapter: string | null;
  readonly version: number | null;
  readonly sha256: string | null;
  readonly adapterFilesSha256: string | null;
  readonly answers: { prompt: string; text: string; personalized: boolean }[];
}

export interface StoryReport {
  readonly ok: boolean;
  readonly broker: string;
  readonly stages: { name: string; seconds: number }[];
  readonly baseAnswers: { prompt: string; text: string; personalized: boolean }[];
  readonly lossBefore: number;
  readonly lossAfter: number;
  readonly devices: DeviceReport[];
  readonly seconds: number;
}

interface Device {
  id: string;
  agent: Agent;
  model: ModelRuntime;
  adapters: AdapterManager;
  activator: RuntimeActivator;
  stateDir: string;
}

const ALL: Proj[] = [...LINEAR_PROJS];
/** Seed of the demo checkpoint (the personalization test uses the same model). */
const DEMO_SEED = 1;

/** sha256 over a PEFT adapter's two files (config and weights), to compare devices byte for byte. */
async function adapterFilesHash(dir: string): Promise<string> {
  const h = createHash('sha256');
  for (const f of [ADAPTER_CONFIG, ADAPTER_WEIGHTS]) h.update(await fs.readFile(path.join(dir, f)));
  return h.digest('hex');
}

function waitFor<T>(what: string, ms: number, poll: () => T | null): Promise<T> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const tick = () => {
      const v = poll();
      if (v !== null) return resolve(v);
      if (Date.now() - t0 > ms) return reject(new EdgeloraError(`timed out after ${ms / 1000} s waiting for ${what}`));
      setTimeout(tick, 50);
    };
    tick();
  });
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
  const cache = path.resolve(o.cache);
  // The last run's hub store and device state stay here for inspection; each run replaces them.
  const run = path.join(cache, 'run');
  await fs.rm(run, { recursive: true, force: true });
  await fs.mkdir(run, { recursive: true });
  let broker: EmbeddedBroker | null = null;
  let hub: Hub | null = null;
  const devices: Device[] = [];
  const shutdown = async () => {
    await Promise.allSettled(devices.map((d) => d.agent.stop()));
    await Promise.allSettled(devices.map((d) => d.model.release()));
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
    // The hub's X25519 key: device-a seals its upload to it; the devices' keys are enrolled below.
    const encKey = generateEncKey();
    hub = await stage('hub', async () => {
      const h = new Hub({ broker: { url: brokerUrl }, storeDir: path.join(run, 'hub-store'), key, encKey, log: process.env.EDGELORA_DEBUG ? (l) => process.stderr.write(`[hub] ${l}\n`) : () => undefined });
      await h.start();
      o.say(`hub         signing key ${key.keyId}, store ${path.join(run, 'hub-store')}`);
      return h;
    });

    await stage('devices', async () => {
      for (let i = 0; i < o.devices; i++) {
        const id = `device-${String.fromCharCode(97 + i)}`;
        const model = await ModelRuntime.load(modelDir);
        const adapters = new AdapterManager(model);
        const activator = new RuntimeActivator(adapters);
        const stateDir = path.join(run, id);
        const agent = new Agent({
          broker: { url: brokerUrl },
          deviceId: id,
          fleet: 'demo',
          stateDir,
          trustedKey: key.publicKey,
          hubEncKey: { raw: encKey.raw, keyId: encKey.keyId },
          modelFingerprint: model.manifest.fingerprint,
          modelSourceFingerprint: model.manifest.sourceFingerprint ?? null,
          activator,
          quietMs: 500,
          log: process.env.EDGELORA_DEBUG ? (l) => process.stderr.write(`[${id}] ${l}\n`) : () => undefined,
        });
        await agent.start();
        devices.push({ id, agent, model, adapters, activator, stateDir });
      }
      // What `edgelora fleet enroll <id>` does: trust the key each device announced.
      for (const d of devices) {
        await waitFor(`${d.id}'s status at the hub`, 30_000, () => (hub!.devices.get(d.id)?.encKey ? true : null));
        await enroll(path.join(run, 'hub-store'), enrolmentFromStatus(hub!.devices.get(d.id)!));
      }
      o.say(`devices     ${devices.map((d) => d.id).join(', ')} (fleet "demo"; X25519 keys enrolled: ${devices.map((d) => d.agent.encKey?.keyId ?? '?').join(', ')})`);
    });

    const ask = async (d: Device, withAdapter: boolean) => {
      const out: { prompt: string; text: string; personalized: boolean }[] = [];
      for (const [prompt, want] of o.probes) {
        const ids = d.model.tokenizer.encode(prompt, { addSpecialTokens: true });
        const lora = withAdapter && d.activator.active ? d.adapters.feeds() : undefined;
        const r = await generate(d.model, ids, { maxNewTokens: 12, temperature: 0, topK: 0, topP: 1, seed: 0, ...(lora ? { lora } : {}) });
        out.push({ prompt, text: r.text, personalized: r.text.includes(want) });
      }
      return out;
    };

    const a = devices[0]!;
    const baseAnswers = await stage('base answers', async () => {
      const ans = await ask(a, false);
      o.say('\nthe base model, before personalization:');
      for (const x of ans) o.say(`  ${x.prompt} →${JSON.stringify(x.text)}`);
      return ans;
    });

    const adapterDir = path.join(run, 'device-a-personal');
    const trained = await stage('fine-tune (device-a)', async () => {
      o.say(`\n${a.id} fine-tunes a rank-16 adapter on ${path.relative(process.cwd(), o.data) || o.data}:`);
      const bar = new Progress({ total: o.steps, label: '  finetune', silent: o.json, plainIntervalMs: 3000, stream: process.stdout });
      return finetune({
        model: modelDir,
        data: o.data,
        out: adapterDir,
        targets: ALL,
        rank: 16,
        alpha: 32,
        lr: 1e-2,
        schedule: 'constant',
        steps: o.steps,
        batchSize: 8,
        loraDropout: 0,
        seed: o.seed,
        onStep: (e) => bar.update(e.step, { loss: e.loss }),
        onWarning: () => undefined,
      });
    });
    o.say(`  loss ${trained.losses[0]!.toFixed(3)} → ${trained.finalLoss.toFixed(3)} in ${trained.steps} steps (${trained.tokensPerSecond.toFixed(0)} tok/s)`);

    const sha = await stage('upload (device-a → hub)', async () => {
      const s = await a.agent.uploadDir(adapterDir, 'personal');
      o.say(`\n${a.id} uploaded its adapter to the hub: sha256 ${s.slice(0, 16)}…`);
      return s;
    });

    await stage('sign + publish (hub → fleet)', async () => {
      const m = await hub!.publish(sha, { kind: 'fleet', name: 'demo' }, 'personal');
      o.say(`hub signed and published ${m.adapter.id} v${m.adapter.version} to fleet "demo" (${m.blob.chunks} chunk${m.blob.chunks === 1 ? '' : 's'}, ${m.enc ? `sealed for ${m.enc.recipients.length} enrolled devices` : 'in clear'})`);
    });

    await stage('rollout (verify + activate)', async () => {
      await waitFor('every device to activate the adapter', 60_000, () => (devices.every((d) => d.agent.active?.sha256 === sha) ? true : null));
      for (const d of devices) o.say(`  ${d.id}: verified signature, sha256 and base fingerprint; decrypted; activated`);
    });

    const reports = await stage('personalized answers', async () => {
      const rs: DeviceReport[] = [];
      for (const d of devices) {
        const inst = d.agent.active;
        const dir = d.agent.activeDir;
        rs.push({
          device: d.id,
          adapter: inst?.id ?? null,
          version: inst?.version ?? null,
          sha256: inst?.sha256 ?? null,
          adapterFilesSha256: dir ? await adapterFilesHash(dir) : null,
          answers: await ask(d, true),
        });
      }
      return rs;
    });

    o.say('\nwith the adapter, on every device:');
    for (const r of reports) for (const x of r.answers) o.say(`  ${r.device}: ${x.prompt} →${JSON.stringify(x.text)}${x.personalized ? '' : '   ✗ not personalized'}`);
    const baseAgain = await ask(a, false);
    o.say(`the base alone still says: ${baseAgain.map((x) => `${x.prompt} →${JSON.stringify(x.text)}`).join('; ')}`);

    const sourceHash = await adapterFilesHash(adapterDir);
    const ok =
      reports.every((r) => r.answers.every((x) => x.personalized) && r.adapterFilesSha256 === sourceHash) &&
      baseAgain.every((x) => !x.personalized);
    const seconds = (performance.now() - t0) / 1000;
    const report: StoryReport = { ok, broker: brokerUrl, stages, baseAnswers, lossBefore: trained.losses[0]!, lossAfter: trained.finalLoss, devices: reports, seconds };
    printTable(o, report);
    if (o.keepRunning && !o.json) {
      o.say(`\nkeeping the broker (${brokerUrl}), hub and agents running; Ctrl-C to stop`);
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
