// Fleet-scale rollout benchmark (`npm run bench:fleet`): a hub and fleets of 100 and 1000 light
// devices (real Agents, many per worker process, no model: each really receives, sha256-checks,
// writes and installs) against a Mosquitto started on loopback with `sys_interval 1`. Scenarios:
// all devices online at publish; 10% joining after the rollout; 5% of chunks lost on the last hop.
// Measures broker egress from Mosquitto's own $SYS/broker/bytes/sent, hub egress (payload bytes the
// hub published) and completion time p50/p95 (publish → activated). The baseline in the same run is
// the same hub broadcasting every repair (`repairBroadcastShare: 0`, how repairs worked before),
// on fleets up to --baseline-max devices. Prints a table, writes bench-results/fleet.json.
// Flags: --sizes 100,1000  --kib 1024  --chunk-kib 64  --drop 0.05  --late 0.1  --workers 2
//        --quiet-ms 2000 (the agent's default)  --baseline-max 100  --timeout-s 600
import { fork, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Hub } from '../src/sync/hub/hub.ts';
import { generateSigningKey } from '../src/sync/protocol/signing.ts';
import { packAdapterDir } from '../src/sync/transfer/pack.ts';
import { BrokerBytes, Mosquitto, makeAdapter, BASE_FP, waitFor } from '../test/sync/helpers.ts';
import type { WorkerCommand, WorkerEvent } from './bench-fleet-devices.ts';

const { values: flags } = parseArgs({
  options: {
    sizes: { type: 'string', default: '100,1000' },
    kib: { type: 'string', default: '1024' },
    'chunk-kib': { type: 'string', default: '64' },
    drop: { type: 'string', default: '0.05' },
    late: { type: 'string', default: '0.1' },
    workers: { type: 'string', default: '2' },
    'quiet-ms': { type: 'string', default: '2000' },
    'baseline-max': { type: 'string', default: '100' },
    'timeout-s': { type: 'string', default: '600' },
  },
});
const sizes = flags.sizes.split(',').map(Number);
const dropRate = Number(flags.drop);
const lateShare = Number(flags.late);
const chunkSize = Number(flags['chunk-kib']) * 1024;
const quietMs = Number(flags['quiet-ms']);
const nWorkers = Number(flags.workers);
const baselineMax = Number(flags['baseline-max']);
const timeoutMs = Number(flags['timeout-s']) * 1000;

/** Targets of issue #14 (ratios). */
const TARGETS = { brokerNoLoss: 1.1, brokerLoss: 1.3, hubNoLoss: 1.1, lateJoiner: 1.1 };

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
}
const log = (line: string) => process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${line}\n`);

// ---- workers ----

class Worker {
  readonly proc: ChildProcess;
  private waiting: { ev: WorkerEvent['ev']; resolve: (e: WorkerEvent) => void } | null = null;
  constructor(onActivated: (id: string, at: number) => void) {
    // Hundreds of devices share one process's libuv pool, and each fsyncs its transfer state every
    // 250 ms: a larger pool keeps one device's fsync from stalling the next device's chunk write.
    this.proc = fork(path.join(import.meta.dirname, 'bench-fleet-devices.ts'), [], {
      execArgv: ['--import', 'tsx'],
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      env: { ...process.env, UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? '16' },
    });
    this.proc.on('message', (e: WorkerEvent) => {
      if (e.ev === 'activated') onActivated(e.id, e.at);
      else if (e.ev === 'error') log(`worker error: ${e.message}`);
      if (this.waiting && this.waiting.ev === e.ev) {
        const w = this.waiting;
        this.waiting = null;
        w.resolve(e);
      }
    });
  }
  call(c: WorkerCommand, reply: WorkerEvent['ev']): Promise<WorkerEvent> {
    return new Promise((resolve) => {
      this.waiting = { ev: reply, resolve };
      this.proc.send(c);
    });
  }
}

// ---- setup ----

const base = os.tmpdir();
const work = await fs.mkdtemp(path.join(base, 'edgelora-bench-fleet-'));
const mosq = await Mosquitto.start({ sysInterval: 1 });
const sys = await BrokerBytes.open(mosq.url);
const key = generateSigningKey();
const trustedKeyPem = key.publicKey.export({ format: 'pem', type: 'spki' }) as string;

// The adapter: hidden size 1024, layers chosen so the safetensors file is about --kib KiB.
const hidden = 1024;
const perLayer = 2 * 2 * 4 * hidden * 4; // q/v × A/B × r=4 × C × fp32
const srcDir = await makeAdapter(path.join(work, 'src'), { seed: 7, hidden, layers: Math.max(1, Math.round((Number(flags.kib) * 1024) / perLayer)) });
const blob = await packAdapterDir(srcDir);
log(`adapter blob ${(blob.length / 1048576).toFixed(2)} MiB in ${Math.ceil(blob.length / chunkSize)} chunks of ${chunkSize / 1024} KiB; ${nWorkers} device workers; state on ${base}; ${os.cpus().length} CPUs (shared)`);

const activatedAt = new Map<string, number>();
const workers = Array.from({ length: nWorkers }, () => new Worker((id, at) => activatedAt.set(id, at)));

type Scenario = 'online' | 'late' | 'loss';
type System = 'edgelora' | 'broadcast-repair';
interface Row {
  devices: number;
  scenario: Scenario;
  system: System;
  /** Devices online at publish. */
  online: number;
  completed: number;
  /** Broker egress ($SYS bytes sent) during the rollout ÷ (online devices × blob). */
  broker_x: number;
  /** Payload bytes the hub published during the rollout ÷ blob. */
  hub_x: number;
  p50_s: number;
  p95_s: number;
  /** late: devices that joined after the rollout, broker bytes while they caught up ÷ (late × blob), and their catch-up time. */
  late: number;
  late_x: number;
  late_p50_s: number;
  late_p95_s: number;
  repair_unicast: number;
  repair_broadcast: number;
  wall_s: number;
}

async function startDevices(fleet: string, ids: string[], drop: number, seed: number): Promise<void> {
  const parts = workers.map(() => [] as string[]);
  ids.forEach((id, i) => parts[i % workers.length]?.push(id));
  await Promise.all(
    workers.map((w, k) =>
      w.call({ cmd: 'start', url: mosq.url, fleet, ids: parts[k] ?? [], stateRoot: path.join(work, fleet), trustedKeyPem, fingerprint: BASE_FP, quietMs, drop, seed: seed + 100_000 * k }, 'started'),
    ),
  );
}

async function waitActivated(ids: string[], what: string): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (ids.every((id) => activatedAt.has(id))) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const n = ids.filter((id) => activatedAt.has(id)).length;
  if (n < ids.length) log(`${what}: only ${n}/${ids.length} devices completed within ${timeoutMs / 1000} s`);
  return n;
}

let runNo = 0;
async function run(n: number, scenario: Scenario, system: System): Promise<Row> {
  const t0wall = Date.now();
  const fleet = `b${++runNo}`;
  const hub = new Hub({
    allowPlaintext: true,
    broker: { url: mosq.url },
    storeDir: path.join(work, `store-${fleet}`),
    key,
    chunkSize,
    ...(system === 'broadcast-repair' ? { repairBroadcastShare: 0 } : {}),
  });
  await hub.start();
  const entry = await hub.hubStore.putBlob(blob, { name: 'bench', source: 'publish' });
  const ids = Array.from({ length: n }, (_, i) => `${fleet}-d${i}`);
  const nLate = scenario === 'late' ? Math.round(n * lateShare) : 0;
  const onlineIds = ids.slice(0, n - nLate);
  const lateIds = ids.slice(n - nLate);
  await startDevices(fleet, onlineIds, scenario === 'loss' ? dropRate : 0, runNo * 7919);
  // The repair rule counts the target's online devices from their retained statuses.
  await waitFor('the hub saw every device online', () => onlineIds.every((id) => hub.devices.get(id)?.online === true), 120_000);
  const sys0 = await sys.read();
  const hub0 = { ...hub.stats };
  const t0 = Date.now();
  await hub.publish(entry.sha256, { kind: 'fleet', name: fleet });
  const completed = await waitActivated(onlineIds, `${n} ${scenario} ${system}`);
  const sys1 = await sys.read();
  const hub1 = { ...hub.stats };
  const times = onlineIds.flatMap((id) => (activatedAt.has(id) ? [((activatedAt.get(id) ?? 0) - t0) / 1000] : []));
  let lateX = NaN;
  let lateTimes: number[] = [];
  if (nLate > 0) {
    const tL = Date.now();
    await startDevices(fleet, lateIds, 0, runNo * 7919 + 1);
    await waitActivated(lateIds, `${n} late joiners ${system}`);
    const sys2 = await sys.read();
    lateX = (sys2 - sys1) / (nLate * blob.length);
    lateTimes = lateIds.flatMap((id) => (activatedAt.has(id) ? [((activatedAt.get(id) ?? 0) - tL) / 1000] : []));
  }
  await Promise.all(workers.map((w) => w.call({ cmd: 'stop' }, 'stopped')));
  await hub.stop();
  await fs.rm(path.join(work, `store-${fleet}`), { recursive: true, force: true });
  await fs.rm(path.join(work, fleet), { recursive: true, force: true });
  return {
    devices: n,
    scenario,
    system,
    online: onlineIds.length,
    completed: completed + lateTimes.length,
    broker_x: (sys1 - sys0) / (onlineIds.length * blob.length),
    hub_x: (hub1.bytesOut - hub0.bytesOut) / blob.length,
    p50_s: pct(times, 50),
    p95_s: pct(times, 95),
    late: nLate,
    late_x: lateX,
    late_p50_s: lateTimes.length ? pct(lateTimes, 50) : NaN,
    late_p95_s: lateTimes.length ? pct(lateTimes, 95) : NaN,
    repair_unicast: hub.stats.chunksUnicast - hub0.chunksUnicast,
    repair_broadcast: hub.stats.chunksResent - hub0.chunksResent - (hub.stats.chunksUnicast - hub0.chunksUnicast),
    wall_s: (Date.now() - t0wall) / 1000,
  };
}

const rows: Row[] = [];
try {
  for (const n of sizes) {
    for (const scenario of ['online', 'late', 'loss'] as const) {
      // The baseline only differs in repairs: there are none without loss or late joiners.
      const systems: System[] = scenario !== 'online' && n <= baselineMax ? ['edgelora', 'broadcast-repair'] : ['edgelora'];
      for (const system of systems) {
        log(`run: ${n} devices, ${scenario}, ${system}`);
        const row = await run(n, scenario, system);
        rows.push(row);
        log(JSON.stringify(row));
      }
    }
  }
} finally {
  for (const w of workers) w.proc.kill();
  await sys.close();
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
}

const cols = Object.keys(rows[0] ?? {}) as (keyof Row)[];
const fmt = (v: Row[keyof Row]) => (typeof v === 'string' ? v : Number.isNaN(v) ? '-' : Number.isInteger(v) ? String(v) : v.toFixed(3));
const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c]).length)));
process.stdout.write(`${cols.map((c, i) => c.padStart(widths[i] ?? 0)).join('  ')}\n`);
for (const r of rows) process.stdout.write(`${cols.map((c, i) => fmt(r[c]).padStart(widths[i] ?? 0)).join('  ')}\n`);

const mine = rows.filter((r) => r.system === 'edgelora');
const worst = (xs: number[]) => (xs.length ? Math.max(...xs) : NaN);
const checks = [
  { what: 'broker egress ÷ (devices × blob), no loss', value: worst(mine.filter((r) => r.scenario !== 'loss').map((r) => r.broker_x)), target: TARGETS.brokerNoLoss },
  { what: 'broker egress ÷ (devices × blob), 5% loss', value: worst(mine.filter((r) => r.scenario === 'loss').map((r) => r.broker_x)), target: TARGETS.brokerLoss },
  { what: 'hub egress ÷ blob, no loss', value: worst(mine.filter((r) => r.scenario !== 'loss').map((r) => r.hub_x)), target: TARGETS.hubNoLoss },
  { what: 'bytes per late joiner ÷ blob', value: worst(mine.filter((r) => r.scenario === 'late').map((r) => r.late_x)), target: TARGETS.lateJoiner },
].map((c) => ({ ...c, met: c.value <= c.target }));
process.stdout.write('\n');
for (const c of checks) process.stdout.write(`${c.met ? 'met ' : 'MISS'}  ${c.what}: worst ${c.value.toFixed(3)} (target ≤ ${c.target})\n`);
process.stdout.write('Completion times are on 2 shared CPUs with the hub, the broker and every device on one machine: not a target, reported only.\n');
await fs.mkdir('bench-results', { recursive: true });
await fs.writeFile(
  'bench-results/fleet.json',
  JSON.stringify({ blobBytes: blob.length, chunkSize, quietMs, dropRate, lateShare, workers: nWorkers, cpus: os.cpus().length, broker: 'mosquitto 2 (loopback), $SYS/broker/bytes/sent', rows, checks }, null, 2) + '\n',
);
process.stdout.write('wrote bench-results/fleet.json\n');
