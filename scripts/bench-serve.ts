// npm run bench:serve — `edgelora serve` on the `small` demo model (int4): closed-loop clients at
// concurrency 1, 4 and 8, each sending streamed completions one after another, with (a) every
// request on the same adapter and (b) every client on its own adapter (8 adapters, r8 on q/v, so a
// batch mixes up to 8 adapter sets in one forward). Reports aggregate completion tokens/s over the
// wall time, decode-step tokens/s (rows per decode forward / its time), p50/p95 time to first token
// (arrival → first sampled token, in the engine) and the client's time to its first text chunk; the
// baseline in the same run is `generate()`, one request at a time on its own runtime.
// The model is quantized as `edgelora quantize` does by default (int8 vocabulary table); --embeddings
// float measures the float32 table instead (what this benchmark used before).
// Threads: every configuration at its best intra-op thread count, found in the same run: a probe
// round runs each concurrency (and generate()) at each count of --threads and keeps the faster, as
// bench:peers does (on 2 shared cores 1 thread often wins). Both systems at one concurrency share it.
// Then the decode forward alone at 1, 4 and 8 rows, and (unless --no-ops) ORT's per-op times of one
// decode step at 1 and 8 rows: which ops grow with the rows, the arithmetic behind the c8/c1 ceiling.
// Systems alternate order round by round; figures are medians over rounds, with per-round ratios.
// Writes bench-results/serve.json. Flags: --rounds N (default 3), --requests K per client (default 2),
// --embeddings int8|float (default int8), --threads LIST (default 1,<cores>; one value skips the
// probe), --steps N forward-only steps (default 24), --no-ops.
import path from 'node:path';
import os from 'node:os';
import { existsSync, promises as fs } from 'node:fs';
import { benchModel, printTable, writeJson, CACHE } from './bench-common.js';
import { startServe, type RunningServer } from '../src/serve/server.js';
import type { ModelRuntime } from '../src/runtime/model.js';
import type { AdapterManager } from '../src/adapters/manager.js';
import type { EmbeddingFormat } from '../src/model/weights.js';

const PROMPT_TOKENS = 32;
const MAX_TOKENS = 64;
const CONCURRENCY = [1, 4, 8] as const;
const SYSTEMS = ['single', 'mixed'] as const;
type System = (typeof SYSTEMS)[number];

function flag(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
}

function stringFlag(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? (process.argv[i + 1] ?? def) : def;
}

async function makeAdapter(dir: string, modelDir: string, seed: number): Promise<void> {
  if (existsSync(dir)) return;
  const { Rng } = await import('../src/util/rng.js');
  const { readManifest } = await import('../src/model/manifest.js');
  const { parseHfConfig } = await import('../src/formats/hf-config.js');
  const { saveAdapter, makePeftConfig, moduleRankAlpha } = await import('../src/adapters/peft.js');
  const { linearShape } = await import('../src/model/llama.js');
  const m = await readManifest(modelDir);
  const cfg = parseHfConfig(m.sourceConfig, modelDir);
  const r = 8;
  const targets = ['q_proj', 'v_proj'] as const;
  const config = makePeftConfig({ r, alpha: 16, targets: [...targets] });
  const rng = new Rng(seed);
  const modules = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of targets) {
      const { N, K } = linearShape(cfg, p);
      modules.push({ layer: l, proj: p, ...moduleRankAlpha(config, l, p), a: Float32Array.from({ length: r * K }, () => rng.normal() * 0.02), b: Float32Array.from({ length: N * r }, () => rng.normal() * 0.02) });
    }
  }
  await saveAdapter(dir, { config, modules, baseFingerprint: null });
}

/** One streamed completion; returns the time to its first text chunk and its completion tokens. */
async function request(url: string, model: string, prompt: string): Promise<{ ttftMs: number; tokens: number }> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: MAX_TOKENS, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
  });
  if (res.status !== 200) throw new Error(`${res.status} ${await res.text()}`);
  let ttft = -1;
  let tokens = 0;
  let buf = '';
  const dec = new TextDecoder();
  for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += dec.decode(part, { stream: true });
    let i: number;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const line = buf.slice(0, i).replace(/^data: /, '');
      buf = buf.slice(i + 2);
      if (line === '[DONE]') continue;
      const obj = JSON.parse(line) as { choices: { text: string }[]; usage?: { completion_tokens: number } | null; error?: unknown };
      if (obj.error) throw new Error(JSON.stringify(obj.error));
      if (ttft < 0 && obj.choices.length > 0) ttft = performance.now() - t0;
      if (obj.usage) tokens = obj.usage.completion_tokens;
    }
  }
  return { ttftMs: ttft, tokens };
}

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
};
const median = (xs: number[]) => quantile(xs, 0.5);

/** Per-op-class kernel time of one decode step at each batch size, from ORT's profile (ms per step). */
async function opsProfile(modelDir: string, threads: number, adapterDirs: string[], batches: readonly number[], steps: number, prompt: number[]): Promise<Record<string, Record<string, number>>> {
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { AdapterManager } = await import('../src/adapters/manager.js');
  const { BatchLoraPacker } = await import('../src/serve/lora-batch.js');
  const { KvSlots } = await import('../src/serve/kv-slots.js');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-serve-ops-'));
  try {
    const m = await ModelRuntime.load(modelDir, { sessionOptions: { intraOpNumThreads: threads, enableProfiling: true, profileFilePrefix: path.join(dir, 'ort') } });
    await m.enableLora();
    const am = new AdapterManager(m);
    const ids: string[] = [];
    for (const [i, d] of adapterDirs.entries()) ids.push(await am.load(d, { id: `a${i}` }));
    // Run order: per batch size one prefill, then `steps` decode steps; profile runs are read back in this order.
    const order: { B: number; decode: boolean }[] = [];
    for (const B of batches) {
      const sets = Array.from({ length: B }, (_, b) => ({ terms: [{ held: { id: ids[b]!, ...am.held(ids[b]!) }, scale: 1 }] }));
      const lora = new BatchLoraPacker(m.cfg).feeds(sets);
      const slots = new KvSlots(m.cfg, B, prompt.length + steps + 8);
      slots.ensure(prompt.length + steps + 8, []);
      await m.forward({ ids: sets.map(() => prompt), cache: m.cacheOver(slots.view(0, B), sets.map(() => 0), lora.key), lora, logits: 'last' });
      order.push({ B, decode: false });
      let lengths = sets.map(() => prompt.length);
      for (let k = 0; k < steps; k++) {
        await m.forward({ ids: lengths.map(() => [5]), cache: m.cacheOver(slots.view(0, B), lengths, lora.key), lora, logits: 'last' });
        order.push({ B, decode: true });
        lengths = lengths.map((l) => l + 1);
      }
    }
    m.session.endProfiling();
    await m.release();
    type Ev = { cat?: string; name: string; ts: number; dur: number; args?: { op_name?: string } };
    // Two profiles: the plain decoder's (no runs; replaced by the LoRA twin) and the twin's.
    let events: Ev[] = [];
    for (const f of await fs.readdir(dir)) {
      const ev = JSON.parse(await fs.readFile(path.join(dir, f), 'utf8')) as Ev[];
      if (ev.filter((e) => e.name === 'model_run').length > events.filter((e) => e.name === 'model_run').length) events = ev;
    }
    const runs = events.filter((e) => e.name === 'model_run').sort((a, b) => a.ts - b.ts);
    if (runs.length !== order.length) throw new Error(`ORT profile has ${runs.length} runs, expected ${order.length}`);
    const kernels = events.filter((e) => e.cat === 'Node' && e.name.endsWith('_kernel_time'));
    const out: Record<string, Record<string, number>> = {};
    for (const B of batches) {
      const acc: Record<string, number> = {};
      let total = 0;
      runs.forEach((r, i) => {
        if (order[i]!.B !== B || !order[i]!.decode) return;
        total += r.dur;
        for (const k of kernels) {
          if (k.ts < r.ts || k.ts > r.ts + r.dur) continue;
          const op = k.args?.op_name ?? '?';
          const cls = op === 'MatMulNBits' ? (k.name.startsWith('layers.') ? 'MatMulNBits (4-bit layers)' : 'MatMulNBits (lm_head, int8 table)') : op === 'Gemm' ? 'Gemm (lm_head, float table)' : op === 'MatMul' || op === 'Mul' || op === 'Add' ? `${op} (LoRA, SiLU, residual)` : op;
          acc[cls] = (acc[cls] ?? 0) + k.dur / 1000 / steps;
        }
      });
      out[`B${B}`] = { 'whole step (model_run)': total / 1000 / steps, ...Object.fromEntries(Object.entries(acc).sort((a, b) => b[1] - a[1])) };
    }
    return out;
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const rounds = flag('rounds', 3);
  const perClient = flag('requests', 2);
  const steps = flag('steps', 24);
  const embeddings = stringFlag('embeddings', 'int8') as EmbeddingFormat;
  if (embeddings !== 'int8' && embeddings !== 'float') throw new Error(`--embeddings ${embeddings}: int8 or float`);
  const threadList = [...new Set(stringFlag('threads', `1,${os.availableParallelism()}`).split(',').map(Number))];
  if (threadList.some((t) => !(Number.isInteger(t) && t >= 1))) throw new Error(`--threads ${threadList.join(',')}: positive integers`);
  const modelDir = await benchModel('int4', 'small', undefined, embeddings);
  const adapterIds = Array.from({ length: 8 }, (_, i) => `a${i}`);
  const adapterDirs = adapterIds.map((id) => path.join(CACHE, `serve-${id}-r8qv`));
  for (const [i, dir] of adapterDirs.entries()) await makeAdapter(dir, modelDir, 100 + i);
  // Time to first token as the engine sees it (arrival → first sampled token): a random-weight model's
  // first tokens often decode to an incomplete UTF-8 character, which the stream holds back.
  // One server per thread count; only one serves at a time, so they share these counters.
  const firstTokenMs: number[] = [];
  let decodeRows = 0;
  let decodeMs = 0;
  const servers = new Map<number, RunningServer>();
  for (const t of threadList) {
    const server = await startServe({
      observer: {
        firstToken: (ms) => firstTokenMs.push(ms),
        decodeStep: (rows, ms) => {
          decodeRows += rows;
          decodeMs += ms;
        },
      },
      modelDir,
      port: 0,
      maxBatch: 8,
      ctx: 256,
      sessionOptions: { intraOpNumThreads: t },
      adapters: adapterIds.map((id, i) => ({ id, dir: adapterDirs[i]!, scale: 1 })),
    });
    await server.ready;
    servers.set(t, server);
  }
  const engine = await servers.get(threadList[0]!)!.ready;
  const tok = engine.model.tokenizer;
  // A prompt of exactly PROMPT_TOKENS tokens (with BOS), the same for every request.
  let prompt = 'The kiosk in the station greets every visitor and';
  while (tok.encode(prompt, { addSpecialTokens: true }).length < PROMPT_TOKENS) prompt += ' then';

  // The baseline in the same run: `generate()` on its own runtime (the plain single-request path,
  // adapter a0 through AdapterManager), one request at a time; one runtime per thread count.
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { AdapterManager } = await import('../src/adapters/manager.js');
  const { generate } = await import('../src/runtime/generate.js');
  const solos = new Map<number, { solo: ModelRuntime; adapters: AdapterManager }>();
  for (const t of threadList) {
    const solo = await ModelRuntime.load(modelDir, { sessionOptions: { intraOpNumThreads: t } });
    const adapters = new AdapterManager(solo);
    adapters.activate(await adapters.load(adapterDirs[0]!, { id: 'a0' }));
    solos.set(t, { solo, adapters });
  }
  const promptIds = tok.encode(prompt, { addSpecialTokens: true });
  const baseline = async (t: number) => {
    const { solo, adapters } = solos.get(t)!;
    const t0 = performance.now();
    const r = await generate(solo, promptIds, { maxNewTokens: MAX_TOKENS, temperature: 0, topK: 0, topP: 1, seed: 0, stopAtEos: false, lora: adapters.feeds() });
    return { agg: r.tokenIds.length / ((performance.now() - t0) / 1000), decode: r.decodeTokensPerSecond, ttftMs: r.prefillMs };
  };

  const run = async (system: System, c: number, t: number, requests = perClient) => {
    const server = servers.get(t)!;
    const d0 = decodeRows;
    const s0 = decodeMs;
    firstTokenMs.length = 0;
    const t0 = performance.now();
    const clientTtfts: number[] = [];
    let tokens = 0;
    await Promise.all(
      Array.from({ length: c }, async (_, client) => {
        for (let k = 0; k < requests; k++) {
          const r = await request(server.url, `${engine.modelId}:${system === 'single' ? 'a0' : adapterIds[client % adapterIds.length]}`, prompt);
          clientTtfts.push(r.ttftMs);
          tokens += r.tokens;
        }
      }),
    );
    const wall = (performance.now() - t0) / 1000;
    return { agg: tokens / wall, decode: (decodeRows - d0) / ((decodeMs - s0) / 1000), ttfts: [...firstTokenMs], clientTtfts };
  };

  for (const t of threadList) {
    await run('single', 2, t); // warm-up: first LoRA packing, ORT plans for batch shapes
    await run('mixed', 2, t);
    await baseline(t);
  }
  // The probe: each concurrency (one request per client, one adapter) and generate() at every thread count.
  const threadsAt = new Map<number, number>();
  let baselineThreads = threadList[0]!;
  const probe: Record<string, number> = {};
  if (threadList.length > 1) {
    let bestBase = -Infinity;
    for (const t of threadList) {
      const b = await baseline(t);
      probe[`generate() @ ${t} threads`] = b.agg;
      if (b.agg > bestBase) [bestBase, baselineThreads] = [b.agg, t];
    }
    for (const c of CONCURRENCY) {
      let best = -Infinity;
      for (const t of threadList) {
        const r = await run('single', c, t, 1);
        probe[`c${c} @ ${t} threads`] = r.agg;
        process.stderr.write(`thread probe c${c} @ ${t}: ${r.agg.toFixed(1)} tok/s\n`);
        if (r.agg > best) {
          best = r.agg;
          threadsAt.set(c, t);
        }
      }
    }
  } else {
    for (const c of CONCURRENCY) threadsAt.set(c, threadList[0]!);
  }

  const results = new Map<string, { agg: number[]; decode: number[]; ttfts: number[]; clientTtfts: number[] }>();
  const base: { agg: number[]; decode: number[]; ttfts: number[] } = { agg: [], decode: [], ttfts: [] };
  for (let round = 0; round < rounds; round++) {
    const b = await baseline(baselineThreads);
    base.agg.push(b.agg);
    base.decode.push(b.decode);
    base.ttfts.push(b.ttftMs);
    process.stderr.write(`round ${round + 1}/${rounds} generate(): ${b.agg.toFixed(1)} tok/s, ${b.decode.toFixed(1)} decode tok/s\n`);
    for (const c of CONCURRENCY) {
      const order = round % 2 === 0 ? SYSTEMS : [...SYSTEMS].reverse();
      for (const system of order) {
        const r = await run(system, c, threadsAt.get(c)!);
        const key = `${system}/${c}`;
        const acc = results.get(key) ?? { agg: [], decode: [], ttfts: [], clientTtfts: [] };
        acc.agg.push(r.agg);
        acc.decode.push(r.decode);
        acc.ttfts.push(...r.ttfts);
        acc.clientTtfts.push(...r.clientTtfts);
        results.set(key, acc);
        process.stderr.write(`round ${round + 1}/${rounds} ${key}: ${r.agg.toFixed(1)} tok/s aggregate, ${r.decode.toFixed(1)} decode tok/s\n`);
      }
    }
  }
  for (const server of servers.values()) await server.close(1000);

  // The decode forward alone, without HTTP or scheduling: per-step time at B = 1, 4, 8 rows (each at
  // its concurrency's thread count), with one adapter for all rows or one per row, interleaved step
  // by step so that load drifting on a shared machine hits every configuration alike. This is the
  // kernel-level ceiling of the ratios above.
  const { BatchLoraPacker } = await import('../src/serve/lora-batch.js');
  const { KvSlots } = await import('../src/serve/kv-slots.js');
  const configs = CONCURRENCY.flatMap((B) => SYSTEMS.map((system) => ({ B, system })));
  for (const { adapters } of solos.values()) for (const [i, id] of adapterIds.entries()) if (i > 0) await adapters.load(adapterDirs[i]!, { id });
  type Live = { B: number; system: System; solo: ModelRuntime; lora: ReturnType<InstanceType<typeof BatchLoraPacker>['feeds']>; slots: InstanceType<typeof KvSlots>; lengths: number[]; ms: number[] };
  const live: Live[] = [];
  for (const { B, system } of configs) {
    const { solo, adapters } = solos.get(threadsAt.get(B)!)!;
    const heldOf = (id: string) => ({ id, ...adapters.held(id) });
    const sets = Array.from({ length: B }, (_, b) => ({ terms: [{ held: heldOf(system === 'single' ? 'a0' : adapterIds[b]!), scale: 1 }] }));
    const lora = new BatchLoraPacker(solo.cfg).feeds(sets);
    const slots = new KvSlots(solo.cfg, B, PROMPT_TOKENS + steps + 8);
    slots.ensure(PROMPT_TOKENS + steps + 8, []);
    await solo.forward({ ids: sets.map(() => promptIds), cache: solo.cacheOver(slots.view(0, B), sets.map(() => 0), lora.key), lora, logits: 'last' });
    live.push({ B, system, solo, lora, slots, lengths: sets.map(() => promptIds.length), ms: [] as number[] });
  }
  for (let k = 0; k < steps; k++) {
    for (const c of k % 2 === 0 ? live : [...live].reverse()) {
      const t0 = performance.now();
      await c.solo.forward({ ids: c.lengths.map(() => [5]), cache: c.solo.cacheOver(c.slots.view(0, c.B), c.lengths, c.lora.key), lora: c.lora, logits: 'last' });
      c.ms.push(performance.now() - t0);
      c.lengths = c.lengths.map((l) => l + 1);
    }
  }
  for (const { solo } of solos.values()) await solo.release();
  const step1 = live.find((c) => c.B === 1 && c.system === 'single')!;
  const forwardRows = live.map((c) => {
    const single = live.find((x) => x.B === c.B && x.system === 'single')!;
    return {
      rows: c.B,
      system: c.system,
      threads: threadsAt.get(c.B)!,
      step_ms: median(c.ms),
      tok_s: (c.B * 1000) / median(c.ms),
      vs_b1: median(c.ms.map((m, i) => (c.B / m) / (1 / step1.ms[i]!))),
      vs_single: median(c.ms.map((m, i) => single.ms[i]! / m)),
    };
  });

  // Per-op kernel times of a decode step at 1 and 8 rows (mixed adapters), at c8's thread count.
  const opsThreads = threadsAt.get(8)!;
  const ops = process.argv.includes('--no-ops') ? null : await opsProfile(modelDir, opsThreads, adapterDirs, [1, 8], steps, promptIds);

  type Out = { system: System | 'generate()'; concurrency: number; threads: number; agg_tok_s: number; decode_tok_s: number; ttft_p50_ms: number; ttft_p95_ms: number; first_text_p50_ms: number | string; vs_c1: number | string; vs_single: number | string };
  const rows: Out[] = [
    { system: 'generate()', concurrency: 1, threads: baselineThreads, agg_tok_s: median(base.agg), decode_tok_s: median(base.decode), ttft_p50_ms: median(base.ttfts), ttft_p95_ms: quantile(base.ttfts, 0.95), first_text_p50_ms: '', vs_c1: '', vs_single: '' },
  ];
  for (const system of SYSTEMS) {
    for (const c of CONCURRENCY) {
      const r = results.get(`${system}/${c}`)!;
      const c1 = results.get(`${system}/1`)!;
      const single = results.get(`single/${c}`)!;
      rows.push({
        system,
        concurrency: c,
        threads: threadsAt.get(c)!,
        agg_tok_s: median(r.agg),
        decode_tok_s: median(r.decode),
        ttft_p50_ms: median(r.ttfts),
        ttft_p95_ms: quantile(r.ttfts, 0.95),
        first_text_p50_ms: median(r.clientTtfts),
        vs_c1: median(r.agg.map((x, i) => x / c1.agg[i]!)),
        vs_single: median(r.agg.map((x, i) => x / single.agg[i]!)),
      });
    }
  }
  process.stdout.write(`model: small preset, int4, ${embeddings} vocabulary table; load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}\n`);
  if (threadList.length > 1) process.stdout.write(`thread probe (tok/s): ${Object.entries(probe).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ')}\n`);
  printTable(rows);
  process.stdout.write('\ndecode forward alone (no HTTP, no scheduler), steps interleaved:\n');
  printTable(forwardRows);
  if (ops) {
    process.stdout.write(`\nORT kernel time per decode step (ms), mixed adapters, ${opsThreads} thread(s):\n`);
    const classes = [...new Set([...Object.keys(ops.B1!), ...Object.keys(ops.B8!)])];
    printTable(classes.map((k) => ({ op: k, B1_ms: ops.B1![k] ?? 0, B8_ms: ops.B8![k] ?? 0, B8_over_B1: (ops.B8![k] ?? 0) / (ops.B1![k] || NaN) })));
  }
  const get = (s: System, c: number) => rows.find((r) => r.system === s && r.concurrency === c)! as Out & { vs_c1: number; vs_single: number };
  const targets = {
    c8_over_c1_single: { measured: get('single', 8).vs_c1, target: 4 },
    c8_over_c1_mixed: { measured: get('mixed', 8).vs_c1, target: 4 },
    mixed_over_single: Object.fromEntries(CONCURRENCY.map((c) => [`c${c}`, { measured: get('mixed', c).vs_single, target: 0.9 }])),
    c1_single_over_generate: { measured: get('single', 1).agg_tok_s / median(base.agg) },
  };
  process.stdout.write(`\nc8/c1 aggregate: single ${targets.c8_over_c1_single.measured.toFixed(2)}×, mixed ${targets.c8_over_c1_mixed.measured.toFixed(2)}× (target ≥ 4×)\n`);
  process.stdout.write(`mixed/single: ${CONCURRENCY.map((c) => `c${c} ${get('mixed', c).vs_single.toFixed(2)}×`).join(', ')} (target ≥ 0.9×)\n`);
  process.stdout.write(`serve c1 / generate(): ${targets.c1_single_over_generate.measured.toFixed(2)}×\n`);
  process.stdout.write('(vs_c1 and vs_single are medians of per-round ratios; shared machine, so figures are noisy)\n');
  const file = await writeJson(`serve${embeddings === 'int8' ? '' : `-${embeddings}`}.json`, {
    model: `small preset, int4 (MatMulNBits, accuracy_level 4), ${embeddings} vocabulary table`,
    adapters: '8 × r8 on q_proj,v_proj',
    prompt_tokens: PROMPT_TOKENS,
    max_tokens: MAX_TOKENS,
    requests_per_client: perClient,
    rounds,
    threads: { generate: baselineThreads, ...Object.fromEntries([...threadsAt].map(([c, t]) => [`c${c}`, t])) },
    thread_probe: probe,
    load_average: os.loadavg(),
    rows,
    forward_only: forwardRows,
    ops_ms_per_step: ops,
    targets,
  });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
