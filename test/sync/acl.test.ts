// The shipped Mosquitto ACL (deploy/mosquitto/acl) with password authentication: the whole flow
// works through it (operator publish via the CLI, device upload, publication of the upload, fleet
// status via the CLI), and a device that tries to publish a fleet manifest, chunks, or another
// device's status is refused by the broker.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fs, statSync } from 'node:fs';
import path from 'node:path';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Link } from '../../src/sync/transport/mqtt.ts';
import { Operator } from '../../src/sync/operator.ts';
import { generateSigningKey, loadSigningKey, signMessage } from '../../src/sync/protocol/signing.ts';
import { encodeChunk, stripSignature, type Manifest } from '../../src/sync/protocol/messages.ts';
import { topics } from '../../src/sync/protocol/topics.ts';
import { BASE_FP, Mosquitto, REPO, RecordingActivator, dirDigest, makeAdapter, sleep, tmpDir, waitFor } from './helpers.ts';

const users = { hub: 'hub-secret', operator: 'op-secret', dev1: 'pw-1', dev2: 'pw-2' };
let mosq: Mosquitto;
const work = tmpDir('acl');

before(async () => {
  mosq = await Mosquitto.start({ aclFile: path.join(REPO, 'deploy/mosquitto/acl'), users });
});
after(async () => {
  await mosq.stop();
});

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), ...args], { cwd: REPO });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('exit', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

test('the flow works under the shipped ACL, and the ACL stops a device forging fleet traffic', async () => {
  const kg = await cli(['keygen', path.join(work, 'hub'), '--json']);
  assert.equal(kg.code, 0, kg.stderr);
  assert.equal(statSync(path.join(work, 'hub.key')).mode & 0o777, 0o600, 'private key is mode 0600');
  const key = await loadSigningKey(path.join(work, 'hub.key'));
  assert.equal((JSON.parse(kg.stdout) as { keyId: string }).keyId, key.keyId);

  const broker = (u: keyof typeof users) => ({ url: mosq.url, username: u, password: users[u], reconnectMs: 200 });
  const hub = new Hub({ allowPlaintext: true, broker: broker('hub'), storeDir: path.join(work, 'store'), key, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const agents = (['dev1', 'dev2'] as const).map(
    (id) => new Agent({ broker: broker(id), deviceId: id, fleet: 'fx', stateDir: path.join(work, id), trustedKey: key.publicKey, modelFingerprint: BASE_FP, quietMs: 300, allowPlaintext: true, activator: new RecordingActivator() }),
  );
  const [dev1, dev2] = agents as [Agent, Agent];
  let evil: Link | null = null;
  try {
    await Promise.all(agents.map((a) => a.start()));

    // Operator publishes a directory with the CLI (upload + publish request, as user "operator").
    const src = await makeAdapter(path.join(work, 'src', 'acl-a'), { seed: 7 });
    const pub = await cli(['publish', src, '--broker', mosq.url, '--username', 'operator', '--password', users.operator, '--to', 'fleet:fx', '--name', 'acl-a', '--json']);
    assert.equal(pub.code, 0, pub.stderr);
    const reply = JSON.parse(pub.stdout) as { ok: boolean; manifest: { sha256: string } };
    assert.equal(reply.ok, true);
    for (const a of agents) await waitFor(`${a.deviceId} active`, () => a.active?.sha256 === reply.manifest.sha256);
    for (const a of agents) assert.deepEqual(await dirDigest(a.activeDir ?? ''), await dirDigest(src));

    // dev1 uploads its adapter; the operator publishes the stored upload to the fleet.
    const personal = await makeAdapter(path.join(work, 'src', 'dev1-personal'), { seed: 8 });
    const sha = await dev1.uploadDir(personal, 'dev1-personal');
    const op = await Operator.open({ broker: broker('operator') });
    try {
      const r = await op.publish(sha.slice(0, 12), { kind: 'fleet', name: 'fx' });
      assert.equal(r.ok, true, r.error);
    } finally {
      await op.close();
    }
    for (const a of agents) await waitFor(`${a.deviceId} active upload`, () => a.active?.sha256 === sha);
    for (const a of agents) assert.deepEqual(await dirDigest(a.activeDir ?? ''), await dirDigest(personal));

    const st = await cli(['fleet', 'status', '--broker', mosq.url, '--username', 'operator', '--password', users.operator, '--json', '--wait-ms', '500']);
    assert.equal(st.code, 0, st.stderr);
    const snap = JSON.parse(st.stdout) as { hub: { online: boolean }; devices: { deviceId: string; active: { sha256: string } }[] };
    assert.equal(snap.hub.online, true);
    assert.deepEqual(snap.devices.map((d) => [d.deviceId, d.active.sha256]), [['dev1', sha], ['dev2', sha]]);

    // dev1's credentials, MQTT 5: forge a fleet manifest (retained), a fleet chunk, and dev2's status.
    evil = await Link.open({ ...broker('dev1'), protocolVersion: 5 }, { clientId: 'dev1-evil' });
    await evil.waitConnected();
    const current = hub.hubStore.target('fleet:fx') as Manifest;
    const forged = signMessage({ ...stripSignature(current), seq: current.seq + 100 }, generateSigningKey());
    const refusals: string[] = [];
    for (const [topic, payload, retain] of [
      [topics.manifest({ kind: 'fleet', name: 'fx' }), Buffer.from(JSON.stringify(forged)), true],
      [topics.chunk({ kind: 'fleet', name: 'fx' }), encodeChunk(current.blob.sha256, 0, current.blob.chunks, Buffer.alloc(10)), false],
      [topics.status('dev2'), Buffer.from('{"forged":true}'), true],
      [topics.command('dev2'), Buffer.from('{"forged":true}'), false],
    ] as const) {
      // Mosquitto answers a refused QoS 1 publish from an MQTT 5 client with PUBACK reason 0x87.
      await evil.publish(topic, payload, { qos: 1, retain }).then(
        () => refusals.push(`${topic}: accepted`),
        (err: Error) => refusals.push(`${topic}: ${err.message}`),
      );
    }
    assert.ok(refusals.every((r) => /Not authorized/i.test(r)), `every forged publish refused by the broker:\n${refusals.join('\n')}`);
    await sleep(300);
    assert.equal(dev2.counters.rejected, 0, 'dev2 never even saw the forgeries');
    // What the broker keeps retained for late joiners is still the hub's manifest.
    const reader = await Link.open(broker('operator'), { clientId: 'operator' });
    try {
      let seen: Buffer | null = null;
      reader.onMessage((t, p) => {
        if (t === topics.status('dev2')) seen = p;
      });
      await reader.waitConnected();
      await reader.subscribe([topics.status('dev2')]);
      await waitFor('dev2 retained status', () => seen !== null);
      assert.match(String(seen), /"deviceId":"dev2"/, 'dev2 status not overwritten');
    } finally {
      await reader.close();
    }
    const late = new Agent({ broker: { ...broker('dev2') }, deviceId: 'dev2', fleet: 'fx', stateDir: path.join(work, 'dev2-fresh'), trustedKey: key.publicKey, modelFingerprint: BASE_FP, quietMs: 300 });
    await dev2.stop();
    try {
      await late.start();
      await waitFor('a fresh dev2 installs the genuine retained manifest', () => late.active?.sha256 === sha);
      assert.equal(late.counters.rejected, 0);
    } finally {
      await late.stop();
    }

    // Anonymous clients are refused outright.
    const anon = await Link.open({ url: mosq.url, reconnectMs: 0 }, { clientId: 'anon' });
    await assert.rejects(anon.waitConnected(1500));
    await anon.close();
  } finally {
    await evil?.close();
    await Promise.all(agents.map((a) => a.stop()));
    await hub.stop();
  }
  await fs.rm(work, { recursive: true, force: true });
});
