// Fleet sync at fleet scale against a real Mosquitto: what a late joiner costs in the broker's own
// byte count ($SYS/broker/bytes/sent), that a chunk many devices lost is resent once while a chunk
// one device lost goes only to it, one hub per store, and a hub that exits promptly with its broker gone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import mqtt from 'mqtt';
import { Agent, type AgentOptions } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { generateSigningKey, writeKeyPair } from '../../src/sync/protocol/signing.ts';
import { decodeJson, HubStatusSchema, type HubStatus } from '../../src/sync/protocol/messages.ts';
import type { InboundHook } from '../../src/sync/transport/mqtt.ts';
import { topics } from '../../src/sync/protocol/topics.ts';
import { BrokerBytes, Mosquitto, REPO, dirDigest, makeAdapter, sleep, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('scale');

before(async () => {
  mosq = await Mosquitto.start({ sysInterval: 1 });
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

const agentOpts = (deviceId: string, fleet: string, extra: Partial<AgentOptions> = {}): AgentOptions =>
  testAgentOptions({ url: mosq.url, stateRoot: path.join(work, 'agents'), trustedKey: key.publicKey }, deviceId, fleet, { statusIntervalMs: 500, ...extra });

/** Late-joiner cost: the bytes the broker sends while one device catches up, ÷ the blob. */
const LATE_JOINER_MAX = 1.5;

test('a late joiner costs about its own bytes in broker egress ($SYS), not one blob per online device', async () => {
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, 'store-late'), key, chunkSize: 64 * 1024, coalesceMs: 100 });
  await hub.start();
  const online = Array.from({ length: 10 }, (_, i) => new Agent(agentOpts(`on${i}`, 'late')));
  const late = new Agent(agentOpts('late0', 'late'));
  const sys = await BrokerBytes.open(mosq.url);
  try {
    await Promise.all(online.map((a) => a.start()));
    // ~1.3 MB: 20 layers × q/v × A/B × r 4 × C 1024 × fp32.
    const src = await makeAdapter(path.join(work, 'src', 'late'), { seed: 5, hidden: 1024, layers: 20 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'late' }, 'late');
    for (const a of online) await waitFor(`${a.deviceId} active`, () => a.active?.sha256 === m.blob.sha256, 30_000);
    const heldBefore = online.map((a) => a.counters.chunksReceived + a.counters.chunksDuplicate);
    const b0 = await sys.read();
    await late.start();
    await waitFor('late joiner active', () => late.active?.sha256 === m.blob.sha256, 30_000);
    const b1 = await sys.read();
    const ratio = (b1 - b0) / m.blob.size;
    assert.deepEqual(await dirDigest(late.activeDir ?? ''), await dirDigest(src), 'the late joiner holds a byte-identical adapter');
    assert.ok(ratio <= LATE_JOINER_MAX, `broker egress for one late joiner: ${b1 - b0} bytes = ${ratio.toFixed(3)}× the ${m.blob.size}-byte blob (limit ${LATE_JOINER_MAX}×)`);
    assert.ok(ratio >= 1, `the late joiner's bytes did pass through the broker (${ratio.toFixed(3)}×)`);
    const heldAfter = online.map((a) => a.counters.chunksReceived + a.counters.chunksDuplicate);
    assert.deepEqual(heldAfter, heldBefore, 'no chunk of the repair reached a device that already held the blob');
    assert.ok(hub.stats.chunksUnicast >= m.blob.chunks, `the repair went to the late joiner's own topic (${hub.stats.chunksUnicast} unicast chunks)`);
    process.stdout.write(`# late joiner: ${b1 - b0} broker bytes for a ${m.blob.size}-byte blob = ${ratio.toFixed(3)}×\n`);
  } finally {
    await sys.close();
    await Promise.all([...online, late].map((a) => a.stop()));
    await hub.stop();
  }
});

/** Drops the first delivery of chosen chunk indices (binary frame: index is a u32 BE at byte 36). */
function dropFirst(indices: number[]): InboundHook {
  const seen = new Set<number>();
  return (topic, payload, deliver) => {
    if (topic.endsWith('/chunk') && payload.length > 44) {
      const i = payload.readUInt32BE(36);
      if (indices.includes(i) && !seen.has(i)) {
        seen.add(i);
        return;
      }
    }
    deliver(topic, payload);
  };
}

test('chunks most devices lost are resent once to the target; a chunk one device lost goes to it alone', async () => {
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, 'store-coalesce'), key, chunkSize: 1024, coalesceMs: 300 });
  await hub.start();
  // Every device loses chunks 2 and 5 (a lossy broadcast); d0 also loses chunk 7.
  const agents = Array.from({ length: 6 }, (_, i) => new Agent(agentOpts(`co${i}`, 'co', { inbound: dropFirst(i === 0 ? [2, 5, 7] : [2, 5]) })));
  try {
    await Promise.all(agents.map((a) => a.start()));
    await waitFor('the hub saw every device online', () => agents.every((a) => hub.devices.get(a.deviceId)?.online === true));
    const src = await makeAdapter(path.join(work, 'src', 'co'), { seed: 6 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'co' }, 'co');
    for (const a of agents) await waitFor(`${a.deviceId} active`, () => a.active?.sha256 === m.blob.sha256, 30_000);
    assert.equal(hub.stats.chunksResent, 3, `one broadcast each of chunks 2 and 5, one unicast of chunk 7: ${JSON.stringify(hub.stats)}`);
    assert.equal(hub.stats.chunksUnicast, 1, `only chunk 7 went to one device's own topic: ${JSON.stringify(hub.stats)}`);
    const dups = agents.map((a) => a.counters.chunksDuplicate);
    assert.deepEqual(dups, [0, 0, 0, 0, 0, 0], 'no device received a chunk it already held');
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
});

test('one hub per store; a second hub stopping leaves the running hub\'s status online', async () => {
  const store = path.join(work, 'store-lock');
  const a = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: store, key, clientId: 'hub-a' });
  await a.start();
  const other = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: store, key, clientId: 'hub-a2' });
  await assert.rejects(other.start(), /store is in use by another running hub/);
  const b = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, 'store-lock-b'), key, clientId: 'hub-b' });
  const watcher = await mqtt.connectAsync(mosq.url, { clientId: 'hubwatch', reconnectPeriod: 0 });
  let last: HubStatus | null = null;
  watcher.on('message', (t, p) => {
    if (t !== topics.hubStatus || p.length === 0) return;
    const d = decodeJson(HubStatusSchema, p);
    if (d.ok) last = d.value;
  });
  try {
    await watcher.subscribeAsync(topics.hubStatus, { qos: 1 });
    await b.start();
    await waitFor('hub b online', () => last?.instance === b.instance && last.online);
    await b.stop();
    await waitFor('hub a restored its online status', () => last?.instance === a.instance && last.online === true, 5000);
    await sleep(300);
    const st = last as HubStatus | null;
    assert.ok(st?.online === true && st.instance === a.instance, `retained hub/status belongs to the running hub: ${JSON.stringify(st)}`);
  } finally {
    await watcher.endAsync(true);
    await a.stop();
  }
  // Once stopped, the store is free again.
  const again = new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: store, key });
  await again.start();
  await again.stop();
});

/** How long `edgelora hub` may take to exit on SIGTERM once its broker is gone. */
const HUB_EXIT_MS = 5000;

test('a hub told to stop after its broker died exits within 5 s', async () => {
  const broker = await Mosquitto.start();
  const { keyFile } = await writeKeyPair(path.join(work, 'exit-hub'));
  const proc = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), 'hub', '--broker', broker.url, '--store', path.join(work, 'store-exit'), '--key', keyFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  try {
    await waitFor('hub connected', () => /hub: connected, key id/.test(err), 20_000);
    await broker.kill();
    await sleep(1500); // the hub is now reconnecting in the background
    const t0 = Date.now();
    proc.kill('SIGTERM');
    const code = await Promise.race([exited, sleep(HUB_EXIT_MS * 3).then(() => 'hung' as const)]);
    const ms = Date.now() - t0;
    assert.notEqual(code, 'hung', `hub still running ${ms} ms after SIGTERM:\n${err}`);
    assert.ok(ms <= HUB_EXIT_MS, `hub took ${ms} ms to exit after SIGTERM (limit ${HUB_EXIT_MS} ms):\n${err}`);
    assert.equal(code, 0, err);
  } finally {
    if (proc.exitCode === null) proc.kill('SIGKILL');
    await broker.stop();
  }
});
