// The command line's errors, case by case (issue: "the command line as people expect it"): each
// case asserts the exact exit code and the message's key words (the suggested flag, the range, the
// hint). Most run in process through runCli; the two that need a whole model run are spawned once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs, readFileSync } from 'node:fs';
import { spawnSync, execFileSync } from 'node:child_process';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { runCli } from '../../src/cli/run.ts';
import { parseFlags, describeRange } from '../../src/cli/command.ts';
import { finetuneSettings } from '../../src/cli/commands/finetune.ts';
import { writeKeyPair } from '../../src/sync/protocol/signing.ts';
import { readManifest } from '../../src/model/manifest.ts';
import { parseHfConfig } from '../../src/formats/hf-config.ts';
import { finetuneDefaultsSchema } from '../../src/profiles/schema.ts';

const CLI = path.resolve('src/cli/main.ts');
const tmp = tempDir();
let hf = '';
let model = '';
let adapter = '';

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
  model = await quantized(hf, tmp.dir, 'nf4', { format: 'nf4' });
  adapter = path.join(tmp.dir, 'me');
  const m = await readManifest(model);
  await randomAdapter(adapter, parseHfConfig(m.sourceConfig, model), { r: 2, alpha: 4, targets: ['q_proj'], seed: 3, fingerprint: m.fingerprint });
});
after(() => tmp.cleanup());

/** One CLI invocation in process: exit code and what it wrote on stderr (through runCli's io). */
async function cli(...argv: string[]): Promise<{ code: number; err: string; out: string }> {
  const err: string[] = [];
  const out: string[] = [];
  const code = await runCli(argv, { out: (t) => out.push(t), err: (t) => err.push(t) });
  return { code, err: err.join(''), out: out.join('') };
}

const count = (s: string, sub: string) => s.split(sub).length - 1;

test('an unknown flag is exit 1 and names the closest known flag', async () => {
  const r = await cli('generate', '--model', model, '--prompt', 'hi', '--max-new-token', '4');
  assert.equal(r.code, 1);
  assert.match(r.err, /^edgelora generate: error: unknown flag --max-new-token\n/);
  assert.match(r.err, /hint: did you mean --max-new-tokens\?/);
  assert.doesNotMatch(r.err, /To specify a positional argument/, "node's raw parseArgs text is not shown");
  const far = await cli('quantize', '--zzzzzzzz');
  assert.equal(far.code, 1);
  assert.doesNotMatch(far.err, /did you mean/, 'no suggestion when nothing is close');
  assert.match(far.err, /edgelora quantize --help/);
});

test('negative numbers are values: out-of-range ones get the range, allowed ones parse', async () => {
  const t = await cli('generate', '--model', model, '--prompt', 'hi', '--temperature', '-1');
  assert.equal(t.code, 1);
  assert.match(t.err, /--temperature: must be a number ≥ 0, not "-1"/);
  const k = await cli('generate', '--model', model, '--prompt', 'hi', '--top-k', '-3');
  assert.equal(k.code, 1);
  assert.match(k.err, /--top-k: must be an integer ≥ 0, not "-3"/);
  assert.doesNotMatch(t.err + k.err, /ambiguous/);
  const p = parseFlags('x', ['--scale', '-1.5', '--seed', '-.5', '--n=-2'], { scale: { type: 'string' }, seed: { type: 'string' }, n: { type: 'string' } });
  assert.deepEqual({ ...p.values }, { scale: '-1.5', seed: '-.5', n: '-2' });
  // A flag where the value should be is still an error, naming the flag that lacks its value.
  const missing = await cli('generate', '--model', '--prompt', 'hi');
  assert.equal(missing.code, 1);
  assert.match(missing.err, /--model needs a value \(it is followed by the flag --prompt\)/);
});

test('unexpected positional arguments are exit 1, naming the argument and what the command takes', async () => {
  const g = await cli('generate', '--model', model, '--prompt', 'hi', 'extra');
  assert.equal(g.code, 1);
  assert.match(g.err, /unexpected argument "extra"/);
  assert.match(g.err, /it takes no positional arguments/);
  const q = await cli('quantize', hf, path.join(tmp.dir, 'q-out'), 'third');
  assert.equal(q.code, 1);
  assert.match(q.err, /unexpected argument "third"[\s\S]*it takes <hf-dir> <out-dir>/);
  await assert.rejects(fs.stat(path.join(tmp.dir, 'q-out')), 'nothing was written');
});

test('every message names the flag (and the command) once, with the allowed range', async () => {
  const b = await cli('quantize', hf, path.join(tmp.dir, 'b-out'), '--block-size', '7');
  assert.equal(b.code, 1);
  assert.equal(b.err.split('\n')[0], 'edgelora quantize: error: --block-size: must be an integer ≥ 16, not "7"');
  const d = await cli('demo', '--bogus');
  assert.equal(d.code, 1);
  assert.equal(count(d.err, 'edgelora demo:'), 1, d.err);
  assert.doesNotMatch(d.err, /error: edgelora demo/);
  const p = await cli('generate', '--model', model, '--prompt', 'x', '--top-p', '0');
  assert.equal(p.code, 1);
  assert.equal(count(p.err, '--top-p'), 1, p.err);
  assert.match(p.err, /must be a number > 0 and ≤ 1, not "0"/);
  assert.equal(describeRange({ integer: true, min: 0, max: 4 }), 'an integer from 0 to 4');
  assert.equal(describeRange({ min: 0, below: 1 }), 'a number ≥ 0 and < 1');
  const drop = await cli('finetune', '--model', model, '--data', 'examples/personal.jsonl', '--out', path.join(tmp.dir, 'ft-drop'), '--lora-dropout', '1');
  assert.equal(drop.code, 1);
  assert.match(drop.err, /--lora-dropout: must be a number ≥ 0 and < 1, not "1"/);
  const fmt = await cli('quantize', hf, path.join(tmp.dir, 'f-out'), '--format', 'nf5');
  assert.equal(fmt.code, 1);
  assert.match(fmt.err, /--format: must be one of fp32, nf4, fp4, int4, not "nf5"\n {2}hint: did you mean --format nf4\?/);
});

test('unknown commands are exit 2 with the closest command; a bare group lists its subcommands', async () => {
  const c = await cli('genrate', '--model', model);
  assert.equal(c.code, 2);
  assert.match(c.err, /unknown command "genrate"[\s\S]*did you mean `edgelora generate`\?/);
  const s = await cli('adapter', 'inspekt', adapter);
  assert.equal(s.code, 2);
  assert.match(s.err, /did you mean `edgelora adapter inspect`\?/);
  const f = await cli('fleet', '--help');
  assert.equal(f.code, 0);
  assert.match(f.out, /fleet status/);
});

test('output directories and flags are checked before any work; "exists" names --force', async () => {
  const out = path.join(tmp.dir, 'exists');
  await fs.mkdir(out);
  await fs.writeFile(path.join(out, 'keep.txt'), 'mine');
  for (const argv of [
    ['quantize', hf, out],
    ['demo-model', out],
    ['adapter', 'merge', hf, adapter, out],
  ]) {
    const r = await cli(...argv);
    assert.equal(r.code, 1, argv.join(' '));
    assert.match(r.err, /already exists\n {2}hint: pass --force to replace it/, `${argv[0]}: ${r.err}`);
  }
  // Nothing was started: no temporary sibling left behind, the directory untouched.
  assert.deepEqual((await fs.readdir(tmp.dir)).filter((n) => n.includes('exists')), ['exists']);
  assert.equal(readFileSync(path.join(out, 'keep.txt'), 'utf8'), 'mine');
  // A bad flag is refused before the existing directory is even looked at.
  const r = await cli('quantize', hf, out, '--int4-accuracy', '9');
  assert.equal(r.code, 1);
  assert.match(r.err, /--int4-accuracy: must be an integer from 0 to 4, not "9"/);
  const ft = await cli('finetune', '--model', model, '--data', 'examples/personal.jsonl', '--out', out);
  assert.equal(ft.code, 1);
  assert.match(ft.err, /the --out adapter directory already exists[\s\S]*--resume/);
});

test('wrong-kind and missing directories say what they are and which command fits', async () => {
  const missing = await cli('generate', '--model', path.join(tmp.dir, 'missing'), '--prompt', 'x');
  assert.equal(missing.code, 1);
  assert.match(missing.err, /missing: does not exist/);
  const raw = await cli('generate', '--model', hf, '--prompt', 'x');
  assert.equal(raw.code, 1);
  assert.match(raw.err, /is a Hugging Face checkpoint, not a quantized model directory\n {2}hint: quantize it first: `edgelora quantize DIR OUT-DIR`/);
  const insp = await cli('adapter', 'inspect', hf);
  assert.equal(insp.code, 1);
  assert.match(insp.err, /is a Hugging Face checkpoint, not an adapter directory/);
  assert.doesNotMatch(insp.err, /ENOENT/);
  const gone = await cli('adapter', 'inspect', path.join(tmp.dir, 'tiny'));
  assert.equal(gone.code, 1);
  assert.match(gone.err, /tiny: does not exist/);
  const q = await cli('quantize', model, path.join(tmp.dir, 'qq'));
  assert.equal(q.code, 1);
  assert.match(q.err, /is a quantized model directory, not a Hugging Face checkpoint[\s\S]*already quantized/);
});

test('--adapter DIR:SCALE with a bad scale says "bad scale" before the model is loaded', async () => {
  const r = await cli('generate', '--model', model, '--prompt', 'x', '--adapter', `${adapter}:abc`);
  assert.equal(r.code, 1);
  assert.match(r.err, /--adapter: bad scale "abc" in .*me:abc[\s\S]*hint: write DIR:SCALE with a number, e\.g\. .*me:0\.5/);
  const neg = await cli('generate', '--model', model, '--prompt', 'x', '--adapter', `${adapter}:-0.5`, '--max-new-tokens', '1', '--json');
  assert.equal(neg.code, 0, neg.err);
});

test("keygen refuses a git work tree that does not ignore *.key, unless asked or ignored", async () => {
  const repo = path.join(tmp.dir, 'repo');
  await fs.mkdir(repo);
  execFileSync('git', ['init', '-q'], { cwd: repo });
  const refused = await cli('keygen', path.join(repo, 'keys', 'hub'));
  assert.equal(refused.code, 1);
  assert.match(refused.err, /inside the git work tree .*repo, where git does not ignore it[\s\S]*add \*\.key to \.gitignore, or pass --allow-work-tree/);
  await assert.rejects(fs.stat(path.join(repo, 'keys', 'hub.key')));
  const asked = await cli('keygen', path.join(repo, 'keys', 'asked'), '--allow-work-tree', '--json');
  assert.equal(asked.code, 0, asked.err);
  await fs.writeFile(path.join(repo, '.gitignore'), '*.key\n');
  const ignored = await cli('keygen', path.join(repo, 'keys', 'hub'), '--json');
  assert.equal(ignored.code, 0, ignored.err);
  assert.equal((await fs.stat(path.join(repo, 'keys'))).mode & 0o777, 0o700);
  const outside = await cli('keygen', path.join(tmp.dir, 'plain', 'hub'), '--json');
  assert.equal(outside.code, 0, outside.err);
});

test("agent --trust given the hub's private key is refused; hub --key given the public one too", async () => {
  const k = await writeKeyPair(path.join(tmp.dir, 'hubkey'));
  const r = await cli('agent', '--broker', 'mqtt://127.0.0.1:9', '--device-id', 'd1', '--fleet', 'f', '--state', path.join(tmp.dir, 'st'), '--trust', k.keyFile);
  assert.equal(r.code, 1);
  assert.match(r.err, /this is the hub's private key; give the \.pub/);
  const h = await cli('hub', '--broker', 'mqtt://127.0.0.1:9', '--store', path.join(tmp.dir, 'store'), '--key', k.pubFile);
  assert.equal(h.code, 1);
  assert.match(h.err, /not a PEM private key: this is a public key[\s\S]*give the \.key file/);
});

test("finetune's defaults are the profile's (what doctor shows); a flag overrides one", async () => {
  const profile = finetuneDefaultsSchema.parse(JSON.parse(readFileSync('device-profiles/jetson-orin-nano-8gb.json', 'utf8')).finetune);
  const s = await finetuneSettings(model, {}, profile, false);
  assert.deepEqual(
    { b: s.batchSize.value, r: s.rank?.value, a: s.alpha?.value, t: s.targets?.value, rc: s.recompute.value },
    { b: profile.batchSize, r: profile.rank, a: profile.alpha, t: profile.targets, rc: profile.recompute },
  );
  assert.equal(s.seqLen.value, Math.min(profile.seqLen, 512), 'capped at the tiny model context');
  const f = await finetuneSettings(model, { rank: 3, recompute: !profile.recompute }, profile, false);
  assert.deepEqual([f.rank?.value, f.rank?.from, f.recompute.value, f.recompute.from, f.batchSize.from], [3, 'flag', !profile.recompute, 'flag', 'profile']);
  const cont = await finetuneSettings(model, {}, profile, true);
  assert.equal(cont.rank, undefined, "--init-adapter keeps the adapter's own rank");
});

test('finetune --json reports the settings it used, from the profile the run resolved (one run, spawned)', () => {
  const out = path.join(tmp.dir, 'ft');
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'finetune', '--model', model, '--data', 'examples/personal.jsonl', '--out', out, '--steps', '1', '--profile', 'generic-x86-64', '--rank', '4', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const o = JSON.parse(r.stdout) as { profile: string; settings: Record<string, unknown>; settings_from: Record<string, string> };
  const ft = JSON.parse(readFileSync('device-profiles/generic-x86-64.json', 'utf8')).finetune as Record<string, unknown>;
  assert.equal(o.profile, 'generic-x86-64');
  assert.deepEqual(
    { rank: o.settings.rank, alpha: o.settings.alpha, targets: o.settings.targets, batch: o.settings.batch_size, seq: o.settings.seq_len, rc: o.settings.recompute },
    { rank: 4, alpha: ft.alpha, targets: ft.targets, batch: ft.batchSize, seq: ft.seqLen, rc: ft.recompute },
  );
  assert.equal(o.settings_from.rank, 'flag');
  assert.equal(o.settings_from.batchSize, 'profile');
});

test('--max-new-tokens past the context is clamped with a one-line notice (one run, spawned)', () => {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'generate', '--model', model, '--prompt', 'Hello there', '--max-new-tokens', '100000', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const o = JSON.parse(r.stdout) as { prompt_ids: number[]; token_ids: number[]; max_new_tokens: number };
  const expected = 512 - o.prompt_ids.length; // the tiny preset's context
  assert.equal(o.max_new_tokens, expected);
  assert.ok(o.token_ids.length <= expected);
  const notices = r.stderr.split('\n').filter((l) => l.startsWith('notice:'));
  assert.deepEqual(notices, [`notice: --max-new-tokens 100000 clamped to ${expected}: the model's context is 512 tokens and the prompt takes ${o.prompt_ids.length}`]);
});

test('npm reads the project .npmrc without an unknown-config warning, and install scripts are off', () => {
  const r = spawnSync('npm', ['config', 'get', 'ignore-scripts'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'true');
  assert.doesNotMatch(r.stderr, /Unknown (project|user|global|env|cli) config/);
});
