// The hub's HTTP shell and dashboard: bind and token rules, `edgelora rollout` through the API
// (a real CLI process), and the dashboard in a real headless Chromium (Debian's, driven by
// playwright-core) during a rollout over 10 light agents: every device and its active adapter in
// the table, stage progress that updates without a reload, and a pause button that pauses.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs, existsSync } from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { chromium, type BrowserContext } from 'playwright-core';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { Rollouts } from '../../src/sync/hub/rollout.ts';
import { startHubHttp } from '../../src/sync/hub/http.ts';
import { countDevices } from '../../src/sync/hub/rollout-state.ts';
import { generateSigningKey } from '../../src/sync/protocol/signing.ts';
import { packAdapterDir, sha256Hex } from '../../src/sync/transfer/pack.ts';
import { Mosquitto, REPO, makeAdapter, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

const run = promisify(execFile);
const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('dash');
const CLI = path.join(REPO, 'src/cli/main.ts');
const TOKEN = 'tok-0123456789abcdef0123';

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, ['--import', 'tsx', CLI, ...args], { cwd: REPO, encoding: 'utf8' });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

async function fleet(name: string, n: number) {
  const store = path.join(work, name, 'store');
  const hub = new Hub({ broker: { url: mosq.url, reconnectMs: 200 }, storeDir: store, key, chunkSize: 2048, coalesceMs: 50, allowPlaintext: true });
  await hub.start();
  const dirA = await makeAdapter(path.join(work, name, 'A'), { seed: 1, layers: 2 });
  const dirB = await makeAdapter(path.join(work, name, 'chat-b'), { seed: 2, layers: 2 });
  const agents = Array.from({ length: n }, (_, i) => new Agent(testAgentOptions({ url: mosq.url, stateRoot: path.join(work, name, 'agents'), trustedKey: key.publicKey }, `${name}-d${i}`, name)));
  await Promise.all(agents.map((a) => a.start()));
  const mA = await hub.publishDir(dirA, { kind: 'fleet', name }, 'chat');
  await waitFor('every agent on A', () => agents.every((a) => hub.devices.get(a.deviceId)?.active?.sha256 === mA.blob.sha256));
  return { hub, agents, store, dirB, shaA: mA.blob.sha256, shaB: sha256Hex(await packAdapterDir(dirB)) };
}

test('hub --http: loopback without a token only; /api needs the token; `edgelora rollout` drives a rollout through it', async () => {
  const f = await fleet('api', 3);
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store });
  await rollouts.open();
  await assert.rejects(startHubHttp({ hub: f.hub, rollouts, host: '0.0.0.0', port: 0 }), /binding 0\.0\.0\.0 would expose the API beyond this machine without authentication/);
  const http = await startHubHttp({ hub: f.hub, rollouts, port: 0, tokens: [TOKEN] });
  const tokenFile = path.join(work, 'api', 'token');
  await fs.writeFile(tokenFile, `${TOKEN}\n`);
  try {
    assert.equal((await fetch(`${http.url}/api/rollouts`)).status, 401);
    assert.equal((await fetch(`${http.url}/api/rollouts`, { headers: { authorization: 'Bearer wrong-token-0000000000' } })).status, 401);
    assert.equal((await fetch(`${http.url}/api/rollouts`, { headers: { authorization: `Bearer ${TOKEN}` } })).status, 200);
    assert.equal((await fetch(`${http.url}/`)).status, 200, 'the static page holds no data and needs no token');
    const bad = await fetch(`${http.url}/api/rollouts`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify({ adapter: f.shaB, fleet: 'api', abortThreshold: 2 }) });
    assert.equal(bad.status, 400);
    assert.match(((await bad.json()) as { error: { message: string } }).error.message, /abortThreshold/);

    const base = ['--hub', http.url, '--token-file', tokenFile];
    const thr = await cli(['rollout', 'start', f.dirB, '--to', 'fleet:api', '--success-threshold', '150%', ...base]);
    assert.equal(thr.code, 1);
    assert.match(thr.stderr, /--success-threshold: must be a percentage from 0% to 100%/);
    const unknown = await cli(['rollout', 'start', f.dirB, '--to', 'fleet:nosuch', ...base]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /unknown fleet nosuch/);
    const noTok = await cli(['rollout', 'status', '--hub', http.url]);
    assert.equal(noTok.code, 1);
    assert.match(noTok.stderr, /missing token/);

    // One device a minute (the real clock): the rollout is still running when the next start comes.
    const started = await cli(['rollout', 'start', f.dirB, '--to', 'fleet:api', '--stage-size', '1', '--max-per-minute', '1', '--abort-min', '1', '--json', ...base]);
    assert.equal(started.code, 0, started.stderr);
    const st = JSON.parse(started.stdout) as { id: string; adapter: { sha256: string }; plan: string[][] };
    assert.equal(st.adapter.sha256, f.shaB, 'the directory was uploaded and rolled out');
    assert.equal(st.plan.length, 3);
    const again = await cli(['rollout', 'start', f.shaB.slice(0, 12), '--to', 'fleet:api', ...base]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, new RegExp(`rollout ${st.id} is still running on fleet api`));
    assert.equal((await cli(['rollout', 'pause', st.id, ...base])).code, 0);
    assert.equal(rollouts.get(st.id).status, 'paused');
    const resumed = await cli(['rollout', 'resume', st.id, '--json', ...base]);
    assert.equal((JSON.parse(resumed.stdout) as { status: string }).status, 'running');
    assert.equal((await cli(['rollout', 'abort', st.id, ...base])).code, 0);
    const status = await cli(['rollout', 'status', st.id, '--json', ...base]);
    assert.equal(status.code, 0, status.stderr);
    const s = JSON.parse(status.stdout) as { status: string; events: { kind: string }[] };
    assert.equal(s.status, 'aborted');
    const operatorKinds = new Set(['started', 'paused', 'resumed', 'aborted']);
    assert.deepEqual(s.events.map((e) => e.kind).filter((k) => operatorKinds.has(k)), ['started', 'paused', 'resumed', 'aborted'], 'every transition is in rollout status --json');
    assert.ok(s.events.some((e) => e.kind === 'sent'));
    const text = await cli(['rollout', 'status', ...base]);
    assert.match(text.stdout, new RegExp(`${st.id}  aborted  chat-b v1`));
  } finally {
    await http.close();
    await rollouts.close();
    await Promise.all(f.agents.map((a) => a.stop()));
    await f.hub.stop();
  }
});

const CHROMIUM = '/usr/bin/chromium';

test('dashboard in headless Chromium: every device and its adapter, live stage progress, pause through the API', { skip: existsSync(CHROMIUM) ? false : `${CHROMIUM} missing: apt-get install chromium (.ci/run does)` }, async () => {
  const f = await fleet('ui', 10);
  let t = Date.parse('2026-12-01T12:00:00Z');
  await f.hub.hubStore.putBlob(await packAdapterDir(f.dirB), { name: 'chat', source: 'publish' });
  const rollouts = new Rollouts({ hub: f.hub, storeDir: f.store, now: () => new Date(t), tickMs: 0 });
  await rollouts.open();
  const http = await startHubHttp({ hub: f.hub, rollouts, port: 0, tokens: [TOKEN] });
  const userDir = tmpDir('chromium');
  let browser: BrowserContext | null = null;
  try {
    // 3 devices a minute, stages of 3: stage 2 starts only when the test moves the clock on.
    const st = await rollouts.start({ adapter: f.shaB, fleet: 'ui', stages: { kind: 'size', size: 3 }, maxPerMinute: 3, abortMin: 1 });
    browser = await chromium.launchPersistentContext(userDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      viewport: { width: 1280, height: 900 },
    });
    const page = await browser.newPage();
    const pageErrors: string[] = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    await page.goto(`${http.url}/#token=${TOKEN}`);
    await page.evaluate(() => Object.assign(globalThis, { notReloaded: true }));

    const tableMatchesFleet = async () => {
      const rows = await page.$$eval('#devices tbody tr', (trs) => trs.map((tr) => [tr.getAttribute('data-device'), tr.querySelector('td.active')?.textContent ?? '']));
      const shown = new Map(rows as [string, string][]);
      return f.agents.every((a) => shown.get(a.deviceId) === (a.active ? `${a.active.id} v${a.active.version}` : '-'));
    };
    const stageText = (i: number) => page.locator(`[data-rollout="${st.id}"] [data-stage="${i}"] .stage-progress`).textContent();

    await waitFor('stage 1 shows 3/3 activated', async () => /stage 1: 3\/3 activated/.test((await stageText(0)) ?? ''));
    await waitFor('the table shows every device and its active adapter', tableMatchesFleet); // (devices of the other test on this broker are listed too)
    assert.match((await stageText(1)) ?? '', /stage 2: 0\/3 activated/);

    t += 61_000; // the next minute: stage 2's three devices may be sent
    await rollouts.tick();
    await waitFor('stage 2 progress updates live', async () => /stage 2: 3\/3 activated/.test((await stageText(1)) ?? ''));
    await waitFor('the table follows the devices', tableMatchesFleet);
    assert.equal(await page.evaluate(() => (globalThis as unknown as { notReloaded?: boolean }).notReloaded), true, 'the page was not reloaded');

    await page.locator(`[data-rollout="${st.id}"] button[data-action="pause"]`).click();
    const api = async () => (await (await fetch(`${http.url}/api/rollouts/${st.id}`, { headers: { authorization: `Bearer ${TOKEN}` } })).json()) as { status: string };
    await waitFor('the API says paused', async () => (await api()).status === 'paused');
    const sentBefore = countDevices(rollouts.get(st.id));
    t += 61_000;
    await rollouts.tick();
    const after = countDevices(rollouts.get(st.id));
    assert.equal(after.pending, sentBefore.pending, 'paused: no device was sent the adapter in the next minute');
    assert.equal(after.pending, 4);
    await waitFor('the page shows paused and a resume button', async () => (await page.locator(`[data-rollout="${st.id}"] button[data-action="resume"]`).count()) === 1);
    assert.equal(await page.locator(`[data-rollout="${st.id}"] svg.plot polyline.line-activated`).count(), 1, 'the plot is drawn');

    await fs.mkdir(path.join(REPO, 'bench-results'), { recursive: true });
    await page.screenshot({ path: path.join(REPO, 'bench-results', 'dashboard.png'), fullPage: true });
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser?.close();
    await fs.rm(userDir, { recursive: true, force: true });
    await http.close();
    await rollouts.close();
    await Promise.all(f.agents.map((a) => a.stop()));
    await f.hub.stop();
  }
});
