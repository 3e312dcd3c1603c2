// What an operator meets against a real Mosquitto: commands that fail fast (refused connection,
// hub offline, unknown device) instead of hanging; `fleet command` rollback from the CLI; a blob
// re-published under a new name; a status with "group": null; and every refusal the hub documents.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent, type AgentOptions } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Link } from '../../src/sync/transport/mqtt.ts';
import { writeKeyPair, loadSigningKey } from '../../src/sync/protocol/signing.ts';
import { encodeJson, encodeSegment, PROTOCOL_VERSION } from '../../src/sync/protocol/messages.ts';
import { topics } from '../../src/sync/protocol/topics.ts';
import { Bitmap } from '../../src/sync/protocol/bitmap.ts';
import { Mosquitto, REPO, freePort, makeAdapter, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

let mosq: Mosquitto;
const work = tmpDir('operator');
let keyFile = '';

before(async () => {
  mosq = await Mosquitto.start();
  keyFile = (await writeKeyPair(path.join(work, 'hub'))).keyFile;
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

/** Runs the CLI; resolves with its exit code, output and how long it ran. */
function cli(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string; ms: number }> {
  return new Promise((resolve) => {
    const t0 = Date.now();
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const kill = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.once('exit', (code) => {
      clearTimeout(kill);
      resolve({ code, stdout, stderr, ms: Date.now() - t0 });
    });
  });
}

async function agentOpts(deviceId: string, fleet: string): Promise<AgentOptions> {
  return testAgentOptions({ url: mosq.url, stateRoot: path.join(work, 'agents'), trustedKey: (await loadSigningKey(keyFile)).publicKey }, deviceId, fleet, { statusIntervalMs: 100 });
}

/** An operator command's timeout in these tests; a fast failure must come well inside it. */
const OP_TIMEOUT_MS = 20_000;

test('a refused connection fails at once, naming the broker', async () => {
  const port = await freePort(); // nothing listens there
  const url = `mqtt://127.0.0.1:${port}`;
  for (const args of [['fleet', 'status'], ['publish', 'abcdef0123456789', '--to', 'fleet:x'], ['fleet', 'command', 'd1', 'rollback']]) {
    const r = await cli([...args, '--broker', url, '--timeout-ms', String(OP_TIMEOUT_MS)]);
    assert.notEqual(r.code, 0, `${args.join(' ')} exits non-zero`);
    assert.ok(r.ms < OP_TIMEOUT_MS / 2, `${args.join(' ')} failed in ${r.ms} ms, not after its ${OP_TIMEOUT_MS} ms timeout`);
    assert.match(r.stderr, new RegExp(`127\\.0\\.0\\.1:${port}`), `${args.join(' ')} names the broker: ${r.stderr}`);
    assert.match(r.stderr, /ECONNREFUSED/, r.stderr);
  }
});

test('publish and fleet command fail fast when the hub is offline; publish refuses an unknown device', async () => {
  const store = path.join(work, 'store-offline');
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: store, key: await loadSigningKey(keyFile) });
  await hub.start();
  await hub.stop(); // leaves the retained status "offline"
  const src = await makeAdapter(path.join(work, 'src', 'off'), { seed: 3 });
  for (const args of [['publish', src, '--to', 'fleet:x'], ['fleet', 'command', 'd1', 'rollback']]) {
    const r = await cli([...args, '--broker', mosq.url, '--timeout-ms', String(OP_TIMEOUT_MS)]);
    assert.notEqual(r.code, 0);
    assert.ok(r.ms < OP_TIMEOUT_MS / 2, `${args[0]} with the hub offline failed in ${r.ms} ms`);
    assert.match(r.stderr, /the hub is offline/, r.stderr);
    assert.match(r.stderr, /start `edgelora hub`/, r.stderr);
  }
  const r = await cli(['publish', src, '--to', 'device:nobody', '--broker', mosq.url, '--timeout-ms', String(OP_TIMEOUT_MS)]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /no device "nobody" has ever reported/, r.stderr);
  assert.match(r.stderr, /--force/, r.stderr);
});

test('fleet command rollback from the CLI; a blob re-published under a new name is reported under it', async () => {
  const key = await loadSigningKey(keyFile);
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, 'store-cmd'), key, chunkSize: 4096, coalesceMs: 50 });
  await hub.start();
  const agent = new Agent(await agentOpts('oc1', 'of'));
  try {
    await agent.start();
    const a = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'ca'), { seed: 4 }), { kind: 'fleet', name: 'of' }, 'ca');
    await waitFor('oc1 active ca', () => agent.active?.sha256 === a.blob.sha256);
    const b = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'cb'), { seed: 5 }), { kind: 'fleet', name: 'of' }, 'cb');
    await waitFor('oc1 active cb', () => agent.active?.sha256 === b.blob.sha256);

    const r = await cli(['fleet', 'command', 'oc1', 'rollback', '--broker', mosq.url, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const reply = JSON.parse(r.stdout) as { ok: boolean; result?: { active: { sha256: string } | null } };
    assert.equal(reply.ok, true);
    assert.equal(reply.result?.active?.sha256, a.blob.sha256, 'the result reports the rolled-back adapter');
    assert.equal(agent.active?.sha256, a.blob.sha256, 'the device runs the previous adapter again');
    const bad = await cli(['fleet', 'command', 'oc1', 'activate', '--adapter', 'nope', '--broker', mosq.url]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /no installed adapter nope/, bad.stderr);

    // The same bytes as cb, under a new name: acted on without a download, reported as "renamed".
    const received = agent.counters.chunksReceived;
    const m = await hub.publish(b.blob.sha256, { kind: 'fleet', name: 'of' }, 'renamed');
    await waitFor('oc1 active renamed', () => agent.active?.id === 'renamed');
    assert.equal(agent.active?.sha256, b.blob.sha256);
    assert.equal(agent.active?.version, m.adapter.version);
    assert.equal(agent.counters.chunksReceived, received, 'no chunk was downloaded again');
    await waitFor('fleet status shows the new name', () => hub.devices.get('oc1')?.active?.id === 'renamed');
  } finally {
    await agent.stop();
    await hub.stop();
  }
});

test('an upload command the hub never acknowledges does not hold back a download', async () => {
  const key = await loadSigningKey(keyFile);
  const hub = new Hub({ broker: { url: mosq.url, reconnectMs: 200 }, storeDir: path.join(work, 'store-upq'), key, chunkSize: 4096, coalesceMs: 50, allowPlaintext: true });
  await hub.start();
  // The hub's upload acks never reach this device: its upload waits (up to the uploader's deadline).
  const agent = new Agent({ ...(await agentOpts('uq1', 'uq')), inbound: (topic, payload, deliver) => (topic.endsWith('/up/ack') ? undefined : deliver(topic, payload)) });
  try {
    await agent.start();
    const a = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'uqa'), { seed: 7 }), { kind: 'fleet', name: 'uq' }, 'uqa');
    await waitFor('uq1 active uqa', () => agent.active?.sha256 === a.blob.sha256);
    const pending = hub.command('uq1', 'upload', undefined, 60_000).catch((err: unknown) => err);
    await waitFor('uq1 uploading', () => agent.status().state === 'uploading');
    const b = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'uqb'), { seed: 8 }), { kind: 'fleet', name: 'uq' }, 'uqb');
    await waitFor('uq1 active uqb while its upload still waits', () => agent.active?.sha256 === b.blob.sha256, 20_000);
    await agent.stop(); // aborts the upload
    await hub.stop();
    // The stopped agent answers its upload as aborted (or the hub stops before the answer arrives).
    const end = await pending;
    const said = end instanceof Error ? end.message : JSON.stringify(end);
    assert.match(said, /"ok":false.*upload of uqa aborted|hub stopped before device uq1 answered/, said);
  } finally {
    await agent.stop();
    await hub.stop();
  }
});

test('a status with "group": null counts as a device without a group', async () => {
  const link = await Link.open({ url: mosq.url }, { clientId: 'nullgroup' });
  try {
    await link.waitConnected();
    const st = { type: 'status', v: PROTOCOL_VERSION, deviceId: 'ng1', online: true, state: 'idle', fleet: 'f', group: null, updatedAt: new Date().toISOString() };
    await link.publish(topics.status('ng1'), encodeJson(st), { retain: true });
    const r = await cli(['fleet', 'status', '--broker', mosq.url, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const snap = JSON.parse(r.stdout) as { devices: { deviceId: string }[]; invalid: Record<string, string> };
    assert.ok(snap.devices.some((d) => d.deviceId === 'ng1'), `ng1 listed: ${r.stdout}`);
    assert.equal(snap.invalid.ng1, undefined);
  } finally {
    await link.publish(topics.status('ng1'), Buffer.alloc(0), { retain: true });
    await link.close();
  }
});

test('every refusal the hub documents is counted with its reason and topic, and reported in hub/status', async () => {
  const key = await loadSigningKey(keyFile);
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: path.join(work, 'store-refuse'), key, chunkSize: 1024, coalesceMs: 50 });
  await hub.start();
  const peer = await Link.open({ url: mosq.url }, { clientId: 'rf1' });
  try {
    await peer.waitConnected();
    const m = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'rf'), { seed: 6 }), { kind: 'fleet', name: 'rf' }, 'rf');
    const n = m.blob.chunks;
    const missing = (o: Record<string, unknown>) => encodeJson({ type: 'missing', v: PROTOCOL_VERSION, deviceId: 'rf1', target: m.target, sha256: m.blob.sha256, bitmap: Bitmap.full(n).toBase64(), ...o });
    const pastEnd = new Bitmap(Math.ceil(n / 8) * 8);
    pastEnd.set(Math.ceil(n / 8) * 8 - 1);
    const cases: [string, string, Buffer, RegExp][] = [
      ['malformed missing', topics.missing('rf1'), Buffer.from('{nope'), /missing request refused: malformed JSON/],
      ['missing for another device', topics.missing('rf1'), missing({ deviceId: 'rf2' }), /names device rf2, the topic rf1/],
      ['missing for an unknown target', topics.missing('rf1'), missing({ target: { kind: 'fleet', name: 'other' } }), /no adapter is published to fleet:other/],
      ['missing for an old blob', topics.missing('rf1'), missing({ sha256: 'b'.repeat(64) }), /is not fleet:rf's current blob/],
      ['bitmap with bits past the chunk count', topics.missing('rf1'), missing({ bitmap: Buffer.from(pastEnd.bytes).toString('base64') }), /no bit set past chunk/],
      ['bitmap of the wrong length', topics.missing('rf1'), missing({ bitmap: Buffer.alloc(Math.ceil(n / 8) + 1).toString('base64') }), /bitmap is not ceil/],
      ['status naming another device', topics.status('rf1'), encodeJson({ type: 'status', v: PROTOCOL_VERSION, deviceId: 'rf9', online: true, state: 'idle' }), /status refused: it names device rf9/],
      ['malformed result', topics.result('rf1'), encodeJson({ type: 'result' }), /result refused: schema violation/],
      ['upload init failing its schema', topics.uploadInit('rf1'), encodeJson({ type: 'upload-init', v: PROTOCOL_VERSION, sha256: 'x' }), /upload init refused: schema violation/],
      ['upload segment with a bad header', topics.uploadSegment('rf1'), Buffer.from('short'), /upload segment refused/],
      ['upload fin failing its schema', topics.uploadFin('rf1'), encodeJson({ type: 'upload-fin' }), /upload fin refused/],
    ];
    for (const [what, topic, payload, re] of cases) {
      const before = hub.refusals.count;
      await peer.publish(topic, payload);
      await waitFor(`hub refuses ${what}`, () => hub.refusals.count > before);
      assert.match(hub.refusals.last?.reason ?? '', re, `${what}: ${hub.refusals.last?.reason}`);
      assert.equal(hub.refusals.last?.topic, topic, what);
    }
    assert.equal(hub.stats.chunksResent, 0, 'no refused request was served');
    // A well-formed segment of an upload nobody started gets a negative ack, not silence.
    let ack = '';
    peer.onMessage((t, p) => {
      if (t === topics.uploadAck('rf1')) ack = p.toString();
    });
    await peer.subscribe([topics.uploadAck('rf1')]);
    await peer.publish(topics.uploadSegment('rf1'), encodeSegment('c'.repeat(64), 0, Buffer.alloc(10)));
    await waitFor('negative ack', () => ack.includes('unknown upload'));
    // hub/status carries the count within its 5 s throttle.
    let hubStatus = '';
    peer.onMessage((t, p) => {
      if (t === topics.hubStatus) hubStatus = p.toString();
    });
    await peer.subscribe([topics.hubStatus]);
    await waitFor('hub/status reports the refusals', () => (JSON.parse(hubStatus || '{}') as { refused?: number }).refused === cases.length, 10_000);
  } finally {
    await peer.close();
    await hub.stop();
  }
});
