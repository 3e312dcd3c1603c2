// Bundles the CLI into dist/cli.js with esbuild; run by scripts/edgelora.mjs when dist/ is missing or stale, and by `npm run build`.
// onnxruntime-node stays external: it ships a native binding that cannot be bundled.
import { build } from 'esbuild';
import { chmod, cp } from 'node:fs/promises';

await build({
  entryPoints: ['src/cli/main.ts'],
  outfile: 'dist/cli.js',
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  sourcemap: true,
  external: ['onnxruntime-node'],
  banner: {
    js: "#!/usr/bin/env node\nimport { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);",
  },
  logLevel: 'warning',
});
await chmod('dist/cli.js', 0o755);
// The hub dashboard's static files (served by `edgelora hub --http`), next to the bundle as the server looks for them.
await cp('src/sync/hub/dashboard', 'dist/dashboard', { recursive: true });
