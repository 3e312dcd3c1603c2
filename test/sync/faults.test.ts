// Faults, each ending with every agent holding a byte-identical, verified adapter and nothing
// half-written ever activated: Mosquitto killed and restarted mid-transfer; chunks duplicated,
// dropped and reordered; a chunk with a flipped bit; an agent process SIGKILLed mid-download.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent, type AgentOptions } from '../../src/sync/agent/agent.ts';
import { Hub, type HubOptions } from '../../src/sync/hub/hub.ts';
import { Link, type InboundHook } from '../../src/sync/transport/mqtt.ts';
import { generateSigningKey, writeKeyPair } from '../../src/sync/protocol/signing.ts';
import { decodeJson, StatusSchema, type Status } from '../../src/sync/protocol/messages.ts';
import { topics } from '../../src/sync/protocol/topics.ts';
import { Rng } from '../../src/util/rng.ts';
import { BASE_FP, Mosquitto, REPO, RecordingActivator, dirDigest, digestKey, makeAdapter, sleep, tmpDir, waitFor } from './helpers.ts';
import { tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { loadHfConfig } from '../../src/formats/hf-config.js';
import { readManifest } from '../../src/model/manifest.js';

const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('faults');
/** Chunk size for these tests: small, so the ~33 KiB adapter spans ~33 chunks. */
const CHUNK = 1024;

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

function agentOpts(deviceId: string, fleet: string, extra: Partial<AgentOptions> = {}): AgentOptions {
  return {
    broker: { url: mosq.url, reconnectMs: 200 },
    deviceId,
    fleet,
    stateDir: path.join(work, 'agents', deviceId),
    trustedKey: key.publicKey,
    modelFingerprint: BASE_FP,
    quietMs: 300,
    allowPlaintext: true,
    maxRetryMs: 1500,
    statusIntervalMs: 100,
    activator: new RecordingActivator(),
    ...extra,
  };
}

async function startHub(store: string, extra: Partial<HubOptions> = {}): Promise<Hub> {
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, store), key, chunkSize: CHUNK, coalesceMs: 100, ...extra });
  await hub.start();
  return hub;
}

/** Every agent: active = sha, its directory byte-identical to src, and every activation was of exactly src. */
async function assertAllHold(agents: Agent[], sha: string, src: string): Promise<void> {
  for (const a of agents) await waitFor(`${a.deviceId} active ${sha.slice(0, 12)}`, () => a.active?.sha256 === sha, 30_000);
  const want = await dirDigest(src);
  for (const a of agents) {
    assert.deepEqual(await dirDigest(a.activeDir ?? ''), want, `${a.deviceId}: byte-identical adapter`);
    const acts = (a.activator as RecordingActivator).activations;
    assert.ok(acts.length >= 1);
    for (const d of acts) assert.equal(digestKey(d), digestKey(want), `${a.deviceId}: only the complete adapter was activated`);
  }
}

test('Mosquitto killed and restarted in the middle of a transfer', async () => {
  // 16 KiB/s: the ~33 KiB adapter takes ~2 s, so the broker dies mid-transfer.
  const hub = await startHub('store-restart', { rateBytesPerSec: 16 * 1024 });
  const agents = ['m1', 'm2', 'm3'].map((id) => new Agent(agentOpts(id, 'fr')));
  try {
    await Promise.all(agents.map((a) => a.start()));
    const src = await makeAdapter(path.join(work, 'src', 'restart'), { seed: 31 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fr' }, 'restart');
    await waitFor('every agent has some chunks', () => agents.every((a) => a.counters.chunksReceived >= 6));
    assert.ok(agents.every((a) => a.active === null), 'killed before any agent finished');
    await mosq.kill();
    await sleep(400);
    await mosq.launch();
    await assertAllHold(agents, m.blob.sha256, src);
    for (const a of agents) assert.ok(a.counters.reconnects >= 1, `${a.deviceId} lost the broker and reconnected`);
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
});

/** Drops, duplicates and reorders chunk messages (seeded); other topics pass untouched. */
function lossy(seed: number, p: { drop: number; dup: number }): InboundHook {
  const rng = new Rng(seed);
  const held: [string, Buffer][] = [];
  let timer: NodeJS.Timeout | null = null;
  return (topic, payload, deliver) => {
    if (!topic.endsWith('/chunk')) return deliver(topic, payload);
    if (rng.next() < p.drop) return;
    held.push([topic, payload]);
    if (rng.next() < p.dup) held.push([topic, Buffer.from(payload)]);
    // Release a random held message once a few are waiting: delivery order is shuffled.
    while (held.length > 3) {
      const [x] = held.splice(rng.int(held.length), 1);
      if (x) deliver(x[0], x[1]);
    }
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      while (held.length > 0) {
        const [x] = held.splice(rng.int(held.length), 1);
        if (x) deliver(x[0], x[1]);
      }
    }, 30);
  };
}

test('chunks duplicated, dropped and reordered', async () => {
  const hub = await startHub('store-lossy');
  const agents = [1, 2, 3].map((i) => new Agent(agentOpts(`l${i}`, 'fl', { inbound: lossy(100 + i, { drop: 0.2, dup: 0.2 }) })));
  try {
    await Promise.all(agents.map((a) => a.start()));
    const src = await makeAdapter(path.join(work, 'src', 'lossy'), { seed: 41 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fl' }, 'lossy');
    await assertAllHold(agents, m.blob.sha256, src);
    const dup = agents.reduce((s, a) => s + a.counters.chunksDuplicate, 0);
    const req = agents.reduce((s, a) => s + a.counters.missingRequests, 0);
    assert.ok(dup > 0, `duplicates were seen and ignored (${dup})`);
    assert.ok(req > 0, `dropped chunks were asked for again (${req} requests)`);
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
});

test('a chunk with a flipped bit is dropped and fetched again', async () => {
  const hub = await startHub('store-flip');
  let flipped = 0;
  const flip: InboundHook = (topic, payload, deliver) => {
    // Flip one bit in the data of chunk 5, the first time it arrives.
    if (topic.endsWith('/chunk') && payload.readUInt32BE(36) === 5 && flipped === 0) {
      flipped++;
      const bad = Buffer.from(payload);
      bad[44 + 100] = (bad[44 + 100] ?? 0) ^ 0x10;
      return deliver(topic, bad);
    }
    deliver(topic, payload);
  };
  const victim = new Agent(agentOpts('b1', 'fb', { inbound: flip }));
  const other = new Agent(agentOpts('b2', 'fb'));
  try {
    await Promise.all([victim.start(), other.start()]);
    const src = await makeAdapter(path.join(work, 'src', 'flip'), { seed: 51 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fb' }, 'flip');
    await assertAllHold([victim, other], m.blob.sha256, src);
    assert.equal(flipped, 1);
    assert.equal(victim.counters.chunksCorrupt, 1, 'the corrupt chunk was caught by its sha256');
    assert.match(victim.status().lastError?.reason ?? '', /chunk 5 .* failed its sha256 check/);
  } finally {
    await Promise.all([victim.stop(), other.stop()]);
    await hub.stop();
  }
});

test('an agent SIGKILLed mid-download resumes where it stopped', async () => {
  const hub = await startHub('store-kill', { rateBytesPerSec: 8 * 1024 });
  const keyFiles = await writeKeyPair(path.join(work, 'hubkey'), key);
  const state = path.join(work, 'agents', 'k1');
  // A real tiny quantized model: with --model the agent loads accepted adapters into its runtime.
  const hf = await tinyCheckpoint(path.join(work, 'tiny'));
  const modelDir = await quantized(hf, path.join(work, 'tiny'), 'nf4', { format: 'nf4' });
  const { config: tinyCfg } = await loadHfConfig(hf);
  const fingerprint = (await readManifest(modelDir)).fingerprint;
  const spawnAgent = (): { proc: ChildProcess; log: () => string } => {
    let log = '';
    const proc = spawn(
      process.execPath,
      ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), 'agent', '--broker', mosq.url, '--device-id', 'k1', '--fleet', 'fk', '--state', state, '--trust', keyFiles.pubFile, '--model', modelDir, '--quiet-ms', '300', '--status-interval-ms', '50'],
      { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    proc.stderr?.on('data', (d: Buffer) => (log += d.toString()));
    return { proc, log: () => log };
  };
  const watcher = await Link.open({ url: mosq.url }, { clientId: 'watch-k1' });
  let last: Status | null = null;
  watcher.onMessage((t, p) => {
    if (t !== topics.status('k1') || p.length === 0) return;
    const d = decodeJson(StatusSchema, p);
    if (d.ok) last = d.value;
  });
  await watcher.waitConnected();
  await watcher.subscribe([topics.status('k1')]);
  let child = spawnAgent();
  try {
    await waitFor('agent k1 online', () => last?.online === true, 30_000);
    const src = path.join(work, 'src', 'kill');
    await randomAdapter(src, tinyCfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 61, fingerprint });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fk' }, 'kill');
    await waitFor('k1 holds 8+ chunks', () => (last?.transfer?.received ?? 0) >= 8, 30_000);
    const exited = new Promise((r) => child.proc.once('exit', r));
    child.proc.kill('SIGKILL');
    await exited;
    await waitFor('last will: k1 offline', () => last?.online === false, 10_000);
    const saved = JSON.parse(await fs.readFile(path.join(state, 'transfer', 'current.json'), 'utf8')) as { manifest: { seq: number } };
    assert.equal(saved.manifest.seq, m.seq, 'the transfer state survived the kill');
    assert.deepEqual(await fs.readdir(path.join(state, 'adapters')), [], 'nothing was installed before the kill');

    child = spawnAgent();
    await waitFor('k1 active after restart', () => last?.active?.sha256 === m.blob.sha256, 30_000);
    const resumed = /resuming kill v1: (\d+)\/(\d+) chunks held/.exec(child.log());
    assert.ok(resumed, `the restarted agent resumed (log: ${child.log()})`);
    assert.ok(Number(resumed[1]) >= 1, `it kept the chunks it had (${resumed[1]}/${resumed[2]})`);
    const dirs = await fs.readdir(path.join(state, 'adapters'));
    assert.equal(dirs.length, 1, `one installed adapter, no leftovers: ${dirs.join(', ')}`);
    assert.deepEqual(await dirDigest(path.join(state, 'adapters', dirs[0] ?? '')), await dirDigest(src));
    assert.deepEqual(await fs.readdir(path.join(state, 'transfer')), [], 'transfer state cleared after install');
  } finally {
    child.proc.kill('SIGTERM');
    await watcher.close();
    await hub.stop();
  }
});
