// Fleet sync on a real clustered broker: a 3-node NATS cluster (MQTT 3.1.1, retained messages in
// replicated JetStream). The hub sits on node 1, devices on nodes 2 and 3: a rollout across nodes,
// a late joiner on another node, and the node a device is connected to killed mid-transfer (the
// device fails over to the next URL, resubscribes and completes).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent, type AgentOptions } from '../../src/sync/agent/agent.ts';
import { Hub, type HubOptions } from '../../src/sync/hub/hub.ts';
import { generateSigningKey } from '../../src/sync/protocol/signing.ts';
import { NatsCluster, dirDigest, makeAdapter, testAgentOptions, tmpDir, waitFor, type NatsNode } from './helpers.ts';

const key = generateSigningKey();
let nats: NatsCluster;
let n1: NatsNode, n2: NatsNode, n3: NatsNode;
const work = tmpDir('nats-sync');

before(async () => {
  nats = await NatsCluster.start(3);
  [n1, n2, n3] = nats.nodes as [NatsNode, NatsNode, NatsNode];
});
after(async () => {
  await nats.stop();
  await fs.rm(work, { recursive: true, force: true });
});

const agentOpts = (deviceId: string, fleet: string, urls: string[], extra: Partial<AgentOptions> = {}): AgentOptions =>
  testAgentOptions({ url: urls, stateRoot: path.join(work, 'agents'), trustedKey: key.publicKey }, deviceId, fleet, { quietMs: 400, maxRetryMs: 2000, ...extra });

async function startHub(store: string, extra: Partial<HubOptions> = {}): Promise<Hub> {
  const hub = new Hub({ allowPlaintext: true, broker: { url: [n1.url, n2.url, n3.url], reconnectMs: 200 }, storeDir: path.join(work, store), key, chunkSize: 4096, coalesceMs: 100, ...(process.env.EDGELORA_TEST_LOG ? { log: (l: string) => process.stderr.write(`${new Date().toISOString()} ${l}\n`) } : {}), ...extra });
  await hub.start();
  return hub;
}

async function holds(a: Agent, sha: string, src: string): Promise<void> {
  await waitFor(`${a.deviceId} active ${sha.slice(0, 12)}`, () => a.active?.sha256 === sha, 60_000);
  assert.deepEqual(await dirDigest(a.activeDir ?? ''), await dirDigest(src), `${a.deviceId}: byte-identical adapter`);
}

test('NATS cluster: rollout from node 1 to devices on nodes 2 and 3, then a late joiner on node 3', async () => {
  const hub = await startHub('store-roll');
  const agents = [
    new Agent(agentOpts('na1', 'nf', [n2.url])),
    new Agent(agentOpts('na2', 'nf', [n2.url])),
    new Agent(agentOpts('na3', 'nf', [n3.url])),
  ];
  const late = new Agent(agentOpts('na4', 'nf', [n3.url]));
  try {
    await Promise.all(agents.map((a) => a.start()));
    const src = await makeAdapter(path.join(work, 'src', 'roll'), { seed: 21 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'nf' }, 'roll');
    assert.ok(m.blob.chunks > 4, `the adapter spans several chunks (${m.blob.chunks})`);
    for (const a of agents) await holds(a, m.blob.sha256, src);
    const unicastBefore = hub.stats.chunksUnicast;
    await late.start();
    await holds(late, m.blob.sha256, src);
    assert.ok(hub.stats.chunksUnicast - unicastBefore >= m.blob.chunks, `the late joiner on node 3 was served on its own topic (${hub.stats.chunksUnicast - unicastBefore} chunks)`);
  } finally {
    await Promise.all([...agents, late].map((a) => a.stop()));
    await hub.stop();
  }
});

test('NATS cluster: the node a device is connected to dies mid-transfer; the device fails over and completes', async () => {
  // ~66 KB at 40 KB/s: the transfer takes over a second, long enough to kill the node in the middle.
  const hub = await startHub('store-failover', { rateBytesPerSec: 40_000 });
  const mover = new Agent(agentOpts('nb1', 'nb', [n2.url, n3.url]));
  const stayer = new Agent(agentOpts('nb2', 'nb', [n3.url]));
  try {
    await Promise.all([mover.start(), stayer.start()]);
    const src = await makeAdapter(path.join(work, 'src', 'fo'), { seed: 22 });
    const m = await hub.publishDir(src, { kind: 'fleet', name: 'nb' }, 'fo');
    await waitFor('nb1 has part of the blob', () => mover.counters.chunksReceived >= 2, 30_000);
    const got = mover.counters.chunksReceived;
    assert.ok(got < m.blob.chunks, `the node dies mid-transfer (${got}/${m.blob.chunks} chunks held)`);
    await n2.kill();
    await holds(mover, m.blob.sha256, src);
    await holds(stayer, m.blob.sha256, src);
    assert.ok(mover.counters.reconnects >= 1, `nb1 reconnected (${mover.counters.reconnects})`);
    assert.equal(mover.brokerUrl, n3.url, 'nb1 now talks to node 3');
  } finally {
    await Promise.all([mover.stop(), stayer.stop()]);
    await hub.stop();
  }
});
