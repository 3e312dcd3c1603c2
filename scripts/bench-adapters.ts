// npm run bench:adapters — on the `small` demo model with int4 and nf4 bases: time to load and
// activate an adapter, the one-time switch to the LoRA-capable graph, time to swap between two
// loaded adapters, and decode tokens/s with no adapter (the plain decoder, and the LoRA graph with
// empty feeds), rank 8 on q/v, and rank 16 on all seven projections, side by side in one run.
// Slowdowns are against the plain decoder: what a user pays for having an adapter on.
// Writes bench-results/adapters.json.
import path from 'node:path';
import { existsSync } from 'node:fs';
import { benchModel, runChild, printTable, writeJson, CACHE } from './bench-common.js';
import type { QuantFormat } from '../src/model/weights.js';

interface Row {
  base: QuantFormat;
  load_activate_ms: number;
  enable_lora_ms: number;
  swap_ms: number;
  decode_none_tok_s: number;
  decode_empty_lora_tok_s: number;
  decode_r8_qv_tok_s: number;
  decode_r16_all_tok_s: number;
  r8_qv_slowdown_pct: number;
  r16_all_slowdown_pct: number;
}

const NEW_TOKENS = 64;
const PROMPT_TOKENS = 32;

async function makeAdapter(dir: string, modelDir: string, r: number, targets: string[], seed: number): Promise<void> {
  if (existsSync(dir)) return;
  const { Rng } = await import('../src/util/rng.js');
  const { readManifest } = await import('../src/model/manifest.js');
  const { parseHfConfig } = await import('../src/formats/hf-config.js');
  const { saveAdapter, makePeftConfig, moduleRankAlpha } = await import('../src/adapters/peft.js');
  const { linearShape } = await import('../src/model/llama.js');
  const m = await readManifest(modelDir);
  const cfg = parseHfConfig(m.sourceConfig, modelDir);
  const config = makePeftConfig({ r, alpha: 2 * r, targets: targets as never });
  const rng = new Rng(seed);
  const modules = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of targets as ('q_proj' | 'v_proj')[]) {
      const { N, K } = linearShape(cfg, p);
      const ra = moduleRankAlpha(config, l, p);
      modules.push({ layer: l, proj: p, ...ra, a: Float32Array.from({ length: r * K }, () => rng.normal() * 0.02), b: Float32Array.from({ length: N * r }, () => rng.normal() * 0.02) });
    }
  }
  await saveAdapter(dir, { config, modules, baseFingerprint: null });
}

async function child(base: QuantFormat, dir: string, qv: string, all: string, qv2: string): Promise<void> {
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { AdapterManager } = await import('../src/adapters/manager.js');
  const { argmax } = await import('../src/runtime/sampling.js');
  // Two runtimes over one model: `plain` never sees an adapter (the plain decoder session), `model`
  // switches to the LoRA-capable graph at its first adapter set.
  const plain = await ModelRuntime.load(dir);
  const model = await ModelRuntime.load(dir);
  const mgr = new AdapterManager(model);
  const V = model.cfg.vocabSize;
  const prompt = Array.from({ length: PROMPT_TOKENS }, (_, i) => (i * 31 + 7) % 250 + 3);
  const decode = async (lora?: ReturnType<typeof mgr.feeds>, on = model): Promise<number> => {
    let res = await on.forward({ ids: [prompt], reserve: PROMPT_TOKENS + NEW_TOKENS, ...(lora ? { lora } : {}) });
    let next = argmax(res.logits.subarray((PROMPT_TOKENS - 1) * V, PROMPT_TOKENS * V));
    const t0 = performance.now();
    for (let i = 0; i < NEW_TOKENS; i++) {
      res = await on.forward({ ids: [[next]], cache: res.cache, ...(lora ? { lora } : {}) });
      next = argmax(res.logits.subarray(0, V));
    }
    return NEW_TOKENS / ((performance.now() - t0) / 1000);
  };
  await decode(undefined, plain); // warm-up
  // Load + activate (validation, reading, building the feeds).
  const t0 = performance.now();
  const a = await mgr.load(qv, { id: 'qv' });
  mgr.activate(a);
  mgr.feeds();
  const loadActivateMs = performance.now() - t0;
  const t2 = performance.now();
  await model.enableLora();
  const enableLoraMs = performance.now() - t2;
  await decode(); // warm-up of the LoRA session
  const qvFeeds = mgr.feeds();
  mgr.deactivate(a);
  const c = await mgr.load(all, { id: 'all' });
  mgr.activate(c);
  const allFeeds = mgr.feeds();
  mgr.deactivate(c);
  // Interleaved rounds (none, r8, r16, …) so drift in machine load hits all three alike; median of 5.
  const samples: Record<'none' | 'empty' | 'r8' | 'r16', number[]> = { none: [], empty: [], r8: [], r16: [] };
  for (let round = 0; round < 5; round++) {
    samples.none.push(await decode(undefined, plain));
    samples.empty.push(await decode());
    samples.r8.push(await decode(qvFeeds));
    samples.r16.push(await decode(allFeeds));
  }
  const median = (xs: number[]) => [...xs].sort((p, q) => p - q)[Math.floor(xs.length / 2)]!;
  const none = median(samples.none);
  const empty = median(samples.empty);
  const r8 = median(samples.r8);
  const r16 = median(samples.r16);
  // Swap between two loaded q/v adapters: deactivate one, activate the other, build feeds, one decode step.
  const b = await mgr.load(qv2, { id: 'qv2' });
  mgr.activate(a);
  mgr.feeds();
  const swaps = 10;
  const t1 = performance.now();
  for (let i = 0; i < swaps; i++) {
    const [from, to] = i % 2 === 0 ? [a, b] : [b, a];
    mgr.deactivate(from);
    mgr.activate(to);
    mgr.feeds();
  }
  const swapMs = (performance.now() - t1) / swaps;
  const row: Row = {
    base,
    load_activate_ms: loadActivateMs,
    enable_lora_ms: enableLoraMs,
    swap_ms: swapMs,
    decode_none_tok_s: none,
    decode_empty_lora_tok_s: empty,
    decode_r8_qv_tok_s: r8,
    decode_r16_all_tok_s: r16,
    r8_qv_slowdown_pct: (1 - r8 / none) * 100,
    r16_all_slowdown_pct: (1 - r16 / none) * 100,
  };
  process.stdout.write(JSON.stringify(row) + '\n');
}

async function main(): Promise<void> {
  if (process.argv[2] === '--child') {
    const [, , , base, dir, qv, all, qv2] = process.argv;
    return child(base as QuantFormat, dir!, qv!, all!, qv2!);
  }
  const rows: Row[] = [];
  for (const base of ['int4', 'nf4'] as const) {
    const dir = await benchModel(base);
    const qv = path.join(CACHE, 'adapter-r8-qv');
    const qv2 = path.join(CACHE, 'adapter-r8-qv-2');
    const all = path.join(CACHE, 'adapter-r16-all');
    await makeAdapter(qv, dir, 8, ['q_proj', 'v_proj'], 1);
    await makeAdapter(qv2, dir, 8, ['q_proj', 'v_proj'], 2);
    await makeAdapter(all, dir, 16, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], 3);
    rows.push(await runChild<Row>(new URL(import.meta.url).pathname, ['--child', base, dir, qv, all, qv2]));
  }
  printTable(rows as unknown as Record<string, string | number>[]);
  const targets = Object.fromEntries(rows.map((r) => [`${r.base}_r8_qv_at_most_10pct_slower`, r.r8_qv_slowdown_pct <= 10]));
  process.stdout.write(`\ntargets: ${JSON.stringify(targets)}\n`);
  const file = await writeJson('adapters.json', { preset: 'small', new_tokens: NEW_TOKENS, prompt_tokens: PROMPT_TOKENS, rows, targets });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
