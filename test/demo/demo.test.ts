// The demo as a new user meets it: a fresh clone of the repository, `npm ci`, `npm start`. Checked
// from the outside: exit code, the personalized answers on both devices (and not from the base), and
// both devices' adapter files byte-identical to the adapter device-a trained.
// npm ci runs --prefer-offline: the packages come from the npm cache that the outer `npm ci` just
// filled (--offline is not usable: npm 11 leaves "resolved" out of the lockfile and then asks for
// packuments in a form the cache may not hold).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { readdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tempDir } from '../helpers/fixtures.js';

test('fresh clone: npm ci && npm start personalizes device-a and syncs the adapter to device-b', { timeout: 600_000 }, () => {
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
    for (const d of ['device-a', 'device-b']) {
      assert.match(out, new RegExp(`${d}: My name is →" Anouk`), `${d} must answer with the user's name`);
      assert.match(out, new RegExp(`${d}: Where do I live\\? →"[^"]*Valparaiso`), `${d} must answer with the user's city`);
    }
    const base = out.split('\n').filter((l) => l.includes('the base'));
    assert.ok(base.length >= 2 && base.every((l) => !l.includes('Anouk') && !l.includes('Valparaiso')), 'the base must not know the user');
    // The adapter files, byte for byte.
    const run = path.join(clone, '.cache/demo/run');
    const files = (dev: string) => {
      const dirs = readdirSync(path.join(run, dev, 'adapters'));
      assert.equal(dirs.length, 1, `${dev} holds one adapter`);
      return path.join(run, dev, 'adapters', dirs[0]!);
    };
    for (const f of ['adapter_config.json', 'adapter_model.safetensors', 'edgelora_adapter.json']) {
      const trained = readFileSync(path.join(run, 'device-a-personal', f));
      assert.ok(readFileSync(path.join(files('device-a'), f)).equals(trained), `device-a's ${f} equals the trained one`);
      assert.ok(readFileSync(path.join(files('device-b'), f)).equals(trained), `device-b's ${f} equals the trained one`);
    }
  } finally {
    tmp.cleanup();
  }
});
