// `edgelora finetune` on bad input: each case fails with an error naming the line or the flag, and
// leaves no adapter directory behind; a row longer than --seq-len is truncated with a warning naming
// its line; a plan over --memory-budget is refused with what to lower.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { finetuneCommand } from '../../src/cli/commands/finetune.js';
import { finetune } from '../../src/train/trainer.js';
import { EdgeloraError } from '../../src/util/errors.js';
import { makePeftConfig, saveAdapter } from '../../src/adapters/peft.js';
import { linearShape } from '../../src/model/llama.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { readManifest } from '../../src/model/manifest.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
let root: { dir: string; cleanup: () => void };
let model: string;
let good: string;
before(async () => {
  root = tempDir('edgelora-ftbad-');
  const hf = await tinyCheckpoint(root.dir, 4);
  model = await quantized(hf, root.dir, 'nf4', { format: 'nf4', blockSize: 64 });
  good = await write('good.jsonl', '{"text": "Hello! How are you today?"}\n{"text": "The dog was not amused."}\n');
});
after(() => root.cleanup());

async function write(name: string, text: string): Promise<string> {
  const f = path.join(root.dir, name);
  await fs.writeFile(f, text);
  return f;
}

const exists = (p: string) => fs.stat(p).then(() => true, () => false);

/** Runs the command expecting an EdgeloraError; checks what it names and that --out was not created. */
async function refuses(name: string, args: string[], names: RegExp): Promise<void> {
  const out = path.join(root.dir, `out-${name}`);
  await assert.rejects(
    finetuneCommand.run(['--model', model, '--out', out, '--steps', '1', ...args]),
    (err: unknown) => {
      assert.ok(err instanceof EdgeloraError, `expected an EdgeloraError, got ${String(err)}`);
      const text = err.describe();
      assert.match(text, names, `error does not name ${names}: ${text}`);
      return true;
    },
  );
  assert.equal(await exists(out), false, `${name}: --out directory left behind`);
  assert.equal(await exists(`${out}.checkpoint`), false, `${name}: checkpoint left behind`);
}

test('invalid JSON: error names the file and line', async () => {
  const f = await write('badjson.jsonl', '{"text": "fine"}\n{"text": "broken"\n');
  await refuses('badjson', ['--data', f], /badjson\.jsonl:2.*invalid JSON/);
});

test('a row with no usable field: error names the line', async () => {
  const f = await write('nofield.jsonl', '{"text": "fine"}\n{"txt": "typo"}\n');
  await refuses('nofield', ['--data', f], /nofield\.jsonl:2.*no usable field/);
});

test('an empty file is refused', async () => {
  const f = await write('empty.jsonl', '\n\n');
  await refuses('empty', ['--data', f], /empty\.jsonl.*no rows/);
});

test('--rank 0 and a negative --lr name the flag', async () => {
  await refuses('rank0', ['--data', good, '--rank', '0'], /--rank/);
  await refuses('neglr', ['--data', good, '--lr=-0.001'], /--lr/);
  await refuses('badtarget', ['--data', good, '--targets', 'q_proj,foo_proj'], /--targets.*foo_proj/);
});

test('--init-adapter made for another base is refused', async () => {
  const manifest = await readManifest(model);
  const cfg = parseHfConfig(manifest.sourceConfig, model);
  const { N, K } = linearShape(cfg, 'q_proj');
  const other = path.join(root.dir, 'other-base-adapter');
  await saveAdapter(other, {
    config: makePeftConfig({ r: 2, alpha: 4, targets: ['q_proj'] }),
    modules: [...Array(cfg.numLayers).keys()].map((layer) => ({ layer, proj: 'q_proj' as const, r: 2, alpha: 4, scale: 2, a: new Float32Array(2 * K), b: new Float32Array(N * 2) })),
    baseFingerprint: 'ab'.repeat(32),
  });
  await refuses('otherbase', ['--data', good, '--init-adapter', other], /another base/);
});

test('a plan over --memory-budget is refused, naming what to lower', async () => {
  // --no-recompute: the profile's default turns recomputation on, and then it is not a way to lower the plan.
  await refuses('budget', ['--data', good, '--memory-budget', '10MB', '--no-recompute'], /--memory-budget[\s\S]*--batch-size[\s\S]*--recompute/);
});

test('a row longer than --seq-len is truncated with a warning naming the line', async () => {
  const long = Array(40).fill('the quick brown fox').join(' ');
  const f = await write('long.jsonl', `{"text": "short row here"}\n{"text": "${long}"}\n`);
  const warnings: string[] = [];
  const out = path.join(root.dir, 'out-long');
  const res = await finetune({ model, data: f, out, seqLen: 16, steps: 1, onWarning: (m) => warnings.push(m) });
  assert.ok(warnings.some((w) => /long\.jsonl:2.*truncated to 16/.test(w)), `warnings: ${JSON.stringify(warnings)}`);
  assert.equal(res.steps, 1);
  assert.ok(await exists(path.join(out, 'adapter_model.safetensors')));
});

test('the CLI exits non-zero with the message on stderr', () => {
  const out = path.join(root.dir, 'out-cli');
  const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(REPO, 'src/cli/main.ts'), 'finetune', '--model', model, '--data', good, '--out', out, '--rank', '0'], { cwd: REPO, encoding: 'utf8' });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /--rank/);
  assert.equal(spawnSync('test', ['-e', out]).status, 1);
});
