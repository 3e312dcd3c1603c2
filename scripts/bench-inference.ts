// npm run bench:inference — fp32 vs nf4 vs int4 on the `small` demo model, side by side in one run:
// size on disk, peak RSS after load, prefill tokens/s (128-token prompt), decode tokens/s (128 new
// tokens). Each format runs in its own child process so RSS is per format. Writes bench-results/inference.json.
import { benchModel, runChild, printTable, writeJson, dirBytes, peakRssMiB } from './bench-common.js';
import type { QuantFormat } from '../src/model/weights.js';

interface Row {
  format: QuantFormat;
  disk_mib: number;
  rss_after_load_mib: number;
  peak_rss_mib: number;
  prefill_tok_s: number;
  decode_tok_s: number;
}

const PROMPT_TOKENS = 128;
const NEW_TOKENS = 128;

async function child(format: QuantFormat, dir: string): Promise<void> {
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { argmax } = await import('../src/runtime/sampling.js');
  const model = await ModelRuntime.load(dir);
  const rssAfterLoad = process.memoryUsage().rss / 2 ** 20;
  const V = model.cfg.vocabSize;
  const prompt = Array.from({ length: PROMPT_TOKENS }, (_, i) => (i * 7919 + 13) % 250 + 3);
  // Warm-up (ORT builds kernels on first run), not timed.
  await model.forward({ ids: [prompt.slice(0, 8)] });
  const reps = 3;
  let prefillMs = Infinity;
  let res = await model.forward({ ids: [prompt] });
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    res = await model.forward({ ids: [prompt] });
    prefillMs = Math.min(prefillMs, performance.now() - t0);
  }
  let next = argmax(res.logits.subarray((PROMPT_TOKENS - 1) * V, PROMPT_TOKENS * V));
  let cache = res.cache;
  const t1 = performance.now();
  for (let i = 0; i < NEW_TOKENS; i++) {
    const step = await model.forward({ ids: [[next]], cache });
    cache = step.cache;
    next = argmax(step.logits.subarray(0, V));
  }
  const decodeS = (performance.now() - t1) / 1000;
  const row: Row = {
    format,
    disk_mib: (await dirBytes(dir)) / 2 ** 20,
    rss_after_load_mib: rssAfterLoad,
    peak_rss_mib: peakRssMiB(),
    prefill_tok_s: PROMPT_TOKENS / (prefillMs / 1000),
    decode_tok_s: NEW_TOKENS / decodeS,
  };
  process.stdout.write(JSON.stringify(row) + '\n');
}

async function main(): Promise<void> {
  if (process.argv[2] === '--child') return child(process.argv[3] as QuantFormat, process.argv[4]!);
  const formats: QuantFormat[] = ['fp32', 'nf4', 'int4'];
  const rows: Row[] = [];
  for (const f of formats) {
    const dir = await benchModel(f);
    rows.push(await runChild<Row>(new URL(import.meta.url).pathname, ['--child', f, dir]));
  }
  printTable(rows as unknown as Record<string, string | number>[]);
  const fp32 = rows.find((r) => r.format === 'fp32')!;
  const ratios = rows.map((r) => ({
    format: r.format,
    decode_vs_fp32: r.decode_tok_s / fp32.decode_tok_s,
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
  process.stdout.write(`\ntargets: ${JSON.stringify(targets)}\n`);
  const file = await writeJson('inference.json', {
    preset: 'small',
    prompt_tokens: PROMPT_TOKENS,
    new_tokens: NEW_TOKENS,
    rows,
    ratios,
    targets,
  });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
