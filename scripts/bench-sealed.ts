// Sealed vs plaintext rollout benchmark (`npm run bench:sealed`): one hub and 10 device agents (real
// Agents in this process, no model: each receives, sha256-checks, opens the sealed chunks, checks
// the plaintext hash and installs) against a Mosquitto on loopback, a 16 MiB adapter. Rounds
// alternate sealed (devices enrolled) and plaintext (--allow-plaintext, devices not enrolled).
// Measures rollout time (publish call → all 10 active) and CPU time of this process (hub + all 10
// agents; Mosquitto not included) over the rollout, plus the crypto alone: sealing 16 MiB for 10
// recipients and opening it once. Prints a table, writes bench-results/sealed.json.
// Flags: --devices 10  --mib 16  --rounds 3  --chunk-kib 256
import { promises as fs } from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { parseArgs } from 'node:util';
import { createHash } from 'node:crypto';
import { Agent } from '../src/sync/agent/agent.ts';
import { Hub } from '../src/sync/hub/hub.ts';
import { generateSigningKey } from '../src/sync/protocol/signing.ts';
import { generateEncKey, openChunk, sealBlob, unwrap } from '../src/sync/protocol/envelope.ts';
import { enroll, enrolmentFromStatus } from '../src/sync/hub/enrolment.ts';
import { packAdapterDir } from '../src/sync/transfer/pack.ts';
import type { Status } from '../src/sync/protocol/messages.ts';
import { Mosquitto, makeAdapter, testAgentOptions, tmpDir, waitFor } from '../test/sync/helpers.ts';

const { values: flags } = parseArgs({ options: { devices: { type: 'string', default: '10' }, mib: { type: 'string', default: '16' }, rounds: { type: 'string', default: '3' }, 'chunk-kib': { type: 'string', default: '256' } } });
const nDev = Number(flags.devices);
const rounds = Number(flags.rounds);
const chunkSize = Number(flags['chunk-kib']) * 1024;
const log = (l: string) => process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${l}\n`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

const work = tmpDir('bench-sealed');
const key = generateSigningKey();
const hubEnc = generateEncKey();
const mosq = await Mosquitto.start();
// 64 layers × q,v × (A, B) of r 4 × 4096 float32 = 16 MiB of weights (scaled by --mib).
const layers = Math.max(1, Math.round((64 * Number(flags.mib)) / 16));
const src = await makeAdapter(path.join(work, 'adapter'), { seed: 5, layers, hidden: 4096 });
const plain = await packAdapterDir(src);
const plainSha = createHash('sha256').update(plain).digest('hex');
log(`adapter: ${(plain.length / 2 ** 20).toFixed(2)} MiB packed, ${nDev} devices, chunk ${chunkSize / 1024} KiB, ${rounds} rounds per mode`);

type Mode = 'sealed' | 'plaintext';
const results: Record<Mode, { ms: number; cpuMs: number }[]> = { sealed: [], plaintext: [] };
let run = 0;
async function round(mode: Mode): Promise<void> {
  const fleet = `f${++run}`;
  const storeDir = path.join(work, `store-${fleet}`);
  const hub = new Hub({ broker: { url: mosq.url }, storeDir, key, encKey: hubEnc, chunkSize, ...(mode === 'plaintext' ? { allowPlaintext: true } : {}) });
  await hub.start();
  const agents = Array.from({ length: nDev }, (_, i) => new Agent(testAgentOptions({ url: mosq.url, stateRoot: path.join(work, `agents-${fleet}`), trustedKey: key.publicKey }, `${fleet}d${i}`, fleet, { allowPlaintext: false, quietMs: 1000, statusIntervalMs: 1000, log: undefined })));
  try {
    await Promise.all(agents.map((a) => a.start()));
    await waitFor('all statuses at the hub', () => agents.every((a) => hub.devices.get(a.deviceId)?.encKey != null), 60_000);
    if (mode === 'sealed') for (const a of agents) await enroll(storeDir, enrolmentFromStatus(hub.devices.get(a.deviceId) as Status));
    if (global.gc) global.gc();
    const c0 = cpuMs();
    const t0 = performance.now();
    const m = await hub.publishDir(src, { kind: 'fleet', name: fleet }, 'bench');
    if ((m.enc !== undefined) !== (mode === 'sealed')) throw new Error(`round ${fleet}: expected a ${mode} publication`);
    await waitFor('all active', () => agents.every((a) => a.active?.sha256 === plainSha), 300_000);
    const ms = performance.now() - t0;
    const cpu = cpuMs() - c0;
    results[mode].push({ ms, cpuMs: cpu });
    log(`${mode}: ${ms.toFixed(0)} ms, CPU ${cpu.toFixed(0)} ms`);
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
}

try {
  for (let r = 0; r < rounds; r++) {
    // Alternating, and the order flips every round, so drift on a shared machine hits both modes.
    for (const mode of r % 2 === 0 ? (['plaintext', 'sealed'] as const) : (['sealed', 'plaintext'] as const)) await round(mode);
  }
  // The crypto alone, in this process: seal for nDev recipients, then one device's open.
  const recips = Array.from({ length: nDev }, () => generateEncKey());
  const sealMs: number[] = [];
  const openMs: number[] = [];
  for (let r = 0; r < rounds; r++) {
    let t = performance.now();
    const s = sealBlob(plain, chunkSize, recips.map((k) => k.raw));
    sealMs.push(performance.now() - t);
    t = performance.now();
    const k = unwrap(recips[0]!, s.recipients[0]!, s.noncePrefix);
    for (let i = 0; i < s.chunks; i++) openChunk(k.contentKey, s.noncePrefix, i, s.chunks, s.data.subarray(i * s.chunkSize, (i + 1) * s.chunkSize));
    openMs.push(performance.now() - t);
  }
  const row = (mode: Mode) => ({ rolloutMs: median(results[mode].map((x) => x.ms)), cpuMs: median(results[mode].map((x) => x.cpuMs)), runs: results[mode] });
  const out = {
    bench: 'sealed',
    at: new Date().toISOString(),
    host: { cpus: os.cpus().length, model: os.cpus()[0]?.model ?? '?', node: process.version },
    adapterBytes: plain.length,
    devices: nDev,
    chunkSize,
    note: 'medians of alternating rounds on a shared machine: noisy. CPU is this process (hub + all agents), not Mosquitto.',
    plaintext: row('plaintext'),
    sealed: row('sealed'),
    crypto: { sealForAllMs: median(sealMs), openOneMs: median(openMs), sealRuns: sealMs, openRuns: openMs },
  };
  await fs.mkdir('bench-results', { recursive: true });
  await fs.writeFile('bench-results/sealed.json', `${JSON.stringify(out, null, 2)}\n`);
  const p = out.plaintext;
  const s = out.sealed;
  const pctx = (a: number, b: number) => `${(((a - b) / b) * 100).toFixed(0)}%`;
  process.stdout.write(`\n${(plain.length / 2 ** 20).toFixed(1)} MiB adapter to ${nDev} devices, median of ${rounds} alternating rounds (noisy, shared machine)\n`);
  process.stdout.write(`mode        rollout ms   CPU ms (hub + ${nDev} agents)\n`);
  process.stdout.write(`plaintext   ${p.rolloutMs.toFixed(0).padStart(10)}   ${p.cpuMs.toFixed(0).padStart(8)}\n`);
  process.stdout.write(`sealed      ${s.rolloutMs.toFixed(0).padStart(10)}   ${s.cpuMs.toFixed(0).padStart(8)}\n`);
  process.stdout.write(`sealed vs plaintext: rollout ${pctx(s.rolloutMs, p.rolloutMs)}, CPU ${pctx(s.cpuMs, p.cpuMs)}\n`);
  process.stdout.write(`crypto alone: seal ${(plain.length / 2 ** 20).toFixed(1)} MiB for ${nDev} recipients ${out.crypto.sealForAllMs.toFixed(0)} ms; one device opens it in ${out.crypto.openOneMs.toFixed(0)} ms\n`);
  process.stdout.write('wrote bench-results/sealed.json\n');
} finally {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
}
