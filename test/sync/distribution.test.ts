// Distribution against a real Mosquitto: a push to a fleet, a group and one device; a late joiner;
// an upload from a device published back to the fleet; and the same flow over MQTT 3.1.1 (aedes).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent, type AgentOptions } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Operator } from '../../src/sync/operator.ts';
import { generateSigningKey } from '../../src/sync/protocol/signing.ts';
import { startEmbeddedBroker } from '../../src/sync/transport/embedded-broker.ts';
import { BASE_FP, Mosquitto, RecordingActivator, dirDigest, digestKey, makeAdapter, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('dist');

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

function agentOpts(url: string, deviceId: string, extra: Partial<AgentOptions> = {}): AgentOptions {
  return {
    broker: { url, reconnectMs: 200 },
    deviceId,
    fleet: 'f1',
    stateDir: path.join(work, 'agents', deviceId),
    trustedKey: key.publicKey,
    modelFingerprint: BASE_FP,
    quietMs: 300,
    allowPlaintext: true,
    statusIntervalMs: 100,
    activator: new RecordingActivator(),
    ...extra,
  };
}

async function startHub(url: string, store: string): Promise<Hub> {
  const hub = new Hub({ allowPlaintext: true, broker: { url, reconnectMs: 200 }, storeDir: store, key, chunkSize: 2048, coalesceMs: 100 });
  await hub.start();
  return hub;
}

async function activeIs(agent: Agent, sha: string): Promise<void> {
  await waitFor(`${agent.deviceId} active ${sha.slice(0, 12)}`, () => agent.active?.sha256 === sha);
}

test('push to a fleet, a group and one device; late joiner; device upload published to the fleet', async () => {
  const hub = await startHub(mosq.url, path.join(work, 'store'));
  const agents = [
    new Agent(agentOpts(mosq.url, 'd1', { group: 'g1' })),
    new Agent(agentOpts(mosq.url, 'd2', { group: 'g1' })),
    new Agent(agentOpts(mosq.url, 'd3', { group: 'g2' })),
  ];
  try {
    await Promise.all(agents.map((a) => a.start()));
    const [d1, d2, d3] = agents as [Agent, Agent, Agent];

    // fleet
    const srcA = await makeAdapter(path.join(work, 'src', 'style-a'), { seed: 1 });
    const mA = await hub.publishDir(srcA, { kind: 'fleet', name: 'f1' }, 'style');
    await Promise.all(agents.map((a) => activeIs(a, mA.blob.sha256)));
    const wantA = await dirDigest(srcA);
    for (const a of agents) assert.deepEqual(await dirDigest(a.activeDir ?? ''), wantA, `${a.deviceId} holds a byte-identical adapter`);
    assert.ok(mA.blob.chunks > 8, `the test adapter spans several chunks (${mA.blob.chunks})`);

    // group g1 only
    const srcB = await makeAdapter(path.join(work, 'src', 'style-b'), { seed: 2 });
    const mB = await hub.publishDir(srcB, { kind: 'group', name: 'g1' }, 'style');
    await activeIs(d1, mB.blob.sha256);
    await activeIs(d2, mB.blob.sha256);
    assert.equal(mB.adapter.version, 2, 'new content under the same id gets the next version');
    assert.equal(d3.active?.sha256, mA.blob.sha256, 'd3 is not in g1 and keeps style v1');
    assert.equal(d1.previous?.sha256, mA.blob.sha256, 'the replaced adapter is kept as the rollback target');

    // one device
    const srcC = await makeAdapter(path.join(work, 'src', 'solo'), { seed: 3 });
    const mC = await hub.publishDir(srcC, { kind: 'device', name: 'd3' }, 'solo');
    await activeIs(d3, mC.blob.sha256);
    assert.equal(d1.active?.sha256, mB.blob.sha256);
    assert.equal(d2.active?.sha256, mB.blob.sha256);
    assert.deepEqual(await dirDigest(d3.activeDir ?? ''), await dirDigest(srcC));

    // late joiner: a new device in g1 gets the newest manifest among its fleet (seq 1) and group (seq 2)
    const late = new Agent(agentOpts(mosq.url, 'd4', { group: 'g1' }));
    agents.push(late);
    const before = hub.stats.chunksResent;
    await late.start();
    await activeIs(late, mB.blob.sha256);
    assert.deepEqual(await dirDigest(late.activeDir ?? ''), await dirDigest(srcB));
    assert.ok(hub.stats.chunksResent - before >= mB.blob.chunks, 'the late joiner was served by a resend of the chunks it asked for');

    // upload from d1 (its personalized adapter), then an operator publishes it to the fleet
    const personal = await makeAdapter(path.join(work, 'src', 'personal'), { seed: 4 });
    const sha = await d1.uploadDir(personal, 'd1-personal');
    const entry = hub.hubStore.getEntry(sha);
    assert.ok(entry, 'the hub stored the upload');
    assert.equal(entry.source, 'upload:d1');
    const op = await Operator.open({ broker: { url: mosq.url } });
    try {
      const reply = await op.publish(sha, { kind: 'fleet', name: 'f1' });
      assert.equal(reply.ok, true, reply.error);
      for (const a of agents) await activeIs(a, sha);
      const want = await dirDigest(personal);
      for (const a of agents) assert.deepEqual(await dirDigest(a.activeDir ?? ''), want, `${a.deviceId} holds the uploaded adapter`);

      // commands through the hub: rollback on d1, then activate by id
      const rb = await op.command('d1', 'rollback');
      assert.equal(rb.ok, true, rb.error);
      assert.equal(d1.active?.sha256, mB.blob.sha256, 'rollback restored the previous adapter');
      const act = await op.command('d1', 'activate', { id: 'd1-personal' });
      assert.equal(act.ok, true, act.error);
      assert.equal(d1.active?.sha256, sha);
      const bad = await op.command('d1', 'activate', { id: 'nope' });
      assert.equal(bad.ok, false);
      const snap = await op.fleetStatus(300);
      assert.deepEqual(snap.devices.map((d) => d.deviceId), ['d1', 'd2', 'd3', 'd4']);
      assert.ok(snap.devices.every((d) => d.online && d.active?.sha256 === sha));
    } finally {
      await op.close();
    }

    // nothing but complete, published adapters was ever activated
    const known = new Set([wantA, await dirDigest(srcB), await dirDigest(srcC), await dirDigest(personal)].map(digestKey));
    for (const a of agents) for (const d of (a.activator as RecordingActivator).activations) assert.ok(known.has(digestKey(d)), `${a.deviceId} activated an unexpected directory`);
  } finally {
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
});

test('hub store survives a restart: manifests, versions and seq carry on', async () => {
  const store = path.join(work, 'store2');
  let hub = await startHub(mosq.url, store);
  const a = new Agent(agentOpts(mosq.url, 'r1', { fleet: 'f2' }));
  try {
    await a.start();
    const src1 = await makeAdapter(path.join(work, 'src', 'r-1'), { seed: 11 });
    const m1 = await hub.publishDir(src1, { kind: 'fleet', name: 'f2' }, 'r');
    await activeIs(a, m1.blob.sha256);
    await hub.stop();
    hub = await startHub(mosq.url, store);
    const src2 = await makeAdapter(path.join(work, 'src', 'r-2'), { seed: 12 });
    const m2 = await hub.publishDir(src2, { kind: 'fleet', name: 'f2' }, 'r');
    assert.equal(m2.seq, m1.seq + 1);
    assert.equal(m2.adapter.version, 2);
    await activeIs(a, m2.blob.sha256);
  } finally {
    await a.stop();
    await hub.stop();
  }
});

test('MQTT 3.1.1: hub and agents over the embedded aedes broker', async () => {
  const broker = await startEmbeddedBroker(0);
  const hub = await startHub(broker.url, path.join(work, 'store3'));
  const agents = [new Agent(agentOpts(broker.url, 'e1', { fleet: 'fe' })), new Agent(agentOpts(broker.url, 'e2', { fleet: 'fe' }))];
  try {
    await Promise.all(agents.map((x) => x.start()));
    const src = await makeAdapter(path.join(work, 'src', 'e'), { seed: 21 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'fe' }, 'e');
    for (const x of agents) await activeIs(x, m.blob.sha256);
    for (const x of agents) assert.deepEqual(await dirDigest(x.activeDir ?? ''), await dirDigest(src));
    const sha = await agents[0]!.uploadDir(await makeAdapter(path.join(work, 'src', 'e-up'), { seed: 22 }), 'e-up');
    assert.ok(hub.hubStore.getEntry(sha));
  } finally {
    await Promise.all(agents.map((x) => x.stop()));
    await hub.stop();
    await broker.close();
  }
});
