// npm run bench:finetune — training throughput and peak memory on the `small` demo model: fp32, nf4 and
// int4 bases side by side in one run, rank 8 on q/v and rank 16 on all seven projections, batch 4 ×
// seq-len 256 (plus nf4 all-linear with --recompute). Each configuration runs in its own child process
// so peak RSS is per configuration. tokens/s counts real (non-padding) tokens over the timed steps
// (the first step, which includes ORT's warm-up, is not timed). Writes bench-results/finetune.json.
import os from 'node:os';
import path from 'node:path';
import { promises as fs, mkdtempSync } from 'node:fs';
import { benchModel, runChild, printTable, writeJson, peakRssMiB, CACHE } from './bench-common.js';
import type { QuantFormat } from '../src/model/weights.js';
import type { Proj } from '../src/model/llama.js';

const BATCH = 4;
const SEQ_LEN = 256;
const STEPS = Number(process.env.BENCH_FT_STEPS ?? 3); // first one untimed

interface Config {
  base: QuantFormat;
  lora: 'r8 q,v' | 'r16 all-linear';
  recompute: boolean;
}

interface Row {
  base: QuantFormat;
  lora: string;
  recompute: string;
  tok_s: number;
  s_per_step: number;
  peak_rss_mib: number;
  estimated_mib: number;
  lora_params: number;
  final_loss: number;
}

async function trainingData(): Promise<string> {
  const file = path.join(CACHE, 'finetune-data.jsonl');
  const words = 'the robot reads books about the sea and the mountains when it is raining and looks out of the window'.split(' ');
  const rows: string[] = [];
  for (let r = 0; r < 16; r++) {
    const text = Array.from({ length: 400 }, (_, i) => words[(i * 7 + r * 3) % words.length]).join(' ');
    rows.push(JSON.stringify({ text }));
  }
  await fs.mkdir(CACHE, { recursive: true });
  await fs.writeFile(file, rows.join('\n') + '\n');
  return file;
}

async function child(cfg: Config, dir: string, data: string): Promise<void> {
  const { finetune } = await import('../src/train/trainer.js');
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'edgelora-bench-ft-'));
  try {
    const targets: Proj[] = cfg.lora === 'r8 q,v' ? ['q_proj', 'v_proj'] : ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
    const res = await finetune({
      model: dir,
      data,
      out: path.join(tmp, 'adapter'),
      rank: cfg.lora === 'r8 q,v' ? 8 : 16,
      alpha: cfg.lora === 'r8 q,v' ? 16 : 32,
      targets,
      steps: STEPS,
      batchSize: BATCH,
      seqLen: SEQ_LEN,
      recompute: cfg.recompute,
    });
    const timed = res.log.slice(1);
    const tokens = timed.reduce((s, e) => s + e.tokens, 0);
    const seconds = timed.reduce((s, e) => s + e.seconds, 0);
    const row: Row = {
      base: cfg.base,
      lora: cfg.lora,
      recompute: cfg.recompute ? 'yes' : 'no',
      tok_s: tokens / seconds,
      s_per_step: seconds / timed.length,
      peak_rss_mib: peakRssMiB(),
      estimated_mib: res.memory.bytes / 2 ** 20,
      lora_params: res.parameters,
      final_loss: res.finalLoss,
    };
    process.stdout.write(JSON.stringify(row) + '\n');
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (process.argv[2] === '--child') return child(JSON.parse(process.argv[3]!) as Config, process.argv[4]!, process.argv[5]!);
  const data = await trainingData();
  const configs: Config[] = [];
  for (const lora of ['r8 q,v', 'r16 all-linear'] as const) for (const base of ['fp32', 'nf4', 'int4'] as QuantFormat[]) configs.push({ base, lora, recompute: false });
  configs.push({ base: 'nf4', lora: 'r16 all-linear', recompute: true });
  const rows: Row[] = [];
  for (const c of configs) {
    const dir = await benchModel(c.base);
    process.stderr.write(`training ${c.base} ${c.lora}${c.recompute ? ' --recompute' : ''}…\n`);
    rows.push(await runChild<Row>(new URL(import.meta.url).pathname, ['--child', JSON.stringify(c), dir, data]));
  }
  printTable(rows as unknown as Record<string, string | number>[]);
  const ratios = rows.filter((r) => r.recompute === 'no').map((r) => {
    const fp32 = rows.find((x) => x.base === 'fp32' && x.lora === r.lora && x.recompute === 'no')!;
    return { base: r.base, lora: r.lora, tok_s_vs_fp32: r.tok_s / fp32.tok_s, peak_rss_vs_fp32: r.peak_rss_mib / fp32.peak_rss_mib };
  });
  process.stdout.write('\n');
  printTable(ratios as unknown as Record<string, string | number>[]);
  const nf4 = ratios.filter((r) => r.base === 'nf4');
  const targets = {
    nf4_peak_rss_at_most_0_4x_fp32: nf4.every((r) => r.peak_rss_vs_fp32 <= 0.4),
    nf4_tok_s_at_least_0_7x_fp32: nf4.every((r) => r.tok_s_vs_fp32 >= 0.7),
  };
  process.stdout.write(`\ntargets: ${JSON.stringify(targets)}\n`);
  const file = await writeJson('finetune.json', {
    preset: 'small',
    batch: BATCH,
    seq_len: SEQ_LEN,
    steps: STEPS,
    timed_steps: STEPS - 1,
    rows,
    ratios,
    targets,
  });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
