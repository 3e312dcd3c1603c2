// Shared pieces of the benchmark scripts: cached demo models, child-process measurement (so peak
// RSS is per configuration), and table/JSON output.
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { spawn } from 'node:child_process';
import { makeDemoModel } from '../src/formats/demo-model.js';
import { quantizeModel, DEFAULT_BLOCK_SIZE } from '../src/model/quantize.js';
import type { QuantFormat, EmbeddingFormat } from '../src/model/weights.js';
import { readManifest, MODEL_FORMAT } from '../src/model/manifest.js';

export const CACHE = path.resolve('.cache/bench');

/**
 * The `small` demo checkpoint and its quantized variants, made once and cached. `embeddings` is the
 * vocabulary table's storage (default float, what the other benchmarks have always measured;
 * `edgelora quantize` itself defaults to int8 for the 4-bit formats).
 */
export async function benchModel(format: QuantFormat, preset: 'small' | 'tiny' = 'small', blockSize = DEFAULT_BLOCK_SIZE[format], embeddings: EmbeddingFormat = 'float'): Promise<string> {
  const hf = path.join(CACHE, `${preset}-hf`);
  if (!existsSync(hf)) {
    process.stderr.write(`making the ${preset} demo checkpoint in ${hf}…\n`);
    await makeDemoModel(hf, { preset, seed: 0 });
  }
  const out = path.join(CACHE, `${preset}-${format}${blockSize === DEFAULT_BLOCK_SIZE[format] ? '' : `-bs${blockSize}`}${embeddings === 'float' ? '' : `-emb-${embeddings}`}`);
  // A model written by another edgelora model format is re-made, not benchmarked.
  const stale = existsSync(out) && (await readManifest(out).then((m) => m.format !== MODEL_FORMAT, () => true));
  if (stale) await fs.rm(out, { recursive: true, force: true });
  if (!existsSync(out)) {
    process.stderr.write(`quantizing ${preset} to ${format}…\n`);
    await quantizeModel(hf, out, { format, blockSize, doubleQuant: false, embeddings });
  }
  return out;
}

/**
 * Bundles a benchmark script with esbuild, as the CLI is bundled, so a child measures the runtime as
 * shipped (under tsx a child carries ~45 MiB of TypeScript tooling in its RSS).
 */
export async function bundleScript(script: string): Promise<string> {
  const { build } = await import('esbuild');
  const out = path.join(CACHE, `${path.basename(script, '.ts')}.bundle.mjs`);
  await fs.mkdir(CACHE, { recursive: true });
  await build({
    entryPoints: [script],
    outfile: out,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'esm',
    external: ['onnxruntime-node', 'esbuild', 'tsx'],
    banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
    logLevel: 'warning',
  });
  return out;
}

/**
 * Runs `node <script> <args>` (a .mjs bundle) or `node --import tsx <script> <args>` (a .ts file)
 * and parses the last stdout line as JSON.
 */
export function runChild<T>(script: string, args: string[]): Promise<T> {
  return new Promise((resolve, reject) => {
    const argv = script.endsWith('.ts') ? ['--import', 'tsx', script, ...args] : [script, ...args];
    const p = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`${script} ${args.join(' ')} exited ${code}`));
      const last = out.trim().split('\n').pop() ?? '';
      try {
        resolve(JSON.parse(last) as T);
      } catch {
        reject(new Error(`${script}: no JSON result in: ${out.slice(-500)}`));
      }
    });
  });
}

export function printTable(rows: Record<string, string | number>[]): void {
  if (rows.length === 0) return;
  const cols = Object.keys(rows[0]!);
  const fmt = (v: string | number) => (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : v);
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c] ?? '').length)));
  const line = (cells: string[]) => cells.map((s, i) => s.padStart(widths[i]!)).join('  ');
  process.stdout.write(line(cols) + '\n' + line(widths.map((w) => '-'.repeat(w))) + '\n');
  for (const r of rows) process.stdout.write(line(cols.map((c) => fmt(r[c] ?? ''))) + '\n');
}

/** Writes bench-results/<name> with the machine it was measured on and when. */
export async function writeJson(name: string, data: Record<string, unknown>): Promise<string> {
  const dir = path.resolve('bench-results');
  await fs.mkdir(dir, { recursive: true });
  const file = path.join(dir, name);
  const machine = { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, node: process.version };
  await fs.writeFile(file, JSON.stringify({ ...data, machine, measured_at: new Date().toISOString() }, null, 2) + '\n');
  return file;
}

export async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await fs.readdir(dir)) n += (await fs.stat(path.join(dir, f))).size;
  return n;
}

export function peakRssMiB(): number {
  return process.resourceUsage().maxRSS / 1024; // maxRSS is in KiB
}

/** The deterministic prompt every generation benchmark feeds (llama.cpp's child gets the same ids). */
export function benchPrompt(tokens: number): number[] {
  return Array.from({ length: tokens }, (_, i) => ((i * 7919 + 13) % 250) + 3);
}

/**
 * One generation measurement, the same in every bench child: an untimed warm-up (ORT builds kernels
 * on the first run), the best of `prefillRepeats` prefills of `prompt`, then `newTokens` greedy
 * decode steps. Returns the best prefill in ms and the decode time in seconds.
 */
export async function timeGreedyRun(
  model: import('../src/runtime/model.js').ModelRuntime,
  prompt: number[],
  newTokens: number,
  prefillRepeats = 3,
): Promise<{ prefillMs: number; decodeS: number }> {
  const { argmax } = await import('../src/runtime/sampling.js');
  const V = model.cfg.vocabSize;
  const reserve = prompt.length + newTokens;
  await model.forward({ ids: [prompt.slice(0, 8)], logits: 'last' });
  let prefillMs = Infinity;
  let res = await model.forward({ ids: [prompt], logits: 'last', reserve });
  for (let r = 0; r < prefillRepeats; r++) {
    const t0 = performance.now();
    res = await model.forward({ ids: [prompt], logits: 'last', reserve });
    prefillMs = Math.min(prefillMs, performance.now() - t0);
  }
  let next = argmax(res.logits.subarray(0, V));
  let cache = res.cache;
  const t1 = performance.now();
  for (let i = 0; i < newTokens; i++) {
    const step = await model.forward({ ids: [[next]], cache });
    cache = step.cache;
    next = argmax(step.logits.subarray(0, V));
  }
  return { prefillMs, decodeS: (performance.now() - t1) / 1000 };
}
