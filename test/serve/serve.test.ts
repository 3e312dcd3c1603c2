// `edgelora serve` end to end, on ephemeral loopback ports, with the official `openai` npm client:
// chat and text completions (whole and streamed), greedy text equal to `edgelora generate`,
// per-request and stacked adapters, concurrent mixed-adapter requests equal to each alone, live
// adapter load/unload under a running stream, every refusal's status and OpenAI error body, API
// keys, client disconnects and SIGTERM.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import OpenAI from 'openai';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { startServe, type RunningServer } from '../../src/serve/server.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { readManifest } from '../../src/model/manifest.js';
import { EdgeloraError } from '../../src/util/errors.js';

const CLI = path.resolve('src/cli/main.ts');
const tmp = tempDir();
let modelDir = '';
const adapters: Record<string, string> = {};
let server: RunningServer;
let client: OpenAI;
const MODEL = 'tiny';
const CTX = 128;

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  // accuracy_level 0 keeps activations float, so batched and alone rows differ by summation order only.
  modelDir = await quantized(hf, tmp.dir, MODEL, { format: 'int4', int4AccuracyLevel: 0 });
  const manifest = await readManifest(modelDir);
  const cfg = parseHfConfig(manifest.sourceConfig, modelDir);
  const specs = [
    { name: 'a0', r: 4, targets: ['q_proj', 'v_proj'] as const },
    { name: 'a1', r: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const },
    { name: 'a2', r: 2, targets: ['o_proj', 'down_proj'] as const },
    { name: 'a3', r: 4, targets: ['up_proj'] as const },
  ];
  for (const [i, s] of specs.entries()) {
    adapters[s.name] = path.join(tmp.dir, s.name);
    await randomAdapter(adapters[s.name]!, cfg, { r: s.r, alpha: 2 * s.r, targets: [...s.targets], seed: 40 + i, fingerprint: manifest.fingerprint, std: 0.3 });
  }
  server = await startServe({ modelDir, port: 0, ctx: CTX, maxBatch: 8, adapters: ['a0', 'a1', 'a2'].map((id) => ({ id, dir: adapters[id]!, scale: 1 })) });
  await server.ready;
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
});
after(async () => {
  await server?.close(1000);
  tmp.cleanup();
});

const post = (url: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body) });

/** Asserts an OpenAI error response: status and the {"error":{message,type,param,code}} body. */
async function assertError(res: Response, status: number, code: string, param?: string | null): Promise<string> {
  const text = await res.text();
  assert.equal(res.status, status, `expected ${status}, got ${res.status}: ${text}`);
  const body = JSON.parse(text) as { error: { message: string; type: string; param: string | null; code: string } };
  assert.deepEqual(Object.keys(body.error).sort(), ['code', 'message', 'param', 'type']);
  assert.equal(body.error.code, code, text);
  assert.ok(body.error.message.length > 0 && typeof body.error.type === 'string');
  if (param !== undefined) assert.equal(body.error.param, param, text);
  return body.error.message;
}

/** `edgelora generate --json` with the same prompt, adapters and max tokens. */
function generateCli(prompt: string, maxTokens: number, adapterSpecs: string[]): { text: string; token_ids: number[] } {
  const args = ['--import', 'tsx', CLI, 'generate', '--model', modelDir, '--prompt', prompt, '--max-new-tokens', String(maxTokens), '--json', ...adapterSpecs.flatMap((a) => ['--adapter', a])];
  const r = spawnSync(process.execPath, args, { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as { text: string; token_ids: number[] };
}

async function batchHistogram(): Promise<{ count: number; ones: number }> {
  const text = await server.metrics.registry.metrics();
  const num = (re: RegExp) => Number(re.exec(text)?.[1] ?? NaN);
  return { count: num(/^edgelora_batch_size_count (\S+)$/m), ones: num(/^edgelora_batch_size_bucket\{le="1"\} (\S+)$/m) };
}

test('health says loading, then ok; models list the base and one entry per adapter', async () => {
  const s = await startServe({ modelDir, port: 0 });
  try {
    const early = await fetch(`${s.url}/health`);
    assert.equal(early.status, 503);
    assert.deepEqual(await early.json(), { status: 'loading' });
    await assertError(await fetch(`${s.url}/v1/models`), 503, 'model_loading');
    await s.ready;
    const ok = await fetch(`${s.url}/health`);
    assert.equal(ok.status, 200);
    assert.deepEqual(await ok.json(), { status: 'ok' });
  } finally {
    await s.close(0);
  }
  const models = await client.models.list();
  const ids = models.data.map((m) => m.id).sort();
  assert.deepEqual(ids, [MODEL, `${MODEL}:a0`, `${MODEL}:a1`, `${MODEL}:a2`]);
  for (const m of models.data) assert.equal((m as unknown as { parent: string | null }).parent, m.id === MODEL ? null : MODEL);
});

test('chat and text completions, whole and streamed, carry usage and finish_reason; streams equal whole answers', async () => {
  const chat = await client.chat.completions.create({ model: `${MODEL}:a1`, messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 10, temperature: 0 });
  assert.equal(chat.object, 'chat.completion');
  assert.equal(chat.choices.length, 1);
  assert.ok(chat.choices[0]!.finish_reason === 'stop' || chat.choices[0]!.finish_reason === 'length');
  assert.ok(chat.usage && chat.usage.completion_tokens > 0 && chat.usage.prompt_tokens > 0);
  assert.equal(chat.usage.total_tokens, chat.usage.prompt_tokens + chat.usage.completion_tokens);

  const stream = await client.chat.completions.create({ model: `${MODEL}:a1`, messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let content = '';
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | null | undefined = null;
  for await (const c of stream) {
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      content += ch.delta.content ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  assert.equal(content, chat.choices[0]!.message.content);
  assert.equal(finish, chat.choices[0]!.finish_reason);
  assert.deepEqual(usage, chat.usage);

  const text = await client.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 12, temperature: 0 });
  assert.equal(text.object, 'text_completion');
  assert.ok(text.usage && text.usage.completion_tokens > 0);
  const ts = await client.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 12, temperature: 0, stream: true });
  let streamed = '';
  let sawUsage = false;
  let tf: string | null = null;
  for await (const c of ts) {
    if (c.usage) sawUsage = true;
    for (const ch of c.choices) {
      streamed += ch.text;
      if (ch.finish_reason) tf = ch.finish_reason;
    }
  }
  assert.equal(streamed, text.choices[0]!.text);
  assert.equal(tf, text.choices[0]!.finish_reason);
  assert.equal(sawUsage, false, 'usage is only streamed when stream_options.include_usage asks for it');

  // Sampling with a seed is reproducible; a stop string ends the text before it.
  const s1 = await client.completions.create({ model: MODEL, prompt: 'Seeded', max_tokens: 12, temperature: 0.9, top_p: 0.9, seed: 7 });
  const s2 = await client.completions.create({ model: MODEL, prompt: 'Seeded', max_tokens: 12, temperature: 0.9, top_p: 0.9, seed: 7 });
  assert.equal(s1.choices[0]!.text, s2.choices[0]!.text);
  const full = text.choices[0]!.text;
  const stopAt = full.slice(3, 5);
  if (stopAt.length === 2) {
    const stopped = await client.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 12, temperature: 0, stop: [stopAt] });
    assert.equal(stopped.choices[0]!.text, full.slice(0, full.indexOf(stopAt)));
    assert.equal(stopped.choices[0]!.finish_reason, 'stop');
  }
});

test('greedy text equals `edgelora generate` with the same prompt, adapters and max tokens (base, one adapter, a stack with scales)', async () => {
  const prompt = 'The robot said';
  const cases: { model: string; ext?: { id: string; scale: number }[]; cli: string[] }[] = [
    { model: MODEL, cli: [] },
    { model: `${MODEL}:a0`, cli: [adapters.a0!] },
    { model: MODEL, ext: [{ id: 'a1', scale: 1 }, { id: 'a2', scale: 0.5 }], cli: [adapters.a1!, `${adapters.a2!}:0.5`] },
  ];
  const texts = new Set<string>();
  for (const c of cases) {
    const want = generateCli(prompt, 16, c.cli);
    const body = { model: c.model, prompt, max_tokens: 16, temperature: 0, ...(c.ext ? { adapters: c.ext } : {}) };
    const got = (await client.completions.create(body as OpenAI.CompletionCreateParamsNonStreaming)) as OpenAI.Completion;
    assert.equal(got.choices[0]!.text, want.text, `${JSON.stringify(c)}: server text differs from edgelora generate`);
    assert.equal(got.usage!.completion_tokens, want.token_ids.length);
    texts.add(want.text);
  }
  assert.equal(texts.size, cases.length, 'the adapters do not change the text, so this test could not see them');
});

test('6 concurrent requests over 3 adapters and the base, in mixed batches, each equal the same request alone', async () => {
  const reqs = [MODEL, `${MODEL}:a0`, `${MODEL}:a1`, `${MODEL}:a2`, `${MODEL}:a0`, MODEL].map((model, i) => ({
    model,
    prompt: i % 2 === 0 ? 'A kiosk greets the visitor' : 'The camera report:',
    max_tokens: 20,
    temperature: 0,
    ignore_eos: true,
  }));
  const alone: string[] = [];
  for (const r of reqs) alone.push(((await client.completions.create(r as OpenAI.CompletionCreateParamsNonStreaming)) as OpenAI.Completion).choices[0]!.text);
  assert.ok(new Set(alone).size >= 4, 'requests on different adapters should differ');
  const before = await batchHistogram();
  const together = await Promise.all(reqs.map((r) => client.completions.create(r as OpenAI.CompletionCreateParamsNonStreaming) as Promise<OpenAI.Completion>));
  const afterH = await batchHistogram();
  together.forEach((t, i) => assert.equal(t.choices[0]!.text, alone[i], `request ${i} (${reqs[i]!.model}) differs when batched`));
  const batched = afterH.count - before.count - (afterH.ones - before.ones);
  assert.ok(batched > 0, 'no forward held more than one row: the requests were not batched');
});

test('loading one adapter and unloading the one in use while a stream runs leaves the stream unchanged; an id means one content', async () => {
  const req = { model: `${MODEL}:a0`, messages: [{ role: 'user' as const, content: 'tell me a story' }], max_tokens: 40, temperature: 0, ignore_eos: true };
  const whole = await client.chat.completions.create(req as OpenAI.ChatCompletionCreateParamsNonStreaming);
  const stream = await client.chat.completions.create({ ...req, stream: true } as OpenAI.ChatCompletionCreateParamsStreaming);
  let content = '';
  let chunks = 0;
  for await (const c of stream) {
    content += c.choices[0]?.delta.content ?? '';
    if (++chunks === 3) {
      const load = await post(`${server.url}/v1/adapters`, { id: 'a3', path: adapters.a3, scale: 0.5 });
      assert.equal(load.status, 201, await load.clone().text());
      const del = await fetch(`${server.url}/v1/adapters/a0`, { method: 'DELETE' });
      assert.equal(del.status, 200);
    }
  }
  assert.ok(chunks > 3);
  assert.equal(content, whole.choices[0]!.message.content);
  await assertError(await post(`${server.url}/v1/chat/completions`, req), 404, 'model_not_found', 'model');
  const listed = (await (await fetch(`${server.url}/v1/adapters`)).json()) as { data: { id: string; scale: number }[] };
  assert.deepEqual(listed.data.map((a) => a.id).sort(), ['a1', 'a2', 'a3']);
  assert.equal(listed.data.find((a) => a.id === 'a3')!.scale, 0.5);
  // Same content again: no-op (200); other content under a used id: 409; a broken path: 400.
  assert.equal((await post(`${server.url}/v1/adapters`, { id: 'a3', path: adapters.a3 })).status, 200);
  await assertError(await post(`${server.url}/v1/adapters`, { id: 'a1', path: adapters.a2 }), 409, 'adapter_conflict', 'id');
  await assertError(await post(`${server.url}/v1/adapters`, { id: 'zz', path: path.join(tmp.dir, 'missing') }), 400, 'invalid_adapter', 'path');
  await assertError(await fetch(`${server.url}/v1/adapters/nope`, { method: 'DELETE' }), 404, 'adapter_not_found', 'id');
  // Put a0 back for the other tests (a fresh load generation).
  assert.equal((await post(`${server.url}/v1/adapters`, { id: 'a0', path: adapters.a0 })).status, 201);
});

test('bad input gets its status and OpenAI error body, and the server keeps serving', async () => {
  const url = `${server.url}/v1/completions`;
  await assertError(await post(url, '{"model": "tiny", "prompt": '), 400, 'invalid_json');
  await assertError(await post(url, { model: MODEL, prompt: 'x'.repeat(1024 * 1024 + 10) }), 413, 'body_too_large');
  await assertError(await post(url, { model: 'other-model', prompt: 'hi' }), 404, 'model_not_found', 'model');
  await assertError(await post(url, { model: `${MODEL}:nope`, prompt: 'hi' }), 404, 'model_not_found', 'model');
  await assertError(await post(url, { model: MODEL, prompt: 'hi', adapters: [{ id: 'nope' }] }), 404, 'adapter_not_found', 'adapters');
  await assertError(await post(url, { model: MODEL, prompt: 'hi', n: 2 }), 400, 'invalid_value', 'n');
  await assertError(await post(url, { model: MODEL, prompt: 'hi', temperature: -1 }), 400, 'invalid_value', 'temperature');
  await assertError(await post(url, { model: MODEL }), 400, 'invalid_value', 'prompt');
  await assertError(await post(`${server.url}/v1/chat/completions`, { model: MODEL, messages: [] }), 400, 'invalid_value', 'messages');
  const long = 'word '.repeat(CTX * 2);
  const m1 = await assertError(await post(url, { model: MODEL, prompt: long, max_tokens: 1 }), 400, 'context_length_exceeded', 'prompt');
  assert.match(m1, new RegExp(`context is ${CTX} tokens`));
  const m2 = await assertError(await post(url, { model: MODEL, prompt: 'hi', max_tokens: CTX }), 400, 'context_length_exceeded', 'max_tokens');
  assert.match(m2, /at most \d+ completion tokens fit/);
  await assertError(await fetch(`${server.url}/v1/nothing`), 404, 'not_found');
  const ok = await client.completions.create({ model: MODEL, prompt: 'still serving', max_tokens: 2 });
  assert.equal(ok.choices.length, 1);
});

test('a queue over --max-queue gets 429; a client disconnect cancels its row (queued or running) and the server stays healthy', async () => {
  const s = await startServe({ modelDir, port: 0, maxBatch: 1, maxQueue: 1 });
  try {
    await s.ready;
    const engine = await s.ready;
    const long = { model: MODEL, prompt: 'go on', max_tokens: 100, temperature: 0, ignore_eos: true, stream: true };
    const running = new AbortController();
    const r1 = await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(long), signal: running.signal });
    const reader = r1.body!.getReader();
    await reader.read(); // the first chunk: the row is running and holds the only slot
    const queued = new AbortController();
    const r2 = fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(long), signal: queued.signal }).catch(() => null);
    for (let i = 0; i < 200 && engine.queueDepth < 1; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(engine.queueDepth, 1);
    await assertError(await post(`${s.url}/v1/completions`, { ...long, stream: false }), 429, 'queue_full');
    queued.abort();
    await r2;
    running.abort();
    for (let i = 0; i < 400 && (engine.runningRows > 0 || engine.queueDepth > 0); i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(engine.runningRows, 0, 'the disconnected row is still decoding');
    assert.equal(engine.queueDepth, 0, 'the disconnected queued request is still waiting');
    const metrics = await s.metrics.registry.metrics();
    const generated = Number(/^edgelora_completion_tokens_total (\S+)$/m.exec(metrics)![1]);
    assert.ok(generated < 100, `the cancelled row generated all ${generated} tokens`);
    assert.equal((await fetch(`${s.url}/health`)).status, 200);
    const after = await post(`${s.url}/v1/completions`, { model: MODEL, prompt: 'after', max_tokens: 3, temperature: 0 });
    assert.equal(after.status, 200);
  } finally {
    await s.close(0);
  }
});

test('API keys: every route but /health needs the Bearer key; a non-loopback bind without keys is refused', async () => {
  const key = 'k'.repeat(8) + '0123456789abcdef';
  const s = await startServe({ modelDir, port: 0, apiKeys: [key] });
  try {
    await s.ready;
    assert.equal((await fetch(`${s.url}/health`)).status, 200);
    await assertError(await fetch(`${s.url}/v1/models`), 401, 'invalid_api_key');
    await assertError(await fetch(`${s.url}/v1/models`, { headers: { authorization: `Bearer ${key}x` } }), 401, 'invalid_api_key');
    await assertError(await fetch(`${s.url}/metrics`), 401, 'invalid_api_key');
    const authed = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: key, maxRetries: 0 });
    assert.equal((await authed.models.list()).data[0]!.id, MODEL);
    const wrong = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'wrong-key-wrong-key', maxRetries: 0 });
    await assert.rejects(wrong.models.list(), (e: unknown) => e instanceof OpenAI.AuthenticationError && e.status === 401);
  } finally {
    await s.close(0);
  }
  await assert.rejects(startServe({ modelDir, host: '0.0.0.0', port: 0 }), (e: unknown) => e instanceof EdgeloraError && /would expose the API/.test(e.message) && /--api-key-file/.test(e.hint ?? ''));
});

test('SIGTERM: the CLI stops accepting, lets the running stream finish, exits 0', async () => {
  const keyFile = path.join(tmp.dir, 'keys');
  writeFileSync(keyFile, '# test key\n0123456789abcdef0123\n');
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--model', modelDir, '--port', '0', '--json-log', '--api-key-file', keyFile, '--shutdown-timeout', '20'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  try {
    const url = await new Promise<string>((resolve, reject) => {
      child.stdout.on('data', (d) => {
        out += d;
        const m = /"event":"listening","url":"([^"]+)"/.exec(out);
        if (m) resolve(m[1]!);
      });
      child.on('exit', () => reject(new Error(`serve exited early: ${out}\n${err}`)));
    });
    for (let i = 0; i < 600 && !out.includes('"event":"ready"'); i++) await new Promise((r) => setTimeout(r, 20));
    const c = new OpenAI({ baseURL: `${url}/v1`, apiKey: '0123456789abcdef0123', maxRetries: 0 });
    const body = { model: MODEL, prompt: 'shutting down soon', max_tokens: 60, temperature: 0, ignore_eos: true, stream: true };
    const stream = await c.completions.create(body as OpenAI.CompletionCreateParamsStreaming);
    let tokens = 0;
    let finish: string | null = null;
    for await (const ch of stream) {
      if (tokens++ === 2) child.kill('SIGTERM');
      finish = ch.choices[0]?.finish_reason ?? finish;
    }
    assert.equal(finish, 'length', 'the running stream was cut instead of finishing');
    assert.equal(await exited, 0, err);
    assert.match(out, /"event":"stopped"/);
    await assert.rejects(fetch(`${url}/health`));
  } finally {
    child.kill('SIGKILL');
  }
});

test('`edgelora serve --help` lists every flag; a non-loopback --host without --api-key-file exits non-zero, saying why', () => {
  const h = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'serve', '--help'], { encoding: 'utf8' });
  assert.equal(h.status, 0, h.stderr);
  for (const f of ['--model', '--host', '--port', '--model-id', '--adapter', '--max-batch', '--max-queue', '--ctx', '--api-key-file', '--body-limit', '--shutdown-timeout', '--profile', '--profile-set', '--json-log']) {
    assert.match(h.stdout, new RegExp(`^\\s+${f} `, 'm'), `--help does not describe ${f}`);
  }
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'serve', '--model', modelDir, '--host', '0.0.0.0', '--port', '0'], { encoding: 'utf8' });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /would expose the API/);
  assert.match(r.stderr, /--api-key-file/);
});
