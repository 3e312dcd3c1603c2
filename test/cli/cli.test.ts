// The CLI as a user meets it: --help on every command, --json output, errors with non-zero exits.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { runCli as cli } from '../helpers/cli-process.js';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { commands } from '../../src/cli/commands/index.js';

const tmp = tempDir();
let model = '';

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  model = await quantized(hf, tmp.dir, 'nf4', { format: 'nf4' });
});
after(() => tmp.cleanup());

test('every command answers --help with its usage and exit 0', () => {
  for (const c of commands) {
    const r = cli([...c.name.split(' '), '--help']);
    assert.equal(r.code, 0, `${c.name} --help exited ${r.code}: ${r.stderr}`);
    assert.match(r.stdout, /Usage: edgelora/, `${c.name} --help prints a usage line`);
  }
});

test('generate --json prints text, token ids, prefill ms and decode tokens/s; greedy is deterministic', () => {
  const args = ['generate', '--model', model, '--prompt', 'Hello', '--max-new-tokens', '6', '--json'];
  const a = cli(args);
  assert.equal(a.code, 0, a.stderr);
  const o = JSON.parse(a.stdout) as Record<string, unknown>;
  for (const k of ['text', 'token_ids', 'prefill_ms', 'decode_tokens_per_s']) assert.ok(k in o, `missing ${k}`);
  assert.equal((o.token_ids as number[]).length, 6);
  const b = JSON.parse(cli(args).stdout) as Record<string, unknown>;
  assert.deepEqual(b.token_ids, o.token_ids);
});

test('eval --json prints loss, perplexity and tokens', async () => {
  const data = path.join(tmp.dir, 'd.jsonl');
  await fs.writeFile(data, JSON.stringify({ text: 'a small test row' }) + '\n');
  const r = cli(['eval', '--model', model, '--data', data, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const o = JSON.parse(r.stdout) as { loss: number; perplexity: number; tokens: number };
  assert.ok(o.loss > 0 && Math.abs(o.perplexity - Math.exp(o.loss)) < 1e-6 * o.perplexity && o.tokens > 0);
});

test('errors name the problem and exit non-zero', () => {
  const r1 = cli(['generate', '--prompt', 'x']);
  assert.notEqual(r1.code, 0);
  assert.match(r1.stderr, /--model/);
  const r2 = cli(['generate', '--model', path.join(tmp.dir, 'nope'), '--prompt', 'x']);
  assert.notEqual(r2.code, 0);
  assert.match(r2.stderr, /nope/);
  const r3 = cli(['generate', '--model', model, '--prompt', 'x', '--top-p', '0']);
  assert.notEqual(r3.code, 0);
  assert.match(r3.stderr, /--top-p/);
  const r4 = cli(['frobnicate']);
  assert.equal(r4.code, 2);
});
