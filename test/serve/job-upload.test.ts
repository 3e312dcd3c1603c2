// `upload: true` from a fine-tuning job, end to end against a real Mosquitto with the hub and the
// server as separate processes (the CLI): `serve --broker … --trust hub.pub` finds the hub's X25519
// key beside --trust (src/cli/hub-keys.ts) and seals the job's upload to it; the hub opens it and
// stores exactly the adapter the job trained: the stored blob unpacks to the job's adapter directory
// byte for byte, its sha256 is the job's uploaded_sha256, and the store names it after the job.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { CLI, startCli, stopCli, type CliProcess } from '../helpers/cli-process.js';
import { Mosquitto, waitFor } from '../sync/helpers.js';
import { HubStore } from '../../src/sync/hub/store.js';
import { packAdapterDir, unpack } from '../../src/sync/index.js';

const DATA = path.resolve('examples/personal.jsonl');
const tmp = tempDir('edgelora-job-upload-');
const STORE = path.join(tmp.dir, 'store');
const STATE = path.join(tmp.dir, 'state');
let mosq: Mosquitto;
let hub: CliProcess;
let serve: CliProcess;
let url = '';

const post = (p: string, body: unknown) => fetch(`${url}${p}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

before(async () => {
  const modelDir = await quantized(await tinyCheckpoint(tmp.dir), tmp.dir, 'tiny', { format: 'nf4', blockSize: 64 });
  const prefix = path.join(tmp.dir, 'keys', 'hub');
  await fs.mkdir(path.dirname(prefix), { recursive: true });
  const kg = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'keygen', prefix], { encoding: 'utf8' });
  assert.equal(kg.status, 0, kg.stderr);
  await fs.access(`${prefix}.x25519.pub`); // what serve must find beside --trust
  mosq = await Mosquitto.start();
  // No --allow-plaintext on either side: the upload must travel sealed.
  hub = startCli(['hub', '--broker', mosq.url, '--store', STORE, '--key', `${prefix}.key`, '--coalesce-ms', '50']);
  serve = startCli(['serve', '--model', modelDir, '--port', '0', '--ctx', '64', '--broker', mosq.url, '--device-id', 'dev-up', '--fleet', 'f', '--trust', `${prefix}.pub`, '--state', STATE, '--profile', 'generic-x86-64']);
  await waitFor('serve ready', () => /ready/.test(serve.out) || serve.child.exitCode !== null, 60_000);
  assert.equal(serve.child.exitCode, null, serve.err);
  url = /listening on (http:\S+)/.exec(serve.out)?.[1] ?? assert.fail(`serve did not start: ${serve.err}`);
});
after(async () => {
  await stopCli(serve);
  await stopCli(hub);
  await mosq?.stop();
  tmp.cleanup();
});

test('a job with upload: true: the hub stores exactly the adapter the job trained, sealed on the way', { timeout: 300_000 }, async () => {
  const f = (await (await post('/v1/files', { purpose: 'fine-tune', filename: 'personal.jsonl', content: await fs.readFile(DATA, 'utf8') })).json()) as { id: string };
  const res = await post('/v1/fine_tuning/jobs', { training_file: f.id, suffix: 'mine', upload: true, hyperparameters: { steps: 4, batch_size: 2, rank: 4, alpha: 8, learning_rate: 1e-2, seed: 3 } });
  const created = (await res.json()) as { id: string; upload: boolean };
  assert.equal(res.status, 200, JSON.stringify(created));
  assert.equal(created.upload, true);
  type Job = { status: string; uploaded_sha256: string | null; fine_tuned_model: string | null };
  let job: Job | null = null;
  const evs = async () => ((await (await fetch(`${url}/v1/fine_tuning/jobs/${created.id}/events?limit=10000`)).json()) as { data: { level: string; message: string }[] }).data;
  await waitFor('the job uploaded', async () => {
    job = (await (await fetch(`${url}/v1/fine_tuning/jobs/${created.id}`)).json()) as Job;
    if (job.status === 'failed' || job.status === 'cancelled' || (await evs()).some((e) => e.level === 'error')) return true;
    return job.uploaded_sha256 !== null;
  }, 240_000);
  const done = job as unknown as Job;
  assert.equal(done.status, 'succeeded', JSON.stringify(await evs()));
  assert.equal(done.fine_tuned_model, 'tiny:mine');
  const sha = done.uploaded_sha256 ?? assert.fail(`no upload: ${JSON.stringify(await evs())}\n${serve.err}`);
  assert.ok((await evs()).some((e) => e.message === `uploaded to the hub: sha256 ${sha}`), 'the job says what it uploaded');

  // The reference: the job's adapter directory on disk (what it installed and serves as tiny:mine).
  const jobAdapter = path.join(STATE, 'jobs', created.id, 'adapter');
  const names = (await fs.readdir(jobAdapter, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name).sort();
  assert.ok(names.includes('adapter_model.safetensors') && names.includes('adapter_config.json'), `the job wrote an adapter: ${names.join(', ')}`);
  assert.equal(createHash('sha256').update(await packAdapterDir(jobAdapter)).digest('hex'), sha, 'uploaded_sha256 is the pack of the job\'s adapter directory');

  await stopCli(hub); // the store is read at rest
  const store = await HubStore.open(STORE);
  try {
    const entry = store.listBlobs().find((b) => b.sha256 === sha) ?? assert.fail(`the hub store holds no blob ${sha}: ${JSON.stringify(store.listBlobs())}`);
    assert.equal(entry.name, 'mine', 'stored under the job\'s suffix');
    assert.match(entry.source, /^upload:/);
    const blob = await store.readBlob(sha);
    assert.equal(createHash('sha256').update(blob).digest('hex'), sha, 'the stored blob is the plaintext pack (the hub opened the seal)');
    const files = await unpack(blob);
    assert.deepEqual(files.map((x) => x.name).sort(), names, 'the same files');
    for (const x of files) assert.ok(Buffer.from(x.data).equals(await fs.readFile(path.join(jobAdapter, x.name))), `${x.name}: the hub's copy differs from the job's`);
  } finally {
    await store.close();
  }
  assert.doesNotMatch(serve.err, /unsealed|in clear/, 'the upload was sealed');
});
