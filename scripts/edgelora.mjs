#!/usr/bin/env node
// The `edgelora` command (package.json "bin"; `npm start` runs `edgelora demo` through it): runs
// the bundle dist/cli.js, building it first when it is missing or older than a file under src/.
// Why here and not at install: .npmrc sets ignore-scripts, so `npm ci` runs no lifecycle script at
// all (onnxruntime-node's postinstall would download CUDA binaries from outside the npm registry),
// and the project's own `prepare` does not run either.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const bundle = path.join(root, 'dist', 'cli.js');

/** The newest modification time of any file under `dir` (0 when it does not exist: a published package has no src/). */
function newest(dir) {
  if (!existsSync(dir)) return 0;
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
  }
  return t;
}

if (!existsSync(bundle) || statSync(bundle).mtimeMs < newest(path.join(root, 'src'))) {
  const build = path.join(root, 'scripts', 'build.mjs');
  try {
    execFileSync(process.execPath, [build], { cwd: root, stdio: ['ignore', 'ignore', 'inherit'] });
  } catch {
    process.stderr.write(`edgelora: error: cannot build ${bundle}\n  hint: run \`npm ci\` in ${root} (esbuild is a dev dependency), then \`npm run build\`\n`);
    process.exit(1);
  }
}
await import(pathToFileURL(bundle).href);
