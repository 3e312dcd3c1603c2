// Sealed (encrypted) transfers against a real Mosquitto, with an outsider subscribed to `#` that
// keeps every payload: two enrolled devices install the adapter byte-identical while no capture
// holds its adapter_config.json text or the first 64 bytes of its safetensors; an unenrolled
// device gets nothing and says why; a removed device cannot read the next publication; a sealed
// upload leaves no plaintext on the wire and the hub stores the exact adapter; tampered wrapped
// keys, nonce prefixes and ciphertext (re-signed with the hub key, so only the AEAD can catch
// them) are refused with a reason and install nothing; a SIGKILLed agent resumes a sealed download.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import mqtt from 'mqtt';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Link } from '../../src/sync/transport/mqtt.ts';
import { generateSigningKey, signMessage, writeKeyPair } from '../../src/sync/protocol/signing.ts';
import { generateEncKey, sealBlob } from '../../src/sync/protocol/envelope.ts';
import { decodeJson, encodeChunk, ENC_ALG_V1, PACK_FORMAT, PROTOCOL_VERSION, StatusSchema, type ManifestBody, type Status } from '../../src/sync/protocol/messages.ts';
import { topics, type Target } from '../../src/sync/protocol/topics.ts';
import { enroll, enrolmentFromStatus, unenroll } from '../../src/sync/hub/enrolment.ts';
import { packAdapterDir } from '../../src/sync/transfer/pack.ts';
import { BASE_FP, Mosquitto, REPO, dirDigest, makeAdapter, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
const hubEnc = generateEncKey();
let mosq: Mosquitto;
const work = tmpDir('sealed');
/** Every payload the outsider saw, with its topic. */
const captured: { topic: string; payload: Buffer }[] = [];
let outsider: mqtt.MqttClient;

before(async () => {
  mosq = await Mosquitto.start();
  outsider = await mqtt.connectAsync(mosq.url, { clientId: 'outsider', reconnectPeriod: 0 });
  outsider.on('message', (topic, payload) => captured.push({ topic, payload: Buffer.from(payload) }));
  await outsider.subscribeAsync('#', { qos: 1 });
});
after(async () => {
  await outsider.endAsync();
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

const agentOpts = (id: string, fleet: string) => testAgentOptions({ url: mosq.url, stateRoot: path.join(work, 'agents'), trustedKey: key.publicKey }, id, fleet, { allowPlaintext: false });

/** Needles an outsider must never see: the config text and the first 64 bytes of the weights. */
async function needles(dir: string): Promise<Buffer[]> {
  const cfg = await fs.readFile(path.join(dir, 'adapter_config.json'));
  const st = (await fs.readFile(path.join(dir, 'adapter_model.safetensors'))).subarray(0, 64);
  // Control: the needles are in the plaintext pack, so a transfer in clear would be caught.
  const pack = await packAdapterDir(dir);
  assert.ok(pack.includes(cfg) && pack.includes(st), 'the needles occur in the plaintext pack');
  return [cfg, st];
}
function leaks(ns: Buffer[]): string[] {
  return captured.filter((c) => ns.some((n) => c.payload.includes(n))).map((c) => c.topic);
}

async function enrollFromHub(hub: Hub, storeDir: string, id: string): Promise<void> {
  await waitFor(`${id}'s status with its key at the hub`, () => hub.devices.get(id)?.encKey != null);
  await enroll(storeDir, enrolmentFromStatus(hub.devices.get(id) as Status));
}

test('outsider, unenrolled and removed devices: only enrolled recipients can read a publication', async () => {
  const storeDir = path.join(work, 'store');
  const hub = new Hub({ broker: { url: mosq.url }, storeDir, key, encKey: hubEnc, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const [e1, e2, e3] = ['e1', 'e2', 'e3'].map((id) => new Agent(agentOpts(id, 'fs'))) as [Agent, Agent, Agent];
  try {
    await Promise.all([e1, e2, e3].map((a) => a.start()));
    await enrollFromHub(hub, storeDir, 'e1');
    await enrollFromHub(hub, storeDir, 'e2');
    await waitFor('e3 seen', () => hub.devices.get('e3')?.encKey != null);

    const src = await makeAdapter(path.join(work, 'src', 'v1'), { seed: 1 });
    const ns = await needles(src);
    const plainSha = createHash('sha256').update(await packAdapterDir(src)).digest('hex');
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fs' }, 'private');
    assert.ok(m.enc, 'the manifest is sealed');
    assert.deepEqual(m.enc.recipients.map((r) => r.keyId).sort(), [e1.encKey?.keyId, e2.encKey?.keyId].sort());
    assert.notEqual(m.blob.sha256, plainSha, 'blob.sha256 covers the ciphertext');
    await waitFor('e1 and e2 active', () => e1.active?.sha256 === plainSha && e2.active?.sha256 === plainSha);
    for (const a of [e1, e2]) assert.deepEqual(await dirDigest(a.activeDir as string), await dirDigest(src), `${a.deviceId} installed it byte-identical`);
    await waitFor('e3 reports why', () => /not one of them/.test(e3.status().lastError?.reason ?? ''));
    assert.equal(e3.active, null, 'the unenrolled device installed nothing');
    assert.equal(e3.installedAdapters.length, 0);
    assert.match(e3.status().lastError?.reason ?? '', /enrol it on the hub/);
    // The retained status says so too (what `fleet status` shows).
    await waitFor('e3 retained status carries the reason', () => /not one of them/.test(hub.devices.get('e3')?.lastError?.reason ?? ''));

    const chunkBytes = captured.filter((c) => c.topic === topics.chunk({ kind: 'fleet', name: 'fs' })).reduce((s, c) => s + c.payload.length, 0);
    assert.ok(chunkBytes >= m.blob.size, `the outsider captured the chunks (${chunkBytes} bytes of a ${m.blob.size}-byte blob)`);
    assert.deepEqual(leaks(ns), [], 'no captured payload holds adapter_config.json or the first 64 bytes of the safetensors');

    // e2 is removed from the fleet: the next publication leaves it out.
    assert.equal(await unenroll(storeDir, 'e2'), true);
    const src2 = await makeAdapter(path.join(work, 'src', 'v2'), { seed: 2 });
    const ns2 = await needles(src2);
    const plain2 = createHash('sha256').update(await packAdapterDir(src2)).digest('hex');
    const m2 = await hub.publishDir(src2, { kind: 'fleet', name: 'fs' }, 'private');
    assert.deepEqual(m2.enc?.recipients.map((r) => r.keyId), [e1.encKey?.keyId]);
    await waitFor('e1 active on v2', () => e1.active?.sha256 === plain2);
    await waitFor('e2 refuses v2', () => /private v2 is sealed for 1 enrolled device\(s\) and this device's key .* is not one of them/.test(e2.status().lastError?.reason ?? ''));
    assert.equal(e2.active?.sha256, plainSha, 'e2 still runs v1 and never got v2');
    assert.ok(!e2.installedAdapters.some((i) => i.sha256 === plain2));
    assert.deepEqual(leaks(ns2), [], 'v2 did not leak either');
  } finally {
    await Promise.all([e1, e2, e3].map((a) => a.stop()));
    await hub.stop();
  }
});

test('a sealed upload carries no plaintext on the wire; the hub stores the exact adapter', async () => {
  const storeDir = path.join(work, 'store-up');
  const hub = new Hub({ broker: { url: mosq.url }, storeDir, key, encKey: hubEnc, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const u1 = new Agent({ ...agentOpts('u1', 'fu'), uploadSegmentSize: 4096 });
  try {
    await u1.start();
    const mine = await makeAdapter(path.join(work, 'src', 'personal'), { seed: 7 });
    const ns = await needles(mine);
    const plain = await packAdapterDir(mine);
    const sha = await u1.uploadDir(mine, 'personal', { raw: hubEnc.raw, keyId: hubEnc.keyId });
    assert.equal(sha, createHash('sha256').update(plain).digest('hex'));
    assert.deepEqual(await hub.hubStore.readBlob(sha), plain, 'the hub stores the exact plaintext pack');
    const segs = captured.filter((c) => c.topic === topics.uploadSegment('u1'));
    assert.ok(segs.reduce((s, c) => s + c.payload.length, 0) >= plain.length, 'the outsider captured the segments');
    assert.deepEqual(leaks(ns), [], 'no captured payload holds the uploaded adapter');

    // Through a signed upload command, which carries the hub's X25519 key: enrol, publish, upload back.
    await enrollFromHub(hub, storeDir, 'u1');
    const src = await makeAdapter(path.join(work, 'src', 'fu'), { seed: 8 });
    await hub.publishDir(src, { kind: 'device', name: 'u1' }, 'fu');
    const pSha = createHash('sha256').update(await packAdapterDir(src)).digest('hex');
    await waitFor('u1 active', () => u1.active?.sha256 === pSha);
    const r = await hub.command('u1', 'upload');
    assert.equal(r.ok, true, r.error);
    assert.equal(r.uploaded, pSha);
    // Without any hub key an upload is refused rather than sent in clear.
    await assert.rejects(u1.uploadDir(mine, 'personal', undefined), /no hub X25519 key/);
  } finally {
    await u1.stop();
    await hub.stop();
  }
});

test('tampered wrapped key, nonce prefix or ciphertext is refused with a reason; nothing installs', async () => {
  // No hub on this fleet: the test plays a hub whose signing key signs tampered sealed manifests,
  // so the signature passes and only the AEAD layer can refuse them.
  const dev = new Agent(agentOpts('t1', 'ft'));
  const pub = await Link.open({ url: mosq.url }, { clientId: 'fake-hub' });
  const target: Target = { kind: 'device', name: 't1' };
  let seq = 1000;
  try {
    await dev.start();
    await pub.waitConnected();
    const src = await makeAdapter(path.join(work, 'src', 'tamper'), { seed: 11 });
    const plain = await packAdapterDir(src);
    const me = dev.encKey;
    assert.ok(me);
    const send = async (mutate: { wrapped?: boolean; noncePrefix?: boolean; chunk?: boolean; resign?: boolean; deliver?: boolean }, done: () => boolean = () => dev.counters.rejected > before) => {
      const s = sealBlob(plain, 2048 - 16, [me.raw]);
      const data = Buffer.from(s.data);
      if (mutate.chunk) data[3 * s.chunkSize + 9]! ^= 0x01; // one bit of chunk 3's ciphertext
      const chunkSha256 = Array.from({ length: s.chunks }, (_, i) => createHash('sha256').update(data.subarray(i * s.chunkSize, (i + 1) * s.chunkSize)).digest('hex'));
      const r = s.recipients[0]!;
      const wrapped = Buffer.from(r.wrapped);
      if (mutate.wrapped) wrapped[20]! ^= 0x04;
      const np = Buffer.from(s.noncePrefix);
      if (mutate.noncePrefix) np[2]! ^= 0x01;
      const body: ManifestBody = {
        type: 'manifest', v: PROTOCOL_VERSION, seq: ++seq, target, adapter: { id: 'tamper', version: seq },
        blob: { format: PACK_FORMAT, sha256: createHash('sha256').update(data).digest('hex'), size: data.length, chunkSize: s.chunkSize, chunks: s.chunks, chunkSha256 },
        baseFingerprint: BASE_FP, lora: { rank: 4, alpha: 8, targets: ['q_proj', 'v_proj'] }, createdAt: new Date().toISOString(), keyId: key.keyId,
        enc: { alg: ENC_ALG_V1, noncePrefix: np.toString('base64'), recipients: [{ keyId: r.keyId, epk: r.epk.toString('base64'), wrapped: wrapped.toString('base64') }] },
      };
      const signed = signMessage(body, key);
      // Without re-signing, the tampered manifest must fail its signature.
      const msg = mutate.resign === false ? { ...signed, enc: { ...signed.enc, noncePrefix: Buffer.alloc(8, 7).toString('base64') } } : signed;
      await pub.publish(topics.manifest(target), Buffer.from(JSON.stringify(msg)), { retain: true });
      if (!mutate.chunk && !mutate.deliver) return waitFor('a refusal', done);
      await waitFor('t1 downloading', () => dev.status().transfer?.seq === seq);
      for (let i = 0; i < s.chunks; i++) await pub.publish(topics.chunk(target), encodeChunk(body.blob.sha256, i, s.chunks, data.subarray(i * s.chunkSize, (i + 1) * s.chunkSize)));
      return waitFor('the outcome', done);
    };
    let before = 0;
    const mark = () => (before = dev.counters.rejected);
    mark();
    await send({ wrapped: true });
    assert.match(dev.status().lastError?.reason ?? '', /manifest refused: adapter tamper v\d+: the wrapped content key for key .* does not authenticate/);
    mark();
    await send({ noncePrefix: true });
    assert.match(dev.status().lastError?.reason ?? '', /does not authenticate/);
    mark();
    await send({ noncePrefix: true, resign: false });
    assert.match(dev.status().lastError?.reason ?? '', /manifest refused: bad signature/);
    mark();
    await send({ chunk: true });
    assert.match(dev.status().lastError?.reason ?? '', /refused after download: chunk 3 of \d+ does not decrypt.*nothing installed/);
    assert.equal(dev.installedAdapters.length, 0, 'nothing was installed');
    assert.equal(dev.active, null);
    assert.deepEqual(await fs.readdir(path.join(work, 'agents', 't1', 'adapters')), []);
    // The same construction untampered installs: the refusals above were the tampering's.
    const plainSha = createHash('sha256').update(plain).digest('hex');
    await send({ deliver: true }, () => dev.active?.sha256 === plainSha);
  } finally {
    await pub.publish(topics.manifest(target), Buffer.alloc(0), { retain: true }).catch(() => undefined);
    await pub.close();
    await dev.stop();
  }
});

test('an agent SIGKILLed mid-download resumes a sealed transfer', async () => {
  const storeDir = path.join(work, 'store-kill');
  const hub = new Hub({ broker: { url: mosq.url }, storeDir, key, encKey: hubEnc, chunkSize: 1024, coalesceMs: 50, rateBytesPerSec: 8 * 1024 });
  await hub.start();
  const keyFiles = await writeKeyPair(path.join(work, 'hubkey'), key);
  const state = path.join(work, 'agents', 'k1');
  const spawnAgent = (): { proc: ChildProcess; log: () => string } => {
    let log = '';
    const proc = spawn(
      process.execPath,
      ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), 'agent', '--broker', mosq.url, '--device-id', 'k1', '--fleet', 'fk', '--state', state, '--trust', keyFiles.pubFile, '--quiet-ms', '300', '--status-interval-ms', '50'],
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
    const st = await fs.stat(path.join(state, 'device.x25519.key'));
    assert.equal(st.mode & 0o777, 0o600, 'the device private key is mode 0600');
    await enrollFromHub(hub, storeDir, 'k1');
    const src = await makeAdapter(path.join(work, 'src', 'kill'), { seed: 61 });
    const plainSha = createHash('sha256').update(await packAdapterDir(src)).digest('hex');
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fk' }, 'kill');
    assert.ok(m.enc);
    await waitFor('k1 holds 8+ chunks', () => (last?.transfer?.received ?? 0) >= 8, 30_000);
    const exited = new Promise((r) => child.proc.once('exit', r));
    child.proc.kill('SIGKILL');
    await exited;
    await waitFor('last will: k1 offline', () => last?.online === false, 10_000);
    assert.ok((last as Status | null)?.encKey, 'the last will still announces the key');
    assert.deepEqual(await fs.readdir(path.join(state, 'adapters')), [], 'nothing was installed before the kill');
    child = spawnAgent();
    await waitFor('k1 active after restart', () => last?.active?.sha256 === plainSha, 60_000);
    const resumed = /resuming kill v1: (\d+)\/(\d+) chunks held/.exec(child.log());
    assert.ok(resumed, `the restarted agent resumed (log: ${child.log()})`);
    assert.ok(Number(resumed[1]) >= 1, `it kept the chunks it had (${resumed[1]}/${resumed[2]})`);
    const dirs = await fs.readdir(path.join(state, 'adapters'));
    assert.equal(dirs.length, 1);
    assert.deepEqual(await dirDigest(path.join(state, 'adapters', dirs[0] ?? '')), await dirDigest(src));
  } finally {
    child.proc.kill('SIGTERM');
    await watcher.close();
    await hub.stop();
  }
});

function cli(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const kill = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('exit', (code) => {
      clearTimeout(kill);
      resolve({ code, stdout, stderr });
    });
  });
}

test('fleet enroll records the announced key (checked against --expect-key-id); fleet status shows unenrolled and changed keys', async () => {
  const store = path.join(work, 'store-cli');
  const c1 = new Agent(agentOpts('c1', 'fc'));
  const c2 = new Agent(agentOpts('c2', 'fc'));
  const fake = await Link.open({ url: mosq.url }, { clientId: 'fake-c1' });
  try {
    await Promise.all([c1.start(), c2.start()]);
    const c1Key = c1.encKey?.keyId as string;
    const wrong = await cli(['fleet', 'enroll', 'c1', '--store', store, '--broker', mosq.url, '--expect-key-id', '0123456789abcdef']);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /announces key [0-9a-f]{16}, not 0123456789abcdef/);
    const ok = await cli(['fleet', 'enroll', 'c1', '--store', store, '--broker', mosq.url, '--expect-key-id', c1Key]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, new RegExp(`enrolled c1 in fleet fc with X25519 key ${c1Key}`));
    const st = await cli(['fleet', 'status', '--broker', mosq.url, '--store', store, '--json']);
    assert.equal(st.code, 0, st.stderr);
    const keys = (JSON.parse(st.stdout) as { keys: Record<string, string> }).keys;
    assert.deepEqual({ c1: keys.c1, c2: keys.c2 }, { c1: 'enrolled', c2: 'unenrolled' });
    // c1's agent is replaced by something announcing another key under its id.
    await c1.stop();
    const other = generateEncKey();
    await fake.waitConnected();
    await fake.publish(topics.status('c1'), Buffer.from(JSON.stringify({ type: 'status', v: 1, deviceId: 'c1', online: true, state: 'idle', fleet: 'fc', encKey: { alg: 'x25519', keyId: other.keyId, pub: other.raw.toString('base64') } })), { retain: true });
    const st2 = await cli(['fleet', 'status', '--broker', mosq.url, '--store', store]);
    assert.equal(st2.code, 0, st2.stderr);
    assert.match(st2.stdout, new RegExp(`c1 .*CHANGED ${other.keyId}`));
    assert.match(st2.stdout, /c2 .*UNENROLLED [0-9a-f]{16}/);
  } finally {
    await fake.publish(topics.status('c1'), Buffer.alloc(0), { retain: true }).catch(() => undefined);
    await fake.close();
    await Promise.all([c1.stop(), c2.stop()]);
  }
});
