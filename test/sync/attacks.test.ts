// Bad input and attacks: each leaves the agent running with its active adapter unchanged and the
// reason in its status. Forged manifests (bad signature, another key), a manifest for another base
// model, malformed JSON and schema violations on every topic the agent listens to, oversize
// messages, forged commands. A last legitimate publish shows the agent still works.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Link } from '../../src/sync/transport/mqtt.ts';
import { generateSigningKey, signMessage } from '../../src/sync/protocol/signing.ts';
import { encodeChunk, stripSignature, type Manifest } from '../../src/sync/protocol/messages.ts';
import { topics, type Target } from '../../src/sync/protocol/topics.ts';
import { BASE_FP, Mosquitto, RecordingActivator, makeAdapter, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
const otherKey = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('attacks');

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

test('forged, foreign, malformed and oversize messages are refused with a reason', async () => {
  const hub = await new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: path.join(work, 'store'), key, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const agent = new Agent({
    broker: { url: mosq.url },
    deviceId: 'v1',
    fleet: 'fa',
    group: 'ga',
    stateDir: path.join(work, 'v1'),
    trustedKey: key.publicKey,
    modelFingerprint: BASE_FP,
    quietMs: 300,
    statusIntervalMs: 50,
    activator: new RecordingActivator(),
  });
  const attacker = await Link.open({ url: mosq.url }, { clientId: 'attacker' });
  // The agent's own retained status, as the operator sees it.
  const watcher = await Link.open({ url: mosq.url }, { clientId: 'watcher' });
  let retained = '';
  watcher.onMessage((t, p) => {
    if (t === topics.status('v1')) retained = p.toString();
  });
  try {
    await agent.start();
    await watcher.waitConnected();
    await watcher.subscribe([topics.status('v1')]);
    await attacker.waitConnected();
    const src = await makeAdapter(path.join(work, 'src', 'good'), { seed: 1 });
    const good = await hub.publishDir(src, { kind: 'fleet', name: 'fa' }, 'good');
    await waitFor('v1 active', () => agent.active?.sha256 === good.blob.sha256);
    const activations = (agent.activator as RecordingActivator).activations.length;

    const fleet: Target = { kind: 'fleet', name: 'fa' };
    const group: Target = { kind: 'group', name: 'ga' };
    const device: Target = { kind: 'device', name: 'v1' };
    /** Publishes `payload` on `topic` and waits until the agent refused it with a reason matching `re`. */
    const expectRefused = async (what: string, topic: string, payload: Buffer, re: RegExp) => {
      const before = agent.counters.rejected;
      await attacker.publish(topic, payload, { qos: 1 });
      await waitFor(`refusal of ${what}`, () => agent.counters.rejected > before);
      const st = agent.status();
      assert.match(st.lastError?.reason ?? '', re, `${what}: reason in status`);
      assert.equal(st.lastError?.topic, topic, `${what}: topic in status`);
      assert.equal(agent.active?.sha256, good.blob.sha256, `${what}: active adapter unchanged`);
      await waitFor(`${what}: reason in the retained status`, () => retained.includes(JSON.stringify(st.lastError?.reason).slice(1, -1)));
    };

    // Forged manifests.
    const body = stripSignature(good);
    const tampered: Manifest = { ...good, seq: good.seq + 10, adapter: { id: 'good', version: 99 } };
    await expectRefused('tampered manifest', topics.manifest(fleet), Buffer.from(JSON.stringify(tampered)), /bad signature/);
    const foreign = signMessage({ ...body, seq: good.seq + 11, keyId: otherKey.keyId }, otherKey);
    await expectRefused('manifest signed by another key', topics.manifest(fleet), Buffer.from(JSON.stringify(foreign)), /unknown key/);
    const impostor = signMessage({ ...body, seq: good.seq + 12 }, otherKey); // claims the hub's key id
    await expectRefused('manifest signed by another key under the hub key id', topics.manifest(group), Buffer.from(JSON.stringify(impostor)), /bad signature/);
    const misrouted = signMessage({ ...body, seq: good.seq + 13, target: { kind: 'device', name: 'someone-else' } }, key);
    await expectRefused('genuine manifest for another device', topics.manifest(device), Buffer.from(JSON.stringify(misrouted)), /is for device:someone-else/);

    // Malformed JSON and schema violations on every JSON topic the agent listens to.
    for (const t of [topics.manifest(fleet), topics.manifest(group), topics.manifest(device)]) {
      await expectRefused(`malformed JSON on ${t}`, t, Buffer.from('{"type": "manifest", '), /malformed JSON/);
      await expectRefused(`schema violation on ${t}`, t, Buffer.from(JSON.stringify({ type: 'manifest', v: 1, seq: -1 })), /schema violation/);
      await expectRefused(`wrong chunk count on ${t}`, t, Buffer.from(JSON.stringify({ ...good, blob: { ...good.blob, chunks: good.blob.chunks + 1 } })), /schema violation at blob/);
    }
    await expectRefused('malformed command', topics.command('v1'), Buffer.from('not json'), /malformed JSON/);
    await expectRefused('schema-violating command', topics.command('v1'), Buffer.from(JSON.stringify({ type: 'command', v: 1, id: 'x', action: 'format-disk' })), /schema violation/);
    await expectRefused('malformed upload ack', topics.uploadAck('v1'), Buffer.from('[1,2'), /malformed JSON/);
    await expectRefused('schema-violating upload ack', topics.uploadAck('v1'), Buffer.from(JSON.stringify({ type: 'upload-ack', v: 2 })), /schema violation/);
    // Binary chunk topics: frames that fail the format.
    for (const t of [topics.chunk(fleet), topics.chunk(group), topics.chunk(device)]) {
      await expectRefused(`short chunk on ${t}`, t, Buffer.from('garbage'), /shorter than the 44-byte header/);
      await expectRefused(`bad magic on ${t}`, t, Buffer.concat([Buffer.from('XXXX'), Buffer.alloc(60)]), /bad magic/);
    }
    // Oversize messages.
    await expectRefused('oversize manifest', topics.manifest(fleet), Buffer.from(JSON.stringify({ pad: 'x'.repeat(1536 * 1024) })), /oversize message/);
    await expectRefused('oversize chunk', topics.chunk(fleet), encodeChunk(good.blob.sha256, 0, good.blob.chunks, Buffer.alloc(17 * 1024 * 1024)), /oversize message/);

    // Forged commands.
    const cmd = { type: 'command', v: 1, id: 'evil-1', deviceId: 'v1', action: 'deactivate', issuedAt: new Date().toISOString(), keyId: key.keyId } as const;
    await expectRefused('command signed by another key', topics.command('v1'), Buffer.from(JSON.stringify(signMessage(cmd, otherKey))), /bad signature/);
    await expectRefused('genuine command for another device', topics.command('v1'), Buffer.from(JSON.stringify(signMessage({ ...cmd, deviceId: 'v2' }, key))), /addressed to v2/);

    // A genuine manifest for another base model (the hub publishes it; the device refuses it).
    const other = await makeAdapter(path.join(work, 'src', 'other-base'), { seed: 2, baseFingerprint: 'b'.repeat(64) });
    const before = agent.counters.rejected;
    await hub.publishDir(other, fleet, 'other');
    await waitFor('refusal of another base model', () => agent.counters.rejected > before);
    assert.match(agent.status().lastError?.reason ?? '', /is for base model b{64}, this device runs a{64}/);
    assert.equal(agent.active?.sha256, good.blob.sha256);

    assert.equal((agent.activator as RecordingActivator).activations.length, activations, 'no attack caused an activation');
    // Still alive: a legitimate publish to the device is installed.
    const src2 = await makeAdapter(path.join(work, 'src', 'good2'), { seed: 3 });
    const m2 = await hub.publishDir(src2, device, 'good2');
    await waitFor('v1 took the next genuine adapter', () => agent.active?.sha256 === m2.blob.sha256);
  } finally {
    await attacker.close();
    await watcher.close();
    await agent.stop();
    await hub.stop();
  }
});

test('activation failure rolls back to the last adapter that worked', async () => {
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: path.join(work, 'store-rb'), key, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const activator = new RecordingActivator();
  const agent = new Agent({ broker: { url: mosq.url }, deviceId: 'rb1', fleet: 'frb', stateDir: path.join(work, 'rb1'), trustedKey: key.publicKey, modelFingerprint: BASE_FP, quietMs: 300, activator });
  try {
    await agent.start();
    const a = await hub.publishDir(await makeAdapter(path.join(work, 'src', 'rb-a'), { seed: 5 }), { kind: 'fleet', name: 'frb' }, 'rb');
    await waitFor('rb1 active a', () => agent.active?.sha256 === a.blob.sha256);
    const srcB = await makeAdapter(path.join(work, 'src', 'rb-b'), { seed: 6 });
    const { packAdapterDir, sha256Hex } = await import('../../src/sync/transfer/pack.ts');
    activator.failFor.add(sha256Hex(await packAdapterDir(srcB)));
    const b = await hub.publishDir(srcB, { kind: 'fleet', name: 'frb' }, 'rb');
    await waitFor('activation failure reported', () => /activation of rb v2 .* failed/.test(agent.status().lastError?.reason ?? ''));
    assert.equal(agent.active?.sha256, a.blob.sha256, 'still on the adapter that worked');
    assert.ok(activator.active?.includes(a.blob.sha256.slice(0, 12)), 'the runtime has the old adapter loaded again');
    assert.match(agent.status().lastError?.reason ?? '', /rolled back to rb v1/);
    assert.ok(agent.installedAdapters.some((i) => i.sha256 === b.blob.sha256), 'the failed adapter stays installed for inspection');
  } finally {
    await agent.stop();
    await hub.stop();
  }
});
