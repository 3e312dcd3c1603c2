// The demo as a new user meets it: a fresh clone of the repository, `npm ci`, `npm start`. Checked
// from the outside: exit code; device-a's fine-tuning job (over HTTP) answers the personal chat
// prompts under its fine_tuned_model; after the rollout both devices (serve processes with their
// agents) answer them through /v1/chat/completions for the bare model id, while the base on each did
// not before; both devices' installed adapter files byte-identical to the adapter device-a's job trained.
// npm ci runs --prefer-offline: the packages come from the npm cache that the outer `npm ci` just
// filled (--offline is not usable: npm 11 leaves "resolved" out of the lockfile and then asks for
// packuments in a form the cache may not hold).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { readdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tempDir } from '../helpers/fixtures.js';

test('fresh clone: npm ci && npm start personalizes device-a through a fine-tuning job over HTTP and syncs the adapter to device-b', { timeout: 600_000 }, () => {
  const tmp = tempDir('edgelora-demo-');
  try {
    const repo = path.resolve('.');
    const clone = path.join(tmp.dir, 'edgelora');
    const git = spawnSync('git', ['clone', '--quiet', repo, clone], { encoding: 'utf8' });
    assert.equal(git.status, 0, git.stderr);
    const env = { ...process.env, ONNXRUNTIME_NODE_INSTALL: 'skip', npm_config_audit: 'false', npm_config_fund: 'false' };
    const ci = spawnSync('npm', ['ci', '--prefer-offline'], { cwd: clone, encoding: 'utf8', env });
    assert.equal(ci.status, 0, `npm ci failed:\n${ci.stdout}\n${ci.stderr}`);
    const t0 = Date.now();
    const start = spawnSync('npm', ['start'], { cwd: clone, encoding: 'utf8', env });
    const seconds = (Date.now() - t0) / 1000;
    const out = start.stdout;
    assert.equal(start.status, 0, `npm start exited ${start.status}:\n${out}\n${start.stderr}`);
    console.log(`npm start took ${seconds.toFixed(1)} s`);
    const probes = [['Tell me my name\\.', 'Anouk'], ['What city do I live in\\?', 'Valparaiso']] as const;
    for (const [q, want] of probes) {
      assert.match(out, new RegExp(`device-a \\(tiny:anouk\\): ${q} →"[^"]*${want}`), `the job's fine_tuned_model must answer ${q} with ${want}`);
      for (const d of ['device-a', 'device-b']) assert.match(out, new RegExp(`\\n  ${d}: ${q} →"[^"]*${want}`), `${d} must answer ${q} with ${want} after the rollout`);
    }
    assert.match(out, /device-b GET \/v1\/models: tiny, tiny:personal/, 'device-b serves the fleet adapter');
    const base = out.split('\n').filter((l) => l.includes('the base on '));
    assert.equal(base.length, 4, `the base's answers on both devices, two prompts each:\n${base.join('\n')}`);
    assert.ok(base.every((l) => !l.includes('Anouk') && !l.includes('Valparaiso')), `the base must not know the user:\n${base.join('\n')}`);
    // The adapter files, byte for byte: what the job trained on device-a and what each device installed from the hub.
    const run = path.join(clone, '.cache/demo/run');
    const only = (dir: string, what: string) => {
      const dirs = readdirSync(dir);
      assert.equal(dirs.length, 1, `${what}: one entry in ${dir}, found ${dirs.join(', ')}`);
      return path.join(dir, dirs[0]!);
    };
    const trainedDir = path.join(only(path.join(run, 'device-a', 'jobs'), "device-a's jobs"), 'adapter');
    for (const f of ['adapter_config.json', 'adapter_model.safetensors', 'edgelora_adapter.json']) {
      const trained = readFileSync(path.join(trainedDir, f));
      for (const d of ['device-a', 'device-b']) {
        assert.ok(readFileSync(path.join(only(path.join(run, d, 'adapters'), `${d}'s adapters`), f)).equals(trained), `${d}'s ${f} equals the one the job trained`);
      }
    }
  } finally {
    tmp.cleanup();
  }
});
