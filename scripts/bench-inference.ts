// npm run bench:inference — fp32 vs nf4 vs int4 on the `small` demo model, side by side in one run:
// size on disk, RSS after load, peak RSS, prefill tokens/s (128-token prompt, logits for the last
// position, as generation needs), decode tokens/s (128 new tokens). Each measurement is one child
// process (so RSS is per format) running the esbuild bundle, as the CLI ships; ROUNDS rounds visit
// the formats in turn and each figure is the median over rounds, so drift in machine load hits all
// formats alike. An extra row, int4 at block size 128, is informational: the targets are judged on
// the defaults (int4 block 32). estimate_mib is the pre-flight memory plan for the same job, printed
// beside the measured peak. Writes bench-results/inference.json.
import { benchModel, benchPrompt, bundleScript, runChild, printTable, writeJson, dirBytes, peakRssMiB, timeGreedyRun } from './bench-common.js';
import type { QuantFormat } from '../src/model/weights.js';

interface Sample {
  rss_after_load_mib: number;
  peak_rss_mib: number;
  prefill_tok_s: number;
  decode_tok_s: number;
}

interface Row extends Sample {
  format: string;
  disk_mib: number;
  /** The pre-flight memory plan (src/profiles/memory.ts) for this job, to compare with peak_rss_mib. */
  estimate_mib: number;
}

const PROMPT_TOKENS = 128;
const NEW_TOKENS = 128;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

async function child(dir: string): Promise<void> {
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const model = await ModelRuntime.load(dir);
  const rssAfterLoad = process.memoryUsage().rss / 2 ** 20;
  const { prefillMs, decodeS } = await timeGreedyRun(model, benchPrompt(PROMPT_TOKENS), NEW_TOKENS);
  const sample: Sample = {
    rss_after_load_mib: rssAfterLoad,
    peak_rss_mib: peakRssMiB(),
    prefill_tok_s: PROMPT_TOKENS / (prefillMs / 1000),
    decode_tok_s: NEW_TOKENS / decodeS,
  };
  process.stdout.write(JSON.stringify(sample) + '\n');
}

/** The bytes `edgelora generate` would plan for this job before loading the model. */
async function memoryPlan(dir: string): Promise<number> {
  const { readManifest } = await import('../src/model/manifest.js');
  const { parseHfConfig } = await import('../src/formats/hf-config.js');
  const { modelMemoryPlan } = await import('../src/cli/load.js');
  const m = await readManifest(dir);
  return modelMemoryPlan(m, parseHfConfig(m.sourceConfig, dir), { context: PROMPT_TOKENS + NEW_TOKENS, prefillTokens: PROMPT_TOKENS }).bytes;
}

const median = (xs: number[]) => [...xs].sort((p, q) => p - q)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  if (process.argv[2] === '--child') return child(process.argv[3]!);
  const configs: { name: string; format: QuantFormat; blockSize?: number }[] = [
    { name: 'fp32', format: 'fp32' },
    { name: 'nf4', format: 'nf4' },
    { name: 'int4', format: 'int4' },
    { name: 'int4-bs128', format: 'int4', blockSize: 128 },
  ];
  const dirs = new Map<string, string>();
  for (const c of configs) dirs.set(c.name, await benchModel(c.format, 'small', c.blockSize));
  const bundle = await bundleScript(new URL(import.meta.url).pathname);
  const samples = new Map<string, Sample[]>(configs.map((c) => [c.name, []]));
  for (let round = 0; round < ROUNDS; round++) {
    for (const c of configs) {
      const s = await runChild<Sample>(bundle, ['--child', dirs.get(c.name)!]);
      samples.get(c.name)!.push(s);
      process.stderr.write(`round ${round + 1}/${ROUNDS} ${c.name}: decode ${s.decode_tok_s.toFixed(1)} tok/s, peak ${s.peak_rss_mib.toFixed(0)} MiB\n`);
    }
  }
  const rows: Row[] = [];
  for (const c of configs) {
    const ss = samples.get(c.name)!;
    rows.push({
      format: c.name,
      disk_mib: (await dirBytes(dirs.get(c.name)!)) / 2 ** 20,
      estimate_mib: (await memoryPlan(dirs.get(c.name)!)) / 2 ** 20,
      rss_after_load_mib: median(ss.map((s) => s.rss_after_load_mib)),
      peak_rss_mib: median(ss.map((s) => s.peak_rss_mib)),
      prefill_tok_s: median(ss.map((s) => s.prefill_tok_s)),
      decode_tok_s: median(ss.map((s) => s.decode_tok_s)),
    });
  }
  printTable(rows as unknown as Record<string, string | number>[]);
  const fp32 = rows.find((r) => r.format === 'fp32')!;
  // Per-round ratios too: the spread says how far the medians can be trusted on this machine.
  const perRound = (name: string) => samples.get(name)!.map((s, i) => s.decode_tok_s / samples.get('fp32')![i]!.decode_tok_s);
  const ratios = rows.map((r) => ({
    format: r.format,
    decode_vs_fp32: r.decode_tok_s / fp32.decode_tok_s,
    decode_vs_fp32_per_round: perRound(r.format).map((x) => x.toFixed(2)).join(' '),
    peak_rss_vs_fp32: r.peak_rss_mib / fp32.peak_rss_mib,
    rss_after_load_vs_fp32: r.rss_after_load_mib / fp32.rss_after_load_mib,
    disk_vs_fp32: r.disk_mib / fp32.disk_mib,
  }));
  process.stdout.write('\n');
  printTable(ratios as unknown as Record<string, string | number>[]);
  const int4 = ratios.find((r) => r.format === 'int4')!;
  const nf4 = ratios.find((r) => r.format === 'nf4')!;
  const targets = {
    int4_decode_at_least_2x_fp32: int4.decode_vs_fp32 >= 2,
    nf4_peak_rss_at_most_0_35x_fp32: nf4.peak_rss_vs_fp32 <= 0.35,
    int4_peak_rss_at_most_0_35x_fp32: int4.peak_rss_vs_fp32 <= 0.35,
  };
  process.stdout.write(`\ntargets (defaults: int4 block 32): ${JSON.stringify(targets)}\n`);
  const file = await writeJson('inference.json', {
    preset: 'small',
    prompt_tokens: PROMPT_TOKENS,
    new_tokens: NEW_TOKENS,
    rounds: ROUNDS,
    rows,
    ratios,
    samples: Object.fromEntries(samples),
    targets,
  });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
