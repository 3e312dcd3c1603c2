// Fleet rollout benchmark (`npm run bench:fleet`): a hub and 1, 10 and 100 simulated agents (in
// this process, each with its own MQTT connection) against a Mosquitto started on loopback; a
// 16 MiB adapter is published to the fleet, without loss and with 5% of chunks dropped at the
// receiving agents. Reports rollout time per agent (publish → activated: p50, p95, max) and the
// bytes the hub published divided by the blob size. Writes bench-results/fleet.json.
// Flags: --sizes 1,10,100  --mib 16  --drop 0.05  --chunk-kib 256  --quiet-ms 2000
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Agent } from '../src/sync/agent.ts';
import { Hub } from '../src/sync/hub.ts';
import { generateSigningKey } from '../src/sync/signing.ts';
import { packAdapterDir } from '../src/sync/pack.ts';
import type { InboundHook } from '../src/sync/mqtt.ts';
import { Rng } from '../src/util/rng.ts';
import { Mosquitto, makeAdapter, BASE_FP } from '../test/sync/helpers.ts';

const { values: flags } = parseArgs({
  options: {
    sizes: { type: 'string', default: '1,10,100' },
    mib: { type: 'string', default: '16' },
    drop: { type: 'string', default: '0.05' },
    'chunk-kib': { type: 'string', default: '256' },
    'quiet-ms': { type: 'string', default: '2000' },
  },
});
const sizes = flags.sizes.split(',').map(Number);
const dropRate = Number(flags.drop);
const chunkSize = Number(flags['chunk-kib']) * 1024;
const quietMs = Number(flags['quiet-ms']);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
}

/** Drops each chunk message with probability `p` (seeded), as a lossy last hop would. */
function dropper(seed: number, p: number): InboundHook {
  const rng = new Rng(seed);
  return (topic, payload, deliver) => {
    if (topic.endsWith('/chunk') && rng.next() < p) return;
    deliver(topic, payload);
  };
}

// State directories on disk (tmpfs would hold 100 × 2 × 16 MiB in RAM).
const base = os.tmpdir();
const work = await fs.mkdtemp(path.join(base, 'edgelora-bench-fleet-'));
const mosq = await Mosquitto.start();
const key = generateSigningKey();

// A 16 MiB adapter: hidden size and layer count chosen so the safetensors file is ~16 MiB.
const targetBytes = Number(flags.mib) * 1024 * 1024;
const hidden = 2048;
const perLayer = 2 * 2 * 4 * hidden * 4; // q/v × A/B × r=4 × C × fp32
const srcDir = await makeAdapter(path.join(work, 'src'), { seed: 7, hidden, layers: Math.round(targetBytes / perLayer) });
const blob = await packAdapterDir(srcDir);
process.stderr.write(`adapter blob: ${(blob.length / 1048576).toFixed(2)} MiB, ${Math.ceil(blob.length / chunkSize)} chunks of ${chunkSize / 1024} KiB; state on ${base}\n`);

const hub = new Hub({ broker: { url: mosq.url }, storeDir: path.join(work, 'store'), key, chunkSize });
await hub.start();
const entry = await hub.hubStore.putBlob(blob, { name: 'bench', source: 'publish' });

interface Row {
  agents: number;
  drop: number;
  p50_s: number;
  p95_s: number;
  max_s: number;
  hub_first_pass_s: number;
  egress_x: number;
  chunks_resent: number;
  missing_requests: number;
}
const rows: Row[] = [];
let run = 0;
try {
  for (const drop of [0, dropRate]) {
    for (const n of sizes) {
      run++;
      const fleet = `bench${run}`;
      const agents: Agent[] = [];
      for (let i = 0; i < n; i++) {
        agents.push(
          new Agent({
            broker: { url: mosq.url },
            deviceId: `${fleet}-d${i}`,
            fleet,
            stateDir: path.join(work, fleet, `d${i}`),
            trustedKey: key.publicKey,
            modelFingerprint: BASE_FP,
            quietMs,
            ...(drop > 0 ? { inbound: dropper(1000 * run + i, drop) } : {}),
          }),
        );
      }
      await Promise.all(agents.map((a) => a.start()));
      const done: number[] = [];
      const all = Promise.all(agents.map((a) => new Promise<void>((resolve) => a.once('activated', () => (done.push(performance.now()), resolve())))));
      const s0 = { ...hub.stats };
      let firstPass = NaN;
      hub.once('sent', () => (firstPass = performance.now()));
      const t0 = performance.now();
      await hub.publish(entry.sha256, { kind: 'fleet', name: fleet });
      await all;
      // Let any resend already scheduled finish, so its bytes are counted.
      await new Promise((r) => setTimeout(r, 300));
      const times = done.map((t) => (t - t0) / 1000);
      const row: Row = {
        agents: n,
        drop,
        p50_s: pct(times, 50),
        p95_s: pct(times, 95),
        max_s: Math.max(...times),
        hub_first_pass_s: (firstPass - t0) / 1000,
        egress_x: (hub.stats.bytesOut - s0.bytesOut) / blob.length,
        chunks_resent: hub.stats.chunksResent - s0.chunksResent,
        missing_requests: hub.stats.missingRequests - s0.missingRequests,
      };
      rows.push(row);
      process.stderr.write(`${JSON.stringify(row)}\n`);
      await Promise.all(agents.map((a) => a.stop()));
      await fs.rm(path.join(work, fleet), { recursive: true, force: true });
    }
  }
} finally {
  await hub.stop();
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
}

const cols = Object.keys(rows[0] ?? {}) as (keyof Row)[];
const fmt = (v: number) => (Number.isInteger(v) ? String(v) : v.toFixed(3));
const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c]).length)));
process.stdout.write(`${cols.map((c, i) => c.padStart(widths[i] ?? 0)).join('  ')}\n`);
for (const r of rows) process.stdout.write(`${cols.map((c, i) => fmt(r[c]).padStart(widths[i] ?? 0)).join('  ')}\n`);
const one = rows.find((r) => r.agents === 1 && r.drop === 0);
const hundred = rows.find((r) => r.agents === Math.max(...sizes) && r.drop === 0);
const targets = {
  scale_ratio_max: one && hundred ? hundred.max_s / one.max_s : null,
  scale_target: 2,
  egress_no_loss_max: Math.max(...rows.filter((r) => r.drop === 0).map((r) => r.egress_x)),
  egress_target: 1.1,
};
process.stdout.write(`\n${Math.max(...sizes)} agents vs 1 (max rollout): ${targets.scale_ratio_max?.toFixed(2)}x (target ≤ 2x); hub egress without loss ≤ ${targets.egress_no_loss_max.toFixed(3)}x (target ≤ 1.1x)\n`);
await fs.mkdir('bench-results', { recursive: true });
await fs.writeFile(
  'bench-results/fleet.json',
  JSON.stringify({ blobBytes: blob.length, chunkSize, quietMs, cpus: os.cpus().length, broker: 'mosquitto (loopback)', agentsInProcess: true, rows, targets }, null, 2) + '\n',
);
process.stdout.write('wrote bench-results/fleet.json\n');
