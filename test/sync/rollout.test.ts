// Staged rollouts against a real Mosquitto with 10 light agents each (RecordingActivator, no
// model): stage order and boundaries, abort at the threshold, rollback on abort, a hub restart in
// the middle, --max-per-minute counted in publications (a fake clock, no timing), joiners that keep
// the previous adapter, and refused starts.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import mqtt from 'mqtt';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Rollouts } from '../../src/sync/hub/rollout.ts';
import { planStages, countDevices, type RolloutState } from '../../src/sync/hub/rollout-state.ts';
import { generateSigningKey, loadPublicKey, writeKeyPair } from '../../src/sync/protocol/signing.ts';
import { HubApi } from '../../src/sync/hub/api-client.ts';
import { spawn } from 'node:child_process';
import { packAdapterDir, sha256Hex } from '../../src/sync/transfer/pack.ts';
import { Mosquitto, REPO, RecordingActivator, makeAdapter, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('rollout');

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

interface Fleet {
  hub: Hub;
  agents: Agent[];
  store: string;
  shaA: string;
  shaB: string;
  dirB: string;
  fleet: string;
  stop(): Promise<void>;
}

const activator = (a: Agent) => a.activator as RecordingActivator;

/** A hub, `n` agents of fleet `name` all running adapter A (published to the fleet), and adapter B stored. */
async function fleetOn(name: string, n = 10, failB: (id: string) => boolean = () => false): Promise<Fleet> {
  const store = path.join(work, name, 'store');
  const hub = new Hub({ broker: { url: mosq.url, reconnectMs: 200 }, storeDir: store, key, chunkSize: 2048, coalesceMs: 50, allowPlaintext: true });
  await hub.start();
  const dirA = await makeAdapter(path.join(work, name, 'A'), { seed: 1, layers: 2 });
  const dirB = await makeAdapter(path.join(work, name, 'B'), { seed: 2, layers: 2 });
  const shaB = sha256Hex(await packAdapterDir(dirB));
  const agents = Array.from({ length: n }, (_, i) => {
    const id = `${name}-d${i}`;
    const a = new Agent(testAgentOptions({ url: mosq.url, stateRoot: path.join(work, name, 'agents'), trustedKey: key.publicKey }, id, name));
    if (failB(id)) activator(a).failFor.add(shaB);
    return a;
  });
  await Promise.all(agents.map((a) => a.start()));
  const mA = await hub.publishDir(dirA, { kind: 'fleet', name }, 'chat');
  await waitFor('every agent on A', () => agents.every((a) => a.active?.sha256 === mA.blob.sha256));
  await hub.hubStore.putBlob(await packAdapterDir(dirB), { name: 'chat', source: 'publish' });
  await waitFor('the hub knows every device on A', () => agents.every((a) => hub.devices.get(a.deviceId)?.active?.sha256 === mA.blob.sha256));
  return {
    hub, agents, store, shaA: mA.blob.sha256, shaB, dirB, fleet: name,
    async stop() {
      await Promise.all(agents.map((a) => a.stop()));
      await hub.stop();
    },
  };
}

/** Records, in broker order, every rollout publication to a device target and every device status. */
async function sniff(sha: string) {
  const c = await mqtt.connectAsync(mosq.url, { clientId: `sniff-${Math.random().toString(36).slice(2)}` });
  const log: { kind: 'pub' | 'active'; device: string }[] = [];
  c.on('message', (topic, payload, packet) => {
    const parts = topic.split('/');
    if (parts[2] === 't' && parts[3] === 'device' && !packet.retain) {
      const m = JSON.parse(payload.toString()) as { blob: { sha256: string } };
      if (m.blob.sha256 === sha) log.push({ kind: 'pub', device: parts[4]! });
    } else if (parts[2] === 'dev' && payload.length > 0) {
      const s = JSON.parse(payload.toString()) as { active?: { sha256: string } | null };
      if (s.active?.sha256 === sha && !log.some((e) => e.kind === 'active' && e.device === parts[3])) log.push({ kind: 'active', device: parts[3]! });
    }
  });
  await c.subscribeAsync(['edgelora/v1/t/device/+/manifest', 'edgelora/v1/dev/+/status'], { qos: 1 });
  return { log, close: () => c.endAsync() };
}

const waitStatus = (r: Rollouts, id: string, status: RolloutState['status'], ms = 30_000) => waitFor(`rollout ${id} ${status}`, () => r.get(id).status === status, ms);

test('a rollout over 10 agents in 3 stages completes in order; no stage starts before the last one succeeded', async () => {
  const f = await fleetOn('st');
  const sn = await sniff(f.shaB);
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store });
  await rollouts.open();
  try {
    const st = await rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'percent', values: [30, 60, 100] }, abortMin: 1, abortThreshold: 0.1 });
    assert.deepEqual(st.plan.map((s) => s.length), [3, 3, 4]);
    assert.deepEqual(st.plan, planStages(f.agents.map((a) => a.deviceId), f.shaB, { kind: 'percent', values: [30, 60, 100] }), 'the plan is the deterministic one');
    await waitStatus(rollouts, st.id, 'succeeded');
    await waitFor('every agent on B', () => f.agents.every((a) => a.active?.sha256 === f.shaB));
    const stageOf = new Map(st.plan.flatMap((ids, i) => ids.map((d) => [d, i] as const)));
    // Boundaries: each publication to a stage-k device comes after every stage-(k-1) device reported B active.
    for (const [i, e] of sn.log.entries()) {
      if (e.kind !== 'pub') continue;
      const k = stageOf.get(e.device)!;
      if (k === 0) continue;
      const before = new Set(sn.log.slice(0, i).filter((x) => x.kind === 'active').map((x) => x.device));
      for (const d of st.plan[k - 1]!) assert.ok(before.has(d), `stage ${k + 1} device ${e.device} was sent B before stage ${k} device ${d} had activated it`);
    }
    assert.equal(sn.log.filter((e) => e.kind === 'pub').length, 10, 'one publication per device');
    const final = rollouts.get(st.id);
    assert.equal(final.fleetPublished, true);
    assert.equal(f.hub.hubStore.target(`fleet:${f.fleet}`)?.blob.sha256, f.shaB, 'the fleet target names B at the end');
    const kinds = final.events.map((e) => e.kind).filter((k) => k.startsWith('stage') || k === 'succeeded');
    assert.deepEqual(kinds, ['stage-done', 'stage-started', 'stage-done', 'stage-started', 'stage-done', 'succeeded']);
  } finally {
    await sn.close();
    await rollouts.close();
    await f.stop();
  }
});

/** Device ids that fail B's activation, per fleet (set once B's plan is known). */
const failSet = new Map<string, Set<string>>();

async function abortCase(name: string, rollbackOnAbort: boolean) {
  // The plan depends on B's sha256, known once B is packed: pack it first with the same seed.
  const dirB = await makeAdapter(path.join(work, `${name}-probe`), { seed: 2, layers: 2 });
  const shaB = sha256Hex(await packAdapterDir(dirB));
  const ids = Array.from({ length: 10 }, (_, i) => `${name}-d${i}`);
  const plan = planStages(ids, shaB, { kind: 'size', size: 3 });
  failSet.set(name, new Set(plan[0]!.slice(0, 2)));
  const f = await fleetOn(name, 10, (id) => failSet.get(name)?.has(id) ?? false);
  assert.equal(f.shaB, shaB);
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store });
  await rollouts.open();
  const st = await rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'size', size: 3 }, abortThreshold: 0.5, abortMin: 3, rollbackOnAbort });
  assert.deepEqual(st.plan, plan);
  await waitStatus(rollouts, st.id, 'aborted');
  return { f, rollouts, st, plan };
}

test('abort: 2 of the first 3 devices fail activation; the rollout aborts at the threshold and the other 7 never install B', async () => {
  const { f, rollouts, st, plan } = await abortCase('ab', false);
  try {
    const final = rollouts.get(st.id);
    assert.match(final.reason ?? '', /2 of 3 devices with an outcome failed/);
    assert.equal(countDevices(final, 0).failed, 2);
    // Give the broker time to deliver anything that was (wrongly) sent, then check the devices themselves.
    await rollouts.tick();
    const inStage1 = new Set(plan[0]);
    for (const a of f.agents) {
      const hadB = a.installedAdapters.some((i) => i.sha256 === f.shaB);
      if (!inStage1.has(a.deviceId)) {
        assert.equal(hadB, false, `${a.deviceId} (not in stage 1) installed B`);
        assert.equal(a.active?.sha256, f.shaA, `${a.deviceId} still runs A`);
        assert.equal(final.devices[a.deviceId]!.state, 'pending');
      } else if (failSet.get('ab')!.has(a.deviceId)) {
        assert.equal(a.active?.sha256, f.shaA, `${a.deviceId} failed B and rolled itself back to A`);
        assert.equal(final.devices[a.deviceId]!.state, 'failed');
      } else {
        assert.equal(a.active?.sha256, f.shaB, `${a.deviceId} activated B and, without --rollback-on-abort, keeps it`);
      }
    }
    assert.equal(f.hub.hubStore.target(`fleet:${f.fleet}`)?.blob.sha256, f.shaA, 'the fleet target still names A');
  } finally {
    await rollouts.close();
    await f.stop();
  }
});

test('rollback on abort returns the failed stage to the previous adapter', async () => {
  const { f, rollouts, st, plan } = await abortCase('rb', true);
  try {
    await waitFor('every agent back on A', () => f.agents.every((a) => a.active?.sha256 === f.shaA));
    const final = rollouts.get(st.id);
    const ok = plan[0]!.find((d) => !failSet.get('rb')!.has(d))!;
    assert.equal(final.devices[ok]!.state, 'rolled-back');
    const okAgent = f.agents.find((a) => a.deviceId === ok)!;
    assert.ok(okAgent.installedAdapters.some((i) => i.sha256 === f.shaB), 'the device had B before the rollback');
    assert.ok(final.events.some((e) => e.kind === 'rolled-back' && e.deviceId === ok));
  } finally {
    await rollouts.close();
    await f.stop();
  }
});

test('--max-per-minute: publications counted per rolling minute (fake clock); a joiner keeps A until 100%', async () => {
  const f = await fleetOn('rt');
  const sn = await sniff(f.shaB);
  let t = Date.parse('2026-12-01T12:00:00Z');
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store, now: () => new Date(t), tickMs: 0 });
  await rollouts.open();
  let joiner: Agent | null = null;
  const pubs = () => sn.log.filter((e) => e.kind === 'pub').length;
  try {
    const st = await rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'size', size: 10 }, maxPerMinute: 3, abortMin: 1 });
    const sentBy = (n: number) => waitFor(`${n} devices sent and activated`, () => countDevices(rollouts.get(st.id)).activated === n);
    for (let minute = 1; minute <= 3; minute++) {
      await sentBy(3 * minute);
      await rollouts.tick();
      t += 30_000; // half a minute later the window is still full
      await rollouts.tick();
      await new Promise((r) => setTimeout(r, 300)); // let any (wrong) extra publication reach the sniffer
      assert.equal(pubs(), 3 * minute, `minute ${minute}: ${pubs()} publications, at most ${3 * minute} allowed`);
      if (minute === 1) {
        joiner = new Agent(testAgentOptions({ url: mosq.url, stateRoot: path.join(work, 'rt', 'agents'), trustedKey: key.publicKey }, 'rt-joiner', f.fleet));
        await joiner.start();
        await waitFor('the joiner runs A', () => joiner!.active?.sha256 === f.shaA);
      }
      t += 30_001;
      await rollouts.tick();
    }
    await waitStatus(rollouts, st.id, 'succeeded');
    assert.equal(pubs(), 10);
    assert.equal(rollouts.get(st.id).devices['rt-joiner'], undefined, 'the joiner is not in the plan');
    await waitFor('the joiner gets B once the rollout reached 100%', () => joiner!.active?.sha256 === f.shaB);
  } finally {
    await joiner?.stop();
    await sn.close();
    await rollouts.close();
    await f.stop();
  }
});

test('hub restart mid-rollout: a new hub on the same store continues from the persisted state', async () => {
  const f = await fleetOn('hr');
  let t = Date.parse('2026-12-01T12:00:00Z');
  const now = () => new Date(t);
  let rollouts = new Rollouts({ hub: f.hub, storeDir: f.store, now, tickMs: 0 });
  await rollouts.open();
  let hub2: Hub | null = null;
  try {
    // 3 per minute, stages of 3: stage 2 must wait for the next minute; the hub stops in between.
    const st = await rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'percent', values: [30, 60, 100] }, maxPerMinute: 3, abortMin: 1 });
    await waitFor('stage 1 done, stage 2 waiting for the rate window', () => rollouts.get(st.id).stage === 1);
    await rollouts.tick(); // waits for the transition in progress to be saved
    const before = JSON.parse(await fs.readFile(path.join(f.store, 'rollouts', `${st.id}.json`), 'utf8')) as RolloutState;
    assert.equal(before.stage, 1);
    assert.equal(countDevices(before, 1).pending, 3);
    await rollouts.close();
    await f.hub.stop();

    t += 61_000;
    hub2 = new Hub({ broker: { url: mosq.url, reconnectMs: 200 }, storeDir: f.store, key, chunkSize: 2048, coalesceMs: 50, allowPlaintext: true });
    await hub2.start();
    await waitFor('the new hub has every status', () => f.agents.every((a) => hub2!.devices.has(a.deviceId)));
    rollouts = new Rollouts({ hub: hub2, storeDir: f.store, now, tickMs: 0 });
    await rollouts.open();
    const resumed = rollouts.get(st.id);
    assert.equal(resumed.stageStartedAt[0], before.stageStartedAt[0], 'the same rollout, from disk');
    for (let i = 0; i < 3 && rollouts.get(st.id).status === 'running'; i++) {
      await waitFor('this minute\'s devices activated', () => countDevices(rollouts.get(st.id)).sent === 0);
      t += 61_000;
      await rollouts.tick();
    }
    await waitStatus(rollouts, st.id, 'succeeded');
    await waitFor('every agent on B', () => f.agents.every((a) => a.active?.sha256 === f.shaB));
    const events = rollouts.get(st.id).events;
    assert.ok(events.findIndex((e) => e.kind === 'stage-done' && e.stage === 0) < events.findIndex((e) => e.kind === 'sent' && e.stage === 1), 'stage 2 sent only after stage 1, across the restart');
  } finally {
    await rollouts.close();
    await Promise.all(f.agents.map((a) => a.stop()));
    await hub2?.stop();
  }
});

test('bad starts are refused with a clear error: thresholds, unknown fleet, empty fleet, a running rollout', async () => {
  const f = await fleetOn('bad', 2);
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store, tickMs: 0 });
  await rollouts.open();
  try {
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: f.fleet, successThreshold: 1.5 }), /successThreshold.*(<=1|too big|1)/i);
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'percent', values: [50, 20, 100] } }), /must increase/);
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'percent', values: [10, 50] } }), /last stage must be 100%/);
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: 'nosuch' }), /unknown fleet nosuch/);
    await assert.rejects(rollouts.start({ adapter: 'ffffffffffff', fleet: f.fleet }), /no stored adapter ffffffffffff/);
    // A fleet that exists (published to) but whose devices are all offline.
    await f.hub.publish(f.shaA, { kind: 'fleet', name: 'gone' }, 'chat');
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: 'gone' }), /fleet gone has no online device/);
    const st = await rollouts.start({ adapter: f.shaB, fleet: f.fleet, stages: { kind: 'size', size: 1 }, maxPerMinute: 1 });
    await rollouts.pause(st.id);
    await assert.rejects(rollouts.start({ adapter: f.shaB, fleet: f.fleet }), new RegExp(`rollout ${st.id} is still paused on fleet bad`));
    await assert.rejects(rollouts.pause(st.id), /is paused, not running/);
    await rollouts.abort(st.id);
    assert.equal(rollouts.get(st.id).status, 'aborted');
    await assert.rejects(rollouts.resume(st.id), /is aborted, not paused/);
  } finally {
    await rollouts.close();
    await f.stop();
  }
});

test('a hub process SIGKILLed mid-rollout and started again on its store continues the rollout', async () => {
  const name = 'kill';
  const root = path.join(work, name);
  const { keyFile, pubFile } = await writeKeyPair(path.join(tmpDir('killkey'), 'hub'));
  const trusted = await loadPublicKey(pubFile);
  const store = path.join(root, 'store');
  const spawnHub = async () => {
    const p = spawn(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), 'hub', '--broker', mosq.url, '--store', store, '--key', keyFile, '--allow-plaintext', '--http', '127.0.0.1:0', '--chunk-size', '2048', '--quiet'], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    await waitFor('the hub serves HTTP', () => /"url":"([^"]+)"/.test(out) || p.exitCode !== null, 60_000);
    const url = /"url":"([^"]+)"/.exec(out)?.[1];
    return { p, url, err: () => err };
  };
  const agents = Array.from({ length: 6 }, (_, i) => new Agent(testAgentOptions({ url: mosq.url, stateRoot: path.join(root, 'agents'), trustedKey: trusted }, `${name}-d${i}`, name)));
  let hub = await spawnHub();
  let hub2: Awaited<ReturnType<typeof spawnHub>> | null = null;
  try {
    assert.ok(hub.url, hub.err());
    await Promise.all(agents.map((a) => a.start()));
    const api = new HubApi(hub.url!);
    await waitFor('the hub lists every device', async () => ((await api.request('GET', '/api/devices')) as { devices: unknown[] }).devices.length >= 6);
    const dirB = await makeAdapter(path.join(root, 'B'), { seed: 2, layers: 2 });
    const up = (await api.request('POST', '/api/adapters?name=chat', { bytes: await packAdapterDir(dirB) })) as { sha256: string };
    const st = (await api.request('POST', '/api/rollouts', { json: { adapter: up.sha256, fleet: name, stages: { kind: 'size', size: 2 }, abortMin: 1 } })) as RolloutState;
    hub.p.kill('SIGKILL');
    await new Promise((r) => hub.p.once('exit', r));
    const saved = JSON.parse(await fs.readFile(path.join(store, 'rollouts', `${st.id}.json`), 'utf8')) as RolloutState;
    assert.equal(saved.status, 'running', 'killed while running');
    assert.ok(countDevices(saved).pending > 0, 'killed before every device was sent the adapter');

    // The killed hub's store lock goes stale after 10 s: until then a new hub is refused.
    const deadline = Date.now() + 40_000;
    for (;;) {
      hub2 = await spawnHub();
      if (hub2.url) break;
      assert.ok(Date.now() < deadline, `no hub could take the store over: ${hub2.err()}`);
      await new Promise((r) => setTimeout(r, 2000));
    }
    const api2 = new HubApi(hub2.url!);
    await waitFor('the restarted hub completes the rollout', async () => ((await api2.request('GET', `/api/rollouts/${st.id}`)) as RolloutState).status === 'succeeded', 60_000);
    await waitFor('every agent on B', () => agents.every((a) => a.active?.sha256 === up.sha256));
    const final = (await api2.request('GET', `/api/rollouts/${st.id}`)) as RolloutState;
    assert.equal(final.createdAt, saved.createdAt, 'the same rollout, from its saved state');
    assert.ok(final.events.some((e) => e.kind === 'hub-started'), 'the restart is a logged transition');
  } finally {
    if (hub.p.exitCode === null) hub.p.kill('SIGKILL');
    if (hub2 && hub2.p.exitCode === null) {
      const gone = new Promise((r) => hub2!.p.once('exit', r));
      hub2.p.kill('SIGTERM');
      await gone;
    }
    await Promise.all(agents.map((a) => a.stop()));
  }
});
