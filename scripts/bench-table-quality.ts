// npm run bench:table-quality — how much a quantized vocabulary table (quantize --embeddings int8 | int4) moves the
// logits against the float table of the same checkpoint and the same 4-bit linears: max and mean relative
// difference of the logits (|Δ| over the float logits' max / mean |·|) and the KL divergence KL(float ‖ quantized)
// of the next-token distributions, averaged over positions. On the tiny preset, with and without the personalized
// demo adapter (trained here on the float-table nf4 base, applied unbound to each variant), and on the small
// preset with BENCH_SMALL=1. Also the int4 linears' block size (BENCH_INT4_BLOCKS, default 32,64,128) against the
// float32 model of the same checkpoint. Writes bench-results/table-quality.json.
import os from 'node:os';
import path from 'node:path';
import { promises as fs, existsSync, mkdtempSync } from 'node:fs';
import { printTable, writeJson, CACHE } from './bench-common.js';
import type { DemoPreset } from '../src/formats/demo-model.js';
import type { EmbeddingFormat, QuantFormat } from '../src/model/weights.js';

/** int4 block sizes compared against the float32 model (BENCH_INT4_BLOCKS, default 32,64,128). */
const INT4_BLOCKS = (process.env.BENCH_INT4_BLOCKS ?? '32,64,128').split(',').map(Number);

const TEXTS = [
  'My name is',
  'Where do I live?',
  'The quick brown fox jumps over the lazy dog. Once upon a time there was a small robot that lived on a shelf.',
  'Training happens at night when the device is not busy. The device reads the examples and computes the loss.',
];

function compare(ref: Float32Array, q: Float32Array, V: number): { max_rel: number; mean_rel: number; kl: number } {
  let maxAbsRef = 0;
  let sumAbsRef = 0;
  let maxD = 0;
  let sumD = 0;
  for (let i = 0; i < ref.length; i++) {
    maxAbsRef = Math.max(maxAbsRef, Math.abs(ref[i]!));
    sumAbsRef += Math.abs(ref[i]!);
    const d = Math.abs(ref[i]! - q[i]!);
    maxD = Math.max(maxD, d);
    sumD += d;
  }
  let kl = 0;
  const rows = ref.length / V;
  for (let r = 0; r < rows; r++) {
    const lse = (x: Float32Array) => {
      let m = -Infinity;
      for (let v = 0; v < V; v++) m = Math.max(m, x[r * V + v]!);
      let s = 0;
      for (let v = 0; v < V; v++) s += Math.exp(x[r * V + v]! - m);
      return m + Math.log(s);
    };
    const lp = lse(ref);
    const lq = lse(q);
    for (let v = 0; v < V; v++) {
      const a = ref[r * V + v]! - lp;
      kl += Math.exp(a) * (a - (q[r * V + v]! - lq));
    }
  }
  return { max_rel: maxD / maxAbsRef, mean_rel: sumD / sumAbsRef, kl: kl / rows };
}

async function main(): Promise<void> {
  const { makeDemoModel } = await import('../src/formats/demo-model.js');
  const { quantizeModel, DEFAULT_BLOCK_SIZE } = await import('../src/model/quantize.js');
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { AdapterManager } = await import('../src/adapters/manager.js');
  const { finetune } = await import('../src/train/trainer.js');
  const presets: DemoPreset[] = process.env.BENCH_SMALL === '1' ? ['tiny', 'small'] : ['tiny'];
  const formats: QuantFormat[] = ['nf4', 'int4'];
  const tables: EmbeddingFormat[] = ['float', 'int8', 'int4'];
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'edgelora-table-q-'));
  const rows: Record<string, string | number>[] = [];
  try {
    for (const preset of presets) {
      const hf = path.join(CACHE, `${preset}-hf-seed1`);
      if (!existsSync(hf)) await makeDemoModel(hf, { preset, seed: 1 });
      const dirs = new Map<string, string>();
      for (const format of formats) for (const e of tables) {
        const out = path.join(tmp, `${preset}-${format}-${e}`);
        await quantizeModel(hf, out, { format, blockSize: DEFAULT_BLOCK_SIZE[format], doubleQuant: false, embeddings: e });
        dirs.set(`${format}-${e}`, out);
      }
      // The int4 linears' block size (quantize --block-size), against the float32 model: what a larger block, and
      // so fewer scales for ORT to prepack, costs in logits.
      for (const [key, format, blockSize] of [['fp32-float', 'fp32', 64], ...INT4_BLOCKS.filter((b) => b !== DEFAULT_BLOCK_SIZE.int4).map((b) => [`int4-b${b}-float`, 'int4', b])] as [string, QuantFormat, number][]) {
        const out = path.join(tmp, `${preset}-${key}`);
        await quantizeModel(hf, out, { format, blockSize, doubleQuant: false, embeddings: 'float' });
        dirs.set(key, out);
      }
      // An int8 table at the larger blocks (quantize --embedding-block-size), against the float table.
      for (const b of INT4_BLOCKS.filter((x) => x !== 32)) {
        const out = path.join(tmp, `${preset}-int4-int8-b${b}`);
        await quantizeModel(hf, out, { format: 'int4', blockSize: DEFAULT_BLOCK_SIZE.int4, doubleQuant: false, embeddings: 'int8', embeddingBlockSize: b });
        dirs.set(`int4-int8-b${b}`, out);
      }
      // The personalized demo adapter (as test/train/personalize.test.ts trains it), unbound so that it applies to
      // every variant of this checkpoint.
      let adapter: string | null = null;
      if (preset === 'tiny') {
        adapter = path.join(tmp, 'personal');
        await finetune({ model: dirs.get('nf4-float')!, data: path.resolve('examples/personal.jsonl'), out: adapter, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], rank: 16, alpha: 32, lr: 1e-2, schedule: 'constant', steps: 150, batchSize: 8, loraDropout: 0, seed: 0 });
        await fs.rm(path.join(adapter, 'edgelora_adapter.json'));
      }
      const logits = async (dir: string, withAdapter: boolean): Promise<{ all: Float32Array; V: number }> => {
        const rt = await ModelRuntime.load(dir);
        try {
          let lora;
          if (withAdapter) {
            const am = new AdapterManager(rt);
            am.activate(await am.load(adapter!));
            lora = am.feeds();
          }
          const parts: Float32Array[] = [];
          for (const t of TEXTS) {
            const ids = rt.tokenizer.encode(t, { addSpecialTokens: true });
            parts.push((await rt.forward({ ids: [ids], ...(lora ? { lora } : {}) })).logits.slice());
          }
          const all = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
          let o = 0;
          for (const p of parts) { all.set(p, o); o += p.length; }
          return { all, V: rt.cfg.vocabSize };
        } finally {
          await rt.release();
        }
      };
      {
        const ref = await logits(dirs.get('fp32-float')!, false);
        for (const b of INT4_BLOCKS) {
          const q = await logits(dirs.get(b === DEFAULT_BLOCK_SIZE.int4 ? 'int4-float' : `int4-b${b}-float`)!, false);
          rows.push({ preset, format: `int4 block ${b} vs fp32`, adapter: 'none', table: 'float', ...compare(ref.all, q.all, ref.V) });
        }
        const floatTable = await logits(dirs.get('int4-float')!, false);
        for (const b of INT4_BLOCKS.filter((x) => x !== 32)) {
          const q = await logits(dirs.get(`int4-int8-b${b}`)!, false);
          rows.push({ preset, format: 'int4', adapter: 'none', table: `int8 block ${b}`, ...compare(floatTable.all, q.all, floatTable.V) });
        }
      }
      for (const format of formats) {
        for (const withAdapter of adapter && format === 'nf4' ? [false, true] : [false]) {
          const ref = await logits(dirs.get(`${format}-float`)!, withAdapter);
          for (const e of ['int8', 'int4'] as const) {
            const q = await logits(dirs.get(`${format}-${e}`)!, withAdapter);
            rows.push({ preset, format, adapter: withAdapter ? 'personal' : 'none', table: e, ...compare(ref.all, q.all, ref.V) });
          }
        }
      }
    }
  } finally {
    await fs.rm(tmp, { recursive: true, force: true });
  }
  printTable(rows.map((r) => ({ ...r, max_rel: (r.max_rel as number).toExponential(2), mean_rel: (r.mean_rel as number).toExponential(2), kl: (r.kl as number).toExponential(2) })));
  const file = await writeJson('table-quality.json', { texts: TEXTS, rows });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
