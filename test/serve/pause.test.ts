// Serving queues during a fine-tuning job (ServeEngine.pauseServing): rows running when the pause is
// asked finish first; then the session is released (the model refuses forwards) and a request
// submitted meanwhile waits in the queue, neither failed nor served, while between() swaps still
// run; resume() recreates the session and the waiting request gets exactly what it gets unpaused.
// Over HTTP, /health says serving is paused and how many requests wait.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { ServeEngine, type CompletionRequest } from '../../src/serve/engine.js';
import { startServe } from '../../src/serve/server.js';

const tmp = tempDir();
let engine: ServeEngine;
let modelDir = '';
before(async () => {
  const dir = await quantized(await tinyCheckpoint(tmp.dir), tmp.dir, 'tiny', { format: 'int4', int4AccuracyLevel: 0 });
  modelDir = dir;
  engine = await ServeEngine.start(dir, { ctx: 64 });
});
after(async () => {
  await engine?.shutdown(0);
  tmp.cleanup();
});

test('pauseServing: running rows finish, later requests queue until resume and then equal the unpaused result', async () => {
  const req = (maxTokens: number): CompletionRequest => ({ promptIds: engine.model.tokenizer.encode('Pause here', { addSpecialTokens: true }), adapters: [], maxTokens, sampling: { temperature: 0, topK: 0, topP: 1 }, seed: 0, ignoreEos: true });
  const ref = (await engine.submit(req(20))).tokenIds;

  const inFlight = engine.submit(req(20));
  await new Promise((r) => setTimeout(r, 0));
  const { resume } = await engine.pauseServing();
  const first = await Promise.race([inFlight, Promise.resolve(null)]);
  assert.ok(first, 'the row running when the pause was asked finished before the session was released');
  assert.deepEqual(first.tokenIds, ref);
  assert.equal(engine.model.isSuspended, true, 'the session is released while paused');
  assert.equal(engine.paused, true);
  await assert.rejects(engine.model.forward({ ids: [[1]] }), /suspended/);

  let settled = false;
  const waiting = engine.submit(req(20)).finally(() => (settled = true));
  assert.equal(await engine.between(() => 'ran'), 'ran', 'between() still runs while paused');
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(settled, false, 'a request submitted while paused waits');
  assert.equal(engine.queueDepth, 1);

  await resume();
  assert.equal(engine.model.isSuspended, false);
  assert.deepEqual((await waiting).tokenIds, ref, 'after resume the queued request is served as if nothing happened');
  assert.equal(engine.paused, false);
  const again = await engine.pauseServing();
  await assert.rejects(engine.pauseServing(), /already paused/);
  assert.equal(engine.paused, true, 'a refused second pause leaves the first in place');
  await again.resume();
  assert.equal(engine.paused, false);
  assert.deepEqual((await engine.submit(req(20))).tokenIds, ref);
});

test('over HTTP: /health says serving is paused and how deep the queue is; a completion sent meanwhile is answered after resume', async () => {
  const s = await startServe({ modelDir, port: 0, ctx: 64, modelId: 'tiny' });
  try {
    const eng = await s.ready;
    const body = { model: 'tiny', prompt: 'Pause here', max_tokens: 8, temperature: 0 };
    const complete = async () => ((await (await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })).json()) as { choices: { text: string }[] }).choices[0]!.text;
    const ref = await complete();
    const { resume } = await eng.pauseServing();
    const waiting = complete();
    while (eng.queueDepth < 1) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(await (await fetch(`${s.url}/health`)).json(), { status: 'ok', serving: 'paused for a fine-tuning job; requests queue until it ends', queue_depth: 1 });
    await resume();
    assert.equal(await waiting, ref);
    assert.deepEqual(await (await fetch(`${s.url}/health`)).json(), { status: 'ok' });
  } finally {
    await s.close(0);
  }
});
