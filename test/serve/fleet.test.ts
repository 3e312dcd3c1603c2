// `edgelora serve --broker …`: the fleet agent inside the server, end to end against a real Mosquitto
// with the hub and the server as separate processes (the CLI), driven by `edgelora publish` and
// `edgelora fleet command`, queried with the official `openai` client. A push while clients stream
// continuously: every stream completes with exactly one adapter's greedy text (never a mix, never an
// error), the next request gets the new adapter, /v1/models shows it; an adapter that fails
// activation (NaN weights) leaves serving on the last good one; a rollback command restores the
// previous adapter.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import OpenAI from 'openai';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { CLI, startCli, stopCli, type CliProcess } from '../helpers/cli-process.js';
import { randomAdapter } from '../helpers/adapters.js';
import { Mosquitto, waitFor } from '../sync/helpers.js';
import { writeKeyPair } from '../../src/sync/protocol/signing.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';

const tmp = tempDir('edgelora-fleet-serve-');
const MODEL = 'tiny';
const FLEET = 'shop';
const DEVICE = 'kiosk-1';
/** Completion tokens per request: long enough that continuous streams overlap the swap. */
const TOKENS = 96;
const PROMPT = 'The fleet pushed';
let mosq: Mosquitto;
let hub: CliProcess;
let serve: CliProcess;
let client: OpenAI;
let baseUrl = '';
let keys: { keyFile: string; pubFile: string };
const dirs: Record<string, string> = {};

async function run(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const p = startCli(args);
  const code = await new Promise<number | null>((r) => p.child.once('exit', r));
  return { code, out: p.out, err: p.err };
}

interface FleetInfo {
  fleet_active: string | null;
  base_serves: string | null;
  swaps_with_rows_in_flight: number;
  activations: number;
}

async function fleetInfo(): Promise<FleetInfo> {
  const r = (await (await fetch(`${baseUrl}/health`)).json()) as { fleet: FleetInfo };
  return r.fleet;
}

async function models(): Promise<string[]> {
  return (await client.models.list()).data.map((m) => m.id);
}

/** Greedy completion text, always TOKENS tokens (ignore_eos is an edgelora extension). */
async function greedy(model: string, stream: boolean): Promise<string> {
  const body = { model, prompt: PROMPT, max_tokens: TOKENS, temperature: 0, ignore_eos: true };
  if (!stream) return (await client.completions.create(body)).choices[0]!.text;
  let text = '';
  for await (const c of await client.completions.create({ ...body, stream: true })) text += c.choices[0]?.text ?? '';
  return text;
}

async function publish(name: string): Promise<void> {
  const r = await run(['publish', dirs[name]!, '--broker', mosq.url, '--to', `fleet:${FLEET}`, '--name', name]);
  assert.equal(r.code, 0, `publish ${name}: ${r.err}`);
}

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  const modelDir = await quantized(hf, tmp.dir, MODEL, { format: 'int4', int4AccuracyLevel: 0 });
  const manifest = await readManifest(modelDir);
  const cfg = parseHfConfig(manifest.sourceConfig, modelDir);
  for (const [i, name] of ['alpha', 'beta', 'broken'].entries()) {
    dirs[name] = path.join(tmp.dir, 'src', name);
    // "broken" has NaN weights: the hub and the agent's file checks pass, the runtime loader refuses it.
    await randomAdapter(dirs[name]!, cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'o_proj'], seed: 70 + i, fingerprint: manifest.fingerprint, std: name === 'broken' ? Number.NaN : 0.3 });
  }
  keys = await writeKeyPair(path.join(tmp.dir, 'hub'));
  mosq = await Mosquitto.start();
  hub = startCli(['hub', '--broker', mosq.url, '--store', path.join(tmp.dir, 'store'), '--key', keys.keyFile, '--allow-plaintext', '--coalesce-ms', '50']);
  serve = startCli(['serve', '--model', modelDir, '--port', '0', '--ctx', '128', '--broker', mosq.url, '--device-id', DEVICE, '--fleet', FLEET, '--trust', keys.pubFile, '--state', path.join(tmp.dir, 'state')]);
  await waitFor('serve listening', () => /listening on (http:\S+)/.test(serve.out) || serve.child.exitCode !== null, 30_000);
  baseUrl = /listening on (http:\S+)/.exec(serve.out)?.[1] ?? assert.fail(`serve did not start: ${serve.err}`);
  await waitFor('serve ready with its agent', () => /ready/.test(serve.out) || serve.child.exitCode !== null, 30_000);
  assert.equal(serve.child.exitCode, null, serve.err);
  client = new OpenAI({ baseURL: `${baseUrl}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  await stopCli(serve);
  await stopCli(hub);
  await mosq?.stop();
  tmp.cleanup();
});

// Once failed intermittently (2 of 48 streams matched neither adapter): the swap unloaded the old
// adapter before the new one had loaded, and a request resolving the bare id in that window got the
// base alone (fleet-activator.test.ts reproduces the window in-process and reads back what each row
// is fed). Not a near-tie: batched rows differ from the row alone by ≤ 4.8e-7 in the logits while
// the smallest top-2 margin on alpha's and beta's greedy paths here is 3.0e-4.
test('a push while 3 clients stream: every stream ends with one adapter\'s text, the next request gets the new one; a failed activation keeps the last good one; rollback restores the previous', async () => {
  const base = await greedy(MODEL, false);
  assert.deepEqual(await models(), [MODEL], 'no fleet adapter yet');

  await publish('alpha');
  await waitFor('alpha active', async () => (await fleetInfo()).fleet_active === `${MODEL}:alpha`, 60_000);
  assert.deepEqual(await models(), [MODEL, `${MODEL}:alpha`]);
  const refAlpha = await greedy(`${MODEL}:alpha`, false);
  assert.equal(await greedy(MODEL, false), refAlpha, 'with --default-adapter fleet the bare id serves the fleet adapter');
  assert.notEqual(refAlpha, base, 'the adapter changes the greedy text');

  // Three clients stream the bare id continuously while beta is pushed.
  let streaming = true;
  const results: { text: string; startedAfterBetaSeen: boolean }[] = [];
  const errors: unknown[] = [];
  let betaSeen = false;
  const clients = [0, 1, 2].map(async () => {
    while (streaming) {
      const after = betaSeen;
      try {
        results.push({ text: await greedy(MODEL, true), startedAfterBetaSeen: after });
      } catch (err) {
        errors.push(err);
      }
    }
  });
  await waitFor('streams running', () => results.length >= 3);
  await publish('beta');
  await waitFor('beta active', async () => (await fleetInfo()).fleet_active === `${MODEL}:beta`, 60_000);
  betaSeen = true;
  const seenAt = results.length;
  await waitFor('streams after the swap', () => results.length >= seenAt + 6);
  streaming = false;
  await Promise.all(clients);

  const refBeta = await greedy(`${MODEL}:beta`, false);
  assert.notEqual(refBeta, refAlpha);
  assert.deepEqual(errors, [], 'no request failed during the push');
  const alphaN = results.filter((r) => r.text === refAlpha).length;
  const betaN = results.filter((r) => r.text === refBeta).length;
  console.log(`streams: ${results.length} (${alphaN} alpha, ${betaN} beta, ${results.length - alphaN - betaN} other)`);
  for (const r of results.filter((x) => x.text !== refAlpha && x.text !== refBeta)) console.log(`other: ${JSON.stringify(r.text)} (alpha ${JSON.stringify(refAlpha)}, beta ${JSON.stringify(refBeta)})`);
  assert.equal(alphaN + betaN, results.length, 'every stream has exactly one adapter\'s text (none mixed)');
  assert.ok(alphaN > 0 && betaN > 0);
  for (const r of results.filter((x) => x.startedAfterBetaSeen)) assert.equal(r.text, refBeta, 'a request after the swap gets the new adapter');
  const info = await fleetInfo();
  assert.ok(info.swaps_with_rows_in_flight >= 1, `the swap happened with streams in flight (${JSON.stringify(info)})`);
  assert.deepEqual(await models(), [MODEL, `${MODEL}:beta`]);
  assert.equal(await greedy(MODEL, true), refBeta);

  // An adapter that fails activation: serving stays on beta.
  await publish('broken');
  await waitFor('broken refused', () => /activation of broken v\d+ .*failed.*rolled back to beta/.test(serve.err), 60_000);
  assert.equal((await fleetInfo()).fleet_active, `${MODEL}:beta`);
  assert.deepEqual(await models(), [MODEL, `${MODEL}:beta`]);
  assert.equal(await greedy(MODEL, false), refBeta, 'serving is still on the last good adapter');

  // Rollback: the previous adapter (alpha) again.
  const rb = await run(['fleet', 'command', DEVICE, 'rollback', '--broker', mosq.url]);
  assert.equal(rb.code, 0, rb.err + rb.out);
  await waitFor('alpha active again', async () => (await fleetInfo()).fleet_active === `${MODEL}:alpha`, 30_000);
  assert.deepEqual(await models(), [MODEL, `${MODEL}:alpha`]);
  assert.equal(await greedy(MODEL, false), refAlpha, 'rollback restores the previous adapter\'s output exactly');
});
