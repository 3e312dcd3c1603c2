// Test harness for fleet sync: starts a private Mosquitto on a free loopback port with its own
// config (never the system one), makes small PEFT adapter directories, and polls for conditions.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import mqtt, { type MqttClient } from 'mqtt';
import type { AgentOptions } from '../../src/sync/agent/agent.ts';
import { Rng } from '../../src/util/rng.ts';
import type { AdapterActivator } from '../../src/sync/agent/activator.ts';
import { validateAdapterDir } from '../../src/sync/agent/activator.ts';

export const REPO = path.resolve(import.meta.dirname, '../..');

/** A broker binary on PATH or in /usr/sbin (where Debian puts daemons); throws naming its package. */
function findBinary(name: string): string {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    const p = path.join(dir, name);
    if (dir && existsSync(p)) return p;
  }
  if (existsSync(`/usr/sbin/${name}`)) return `/usr/sbin/${name}`;
  throw new Error(`${name} not found on PATH or at /usr/sbin/${name}: install the Debian package \`${name}\` (.ci/run does)`);
}

export const findMosquitto = (): string => findBinary('mosquitto');
export const findNatsServer = (): string => findBinary('nats-server');

/**
 * Agent options for tests: fast timers, a RecordingActivator, state under `stateRoot/<id>`, and
 * the log on stderr when EDGELORA_TEST_LOG is set.
 */
export function testAgentOptions(o: { url: string | string[]; stateRoot: string; trustedKey: KeyObject }, deviceId: string, fleet: string, extra: Partial<AgentOptions> = {}): AgentOptions {
  return {
    broker: { url: o.url, reconnectMs: 200 },
    deviceId,
    fleet,
    stateDir: path.join(o.stateRoot, deviceId),
    trustedKey: o.trustedKey,
    modelFingerprint: BASE_FP,
    quietMs: 300,
    statusIntervalMs: 200,
    activator: new RecordingActivator(),
    // The suites from before sealed transfers upload to hubs without an X25519 key.
    allowPlaintext: true,
    ...(process.env.EDGELORA_TEST_LOG ? { log: (l: string) => process.stderr.write(`${new Date().toISOString()} ${l}\n`) } : {}),
    ...extra,
  };
}

export function tmpDir(prefix: string): string {
  return mkdtempSync(path.join(os.tmpdir(), `edgelora-${prefix}-`));
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

async function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export interface MosquittoOptions {
  /** ACL file to use (e.g. the shipped deploy/mosquitto/acl). */
  aclFile?: string;
  /** user → password; when given, anonymous clients are refused. */
  users?: Record<string, string>;
  /** Seconds between $SYS updates (e.g. 1 to read $SYS/broker/bytes/sent); default: Mosquitto's 10. */
  sysInterval?: number;
}

export class Mosquitto {
  proc: ChildProcess | null = null;
  readonly dir: string;
  readonly confFile: string;
  private constructor(readonly port: number, readonly bin: string, dir: string) {
    this.dir = dir;
    this.confFile = path.join(dir, 'mosquitto.conf');
  }
  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  static async start(o: MosquittoOptions = {}): Promise<Mosquitto> {
    const bin = findMosquitto();
    const dir = tmpDir('mosq');
    const port = await freePort();
    const m = new Mosquitto(port, bin, dir);
    // Started as root, mosquitto would drop to user "mosquitto", which cannot read our temp dir.
    const lines = [...(process.getuid?.() === 0 ? ['user root'] : []), `listener ${port} 127.0.0.1`, 'persistence false', `log_dest file ${path.join(dir, 'mosquitto.log')}`, 'log_type error', 'log_type warning', 'log_type notice', 'log_type information'];
    if (o.users) {
      const pw = path.join(dir, 'passwd');
      await fs.writeFile(pw, '');
      for (const [u, p] of Object.entries(o.users)) {
        const r = spawnSync('mosquitto_passwd', ['-b', pw, u, p]);
        if (r.status !== 0) throw new Error(`mosquitto_passwd failed: ${r.stderr.toString()}`);
      }
      lines.push('allow_anonymous false', `password_file ${pw}`);
    } else {
      lines.push('allow_anonymous true');
    }
    if (o.aclFile) lines.push(`acl_file ${o.aclFile}`);
    if (o.sysInterval !== undefined) lines.push(`sys_interval ${o.sysInterval}`);
    await fs.writeFile(m.confFile, lines.join('\n') + '\n');
    await m.launch();
    return m;
  }

  async launch(): Promise<void> {
    this.proc = spawn(this.bin, ['-c', this.confFile], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    this.proc.stderr?.on('data', (d: Buffer) => (err += d.toString()));
    const deadline = Date.now() + 10_000;
    while (!(await portOpen(this.port))) {
      if (this.proc.exitCode !== null) throw new Error(`mosquitto exited (${this.proc.exitCode}): ${err}`);
      if (Date.now() > deadline) throw new Error(`mosquitto did not open port ${this.port}: ${err}`);
      await sleep(50);
    }
  }

  /** SIGKILLs the broker (no clean shutdown) and waits for it to be gone. */
  async kill(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await gone;
    this.proc = null;
  }

  async stop(): Promise<void> {
    await this.kill();
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `pred` every 25 ms until it holds; throws naming `what` after `timeoutMs`. */
export async function waitFor(what: string, pred: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await sleep(25);
  }
}

/** Builds a safetensors file by hand: u64 LE header length, JSON header, F32 data. */
export function safetensorsBytes(tensors: { name: string; shape: number[]; data: Float32Array }[]): Buffer {
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: 'F32', shape: t.shape, data_offsets: [off, off + t.data.byteLength] };
    off += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  while ((8 + json.length) % 8 !== 0) json += ' ';
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([head, Buffer.from(json), ...tensors.map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))]);
}

export const BASE_FP = 'a'.repeat(64);

/**
 * Writes a small PEFT LoRA adapter: `layers` layers of q_proj/v_proj A [r, C] and B [C, r] with
 * seeded random values (r = 4, C = 64: 4 KiB per tensor pair per projection).
 */
export async function makeAdapter(dir: string, o: { seed: number; layers?: number; baseFingerprint?: string | null; hidden?: number }): Promise<string> {
  const rng = new Rng(o.seed);
  const r = 4;
  const c = o.hidden ?? 64;
  const tensors: { name: string; shape: number[]; data: Float32Array }[] = [];
  for (let l = 0; l < (o.layers ?? 8); l++) {
    for (const proj of ['q_proj', 'v_proj']) {
      const a = new Float32Array(r * c).map(() => rng.normal());
      const b = new Float32Array(c * r).map(() => rng.normal());
      tensors.push({ name: `base_model.model.model.layers.${l}.self_attn.${proj}.lora_A.weight`, shape: [r, c], data: a });
      tensors.push({ name: `base_model.model.model.layers.${l}.self_attn.${proj}.lora_B.weight`, shape: [c, r], data: b });
    }
  }
  await fs.mkdir(dir, { recursive: true });
  await fs.writeFile(
    path.join(dir, 'adapter_config.json'),
    JSON.stringify({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: 8, lora_dropout: 0, target_modules: ['q_proj', 'v_proj'], bias: 'none', base_model_name_or_path: 'test' }, null, 2),
  );
  await fs.writeFile(path.join(dir, 'adapter_model.safetensors'), safetensorsBytes(tensors));
  const fp = o.baseFingerprint === undefined ? BASE_FP : o.baseFingerprint;
  if (fp !== null) await fs.writeFile(path.join(dir, 'edgelora_adapter.json'), JSON.stringify({ format: 'edgelora-adapter/1', base_fingerprint: fp }));
  return dir;
}

/** sha256 of each file in a directory, by name. */
export async function dirDigest(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const name of (await fs.readdir(dir)).sort()) out[name] = createHash('sha256').update(await fs.readFile(path.join(dir, name))).digest('hex');
  return out;
}

/**
 * An activator that records the content of every directory it was asked to activate, so a test can
 * prove that only complete, expected adapters were ever activated. `failFor` makes chosen loads fail.
 */
export class RecordingActivator implements AdapterActivator {
  readonly activations: Record<string, string>[] = [];
  active: string | null = null;
  failFor = new Set<string>();
  async activate(dir: string, info: { sha256: string }): Promise<void> {
    await validateAdapterDir(dir);
    this.activations.push(await dirDigest(dir));
    if (this.failFor.has(info.sha256)) throw new Error('runtime refused this adapter (test)');
    this.active = dir;
  }
  async deactivate(): Promise<void> {
    this.active = null;
  }
}

export function digestKey(d: Record<string, string>): string {
  return JSON.stringify(d);
}

/**
 * Reads Mosquitto's own count of bytes it sent to clients ($SYS/broker/bytes/sent, updated every
 * sys_interval): the broker egress an operator would see, independent of edgelora's accounting.
 */
export class BrokerBytes {
  private latest = -1;
  private updates = 0;
  private constructor(private readonly client: MqttClient) {
    client.on('message', (_t, p) => {
      this.latest = Number(p.toString());
      this.updates++;
    });
  }
  static async open(url: string): Promise<BrokerBytes> {
    const client = await mqtt.connectAsync(url, { clientId: `sysbytes-${process.pid}-${Math.random().toString(36).slice(2, 8)}`, reconnectPeriod: 0 });
    const b = new BrokerBytes(client);
    await client.subscribeAsync('$SYS/broker/bytes/sent', { qos: 0 });
    return b;
  }
  /** The value after the next update at least `settleMs` from now (so earlier traffic is counted). */
  async read(settleMs = 1200): Promise<number> {
    await sleep(settleMs);
    const n = this.updates;
    await waitFor('a $SYS/broker/bytes/sent update', () => this.updates > n, 5000);
    return this.latest;
  }
  async close(): Promise<void> {
    await this.client.endAsync(true);
  }
}

/** One node of a NatsCluster: its MQTT listener, and a handle to kill it. */
export interface NatsNode {
  name: string;
  mqttPort: number;
  url: string;
  proc: ChildProcess | null;
  kill(): Promise<void>;
}

/**
 * A NATS cluster on loopback, each node in its own temp directory with `cluster { routes }`,
 * `jetstream { store_dir }` (MQTT QoS 1 and retained messages live in JetStream, replicated) and an
 * `mqtt { listen }` block. NATS speaks MQTT 3.1.1 only and takes payloads up to 1 MB by default.
 */
export class NatsCluster {
  private constructor(
    readonly nodes: NatsNode[],
    readonly dir: string,
  ) {}

  static async start(size = 3): Promise<NatsCluster> {
    const bin = findNatsServer();
    const dir = tmpDir('nats');
    const ports = await Promise.all(Array.from({ length: size }, async () => ({ client: await freePort(), cluster: await freePort(), mqtt: await freePort() })));
    const nodes: NatsNode[] = [];
    for (let i = 0; i < size; i++) {
      const p = ports[i] as { client: number; cluster: number; mqtt: number };
      const name = `n${i + 1}`;
      const nd = path.join(dir, name);
      await fs.mkdir(nd, { recursive: true });
      const routes = ports.filter((_, j) => j !== i).map((q) => `nats-route://127.0.0.1:${q.cluster}`);
      const conf = [
        `server_name: ${name}`,
        `listen: 127.0.0.1:${p.client}`,
        `jetstream { store_dir: "${path.join(nd, 'js')}" }`,
        `cluster { name: edgelora, listen: 127.0.0.1:${p.cluster}, routes: [${routes.join(', ')}] }`,
        // Replicate the MQTT streams (sessions, retained messages, QoS 1) on all three nodes, so the
        // cluster keeps a quorum when one node dies.
        `mqtt { listen: 127.0.0.1:${p.mqtt}, stream_replicas: ${size}, consumer_replicas: ${size} }`,
      ].join('\n');
      const confFile = path.join(nd, 'nats.conf');
      await fs.writeFile(confFile, `${conf}\n`);
      const proc = spawn(bin, ['-c', confFile, '-l', path.join(nd, 'nats.log')], { stdio: ['ignore', 'ignore', 'ignore'] });
      const node: NatsNode = {
        name,
        mqttPort: p.mqtt,
        url: `mqtt://127.0.0.1:${p.mqtt}`,
        proc,
        async kill() {
          const pr = node.proc;
          node.proc = null;
          if (!pr || pr.exitCode !== null) return;
          const gone = new Promise((r) => pr.once('exit', r));
          pr.kill('SIGKILL');
          await gone;
        },
      };
      nodes.push(node);
    }
    const c = new NatsCluster(nodes, dir);
    const deadline = Date.now() + 30_000;
    for (const n of nodes) {
      while (!(await portOpen(n.mqttPort))) {
        if (n.proc?.exitCode !== null) throw new Error(`nats-server ${n.name} exited (${n.proc?.exitCode}); see ${path.join(dir, n.name, 'nats.log')}`);
        if (Date.now() > deadline) throw new Error(`nats-server ${n.name} did not open its MQTT port`);
        await sleep(100);
      }
    }
    await c.waitJetStream(deadline);
    return c;
  }

  /** Waits until the cluster serves MQTT sessions (JetStream has a meta leader): a retained round trip works. */
  private async waitJetStream(deadline: number): Promise<void> {
    for (;;) {
      try {
        const client = await mqtt.connectAsync((this.nodes[0] as NatsNode).url, { clientId: `probe${Date.now()}`, protocolVersion: 4, reconnectPeriod: 0, connectTimeout: 3000 });
        await client.publishAsync('probe/ready', 'x', { qos: 1, retain: true });
        await client.endAsync(true);
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`NATS JetStream not ready: ${(err as Error).message}; see ${this.dir}`);
        await sleep(300);
      }
    }
  }

  async stop(): Promise<void> {
    await Promise.all(this.nodes.map((n) => n.kill()));
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}
