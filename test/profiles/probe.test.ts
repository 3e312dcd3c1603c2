// The real execution-provider prober against the installed onnxruntime-node, and `edgelora doctor --json` on a fake
// Orin Nano root. Each probe is a child process creating a one-node session (well under a second for CPU).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ortProber } from '../../src/profiles/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('ortProber runs a session on CPU and reports CUDA honestly either way', async () => {
  const report = await ortProber({ timeoutMs: 60_000 })(['cpu', 'cuda']);
  const cpu = report.probes.find((p) => p.name === 'cpu');
  assert.equal(cpu?.available, true, cpu?.detail);
  assert.match(cpu?.detail ?? '', /CPUExecutionProvider/);
  assert.ok(report.listed.some((l) => l.name === 'cpu'), JSON.stringify(report.listed));
  assert.match(report.ortVersion ?? '', /^\d+\.\d+\.\d+/);
  const cuda = report.probes.find((p) => p.name === 'cuda');
  assert.ok(cuda);
  // This machine's npm build has no CUDA libraries; where it does, the profiler must have seen the CUDA provider.
  if (cuda.available) assert.match(cuda.detail, /CUDAExecutionProvider/);
  else assert.ok(cuda.detail.length > 0, 'a missing provider says why');
});

test('edgelora doctor --json on a fake Orin Nano root picks the Orin Nano profile and plans the providers it probed', () => {
  const script = `import { doctorCommand } from './src/cli/commands/doctor.ts'; process.exitCode = await doctorCommand.run(process.argv.slice(1));`;
  const args = ['--import', 'tsx', '--input-type=module', '-e', script, '--', '--json', '--root', 'test/profiles/fixtures/orin-nano-8gb', '--arch', 'arm64', '--cpus', '6'];
  const r = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as {
    facts: { model: string; l4t: { major: number }; cpus: number };
    onnxruntime: { probes: { name: string; available: boolean }[] };
    profile: { id: string; memoryBudgetBytes: number; providers: { use: string[] }; sessionOptions: { intraOpNumThreads: number } };
  };
  assert.equal(out.facts.model, 'NVIDIA Jetson Orin Nano Developer Kit');
  assert.equal(out.facts.l4t.major, 36);
  assert.equal(out.profile.id, 'jetson-orin-nano-8gb');
  assert.equal(out.profile.memoryBudgetBytes, 5.2e9);
  assert.equal(out.profile.sessionOptions.intraOpNumThreads, 6);
  const available = out.onnxruntime.probes.filter((p) => p.available).map((p) => p.name);
  assert.deepEqual(out.profile.providers.use, ['tensorrt', 'cuda', 'cpu'].filter((n) => available.includes(n)));
  const bad = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, '--', '--bogus'], { cwd: root, encoding: 'utf8' });
  assert.notEqual(bad.status, 0);
});
