// npm run bench:serve — `edgelora serve` on the `small` demo model (int4): closed-loop clients at
// concurrency 1, 4 and 8, each sending streamed completions one after another, with (a) every
// request on the same adapter and (b) every client on its own adapter (8 adapters, r8 on q/v, so a
// batch mixes up to 8 adapter sets in one forward). Reports aggregate completion tokens/s over the
// wall time, decode-step tokens/s (rows per decode forward / its time), p50/p95 time to first token
// (arrival → first sampled token, in the engine) and the client's time to its first text chunk; the
// baseline in the same run is `generate()`, one request at a time on its own runtime.
// Systems alternate order round by round; figures are medians over rounds, with per-round ratios.
// Writes bench-results/serve.json. Flags: --rounds N (default 3), --requests K per client (default 2).
import path from 'node:path';
import { existsSync } from 'node:fs';
import { benchModel, printTable, writeJson, CACHE } from './bench-common.js';
import { startServe } from '../src/serve/server.js';

const PROMPT_TOKENS = 32;
const MAX_TOKENS = 64;
const CONCURRENCY = [1, 4, 8] as const;
const SYSTEMS = ['single', 'mixed'] as const;
type System = (typeof SYSTEMS)[number];

function flag(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
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

async function main(): Promise<void> {
  const rounds = flag('rounds', 3);
  const perClient = flag('requests', 2);
  const modelDir = await benchModel('int4', 'small');
  const adapterIds = Array.from({ length: 8 }, (_, i) => `a${i}`);
  for (const [i, id] of adapterIds.entries()) await makeAdapter(path.join(CACHE, `serve-${id}-r8qv`), modelDir, 100 + i);
  // Time to first token as the engine sees it (arrival → first sampled token): a random-weight model's
  // first tokens often decode to an incomplete UTF-8 character, which the stream holds back.
  const firstTokenMs: number[] = [];
  let decodeRows = 0;
  let decodeMs = 0;
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
    adapters: adapterIds.map((id) => ({ id, dir: path.join(CACHE, `serve-${id}-r8qv`), scale: 1 })),
  });
  const engine = await server.ready;
  const tok = engine.model.tokenizer;
  // A prompt of exactly PROMPT_TOKENS tokens (with BOS), the same for every request.
  let prompt = 'The kiosk in the station greets every visitor and';
  while (tok.encode(prompt, { addSpecialTokens: true }).length < PROMPT_TOKENS) prompt += ' then';

  // The baseline in the same run: `generate()` on its own runtime (the plain single-request path,
  // adapter a0 through AdapterManager), one request at a time.
  const { ModelRuntime } = await import('../src/runtime/model.js');
  const { AdapterManager } = await import('../src/adapters/manager.js');
  const { generate } = await import('../src/runtime/generate.js');
  const solo = await ModelRuntime.load(modelDir);
  const soloAdapters = new AdapterManager(solo);
  soloAdapters.activate(await soloAdapters.load(path.join(CACHE, 'serve-a0-r8qv'), { id: 'a0' }));
  const promptIds = tok.encode(prompt, { addSpecialTokens: true });
  const baseline = async () => {
    const t0 = performance.now();
    const r = await generate(solo, promptIds, { maxNewTokens: MAX_TOKENS, temperature: 0, topK: 0, topP: 1, seed: 0, stopAtEos: false, lora: soloAdapters.feeds() });
    return { agg: r.tokenIds.length / ((performance.now() - t0) / 1000), decode: r.decodeTokensPerSecond, ttftMs: r.prefillMs };
  };

  const run = async (system: System, c: number) => {
    const d0 = decodeRows;
    const s0 = decodeMs;
    firstTokenMs.length = 0;
    const t0 = performance.now();
    const clientTtfts: number[] = [];
    let tokens = 0;
    await Promise.all(
      Array.from({ length: c }, async (_, client) => {
        for (let k = 0; k < perClient; k++) {
          const r = await request(server.url, `${engine.modelId}:${system === 'single' ? 'a0' : adapterIds[client % adapterIds.length]}`, prompt);
          clientTtfts.push(r.ttftMs);
          tokens += r.tokens;
        }
      }),
    );
    const wall = (performance.now() - t0) / 1000;
    return { agg: tokens / wall, decode: (decodeRows - d0) / ((decodeMs - s0) / 1000), ttfts: [...firstTokenMs], clientTtfts };
  };

  await run('single', 2); // warm-up: first LoRA packing, ORT plans for batch shapes
  await run('mixed', 2);
  const results = new Map<string, { agg: number[]; decode: number[]; ttfts: number[]; clientTtfts: number[] }>();
  await baseline();
  const base: { agg: number[]; decode: number[]; ttfts: number[] } = { agg: [], decode: [], ttfts: [] };
  for (let round = 0; round < rounds; round++) {
    const b = await baseline();
    base.agg.push(b.agg);
    base.decode.push(b.decode);
    base.ttfts.push(b.ttftMs);
    process.stderr.write(`round ${round + 1}/${rounds} generate(): ${b.agg.toFixed(1)} tok/s, ${b.decode.toFixed(1)} decode tok/s\n`);
    for (const c of CONCURRENCY) {
      const order = round % 2 === 0 ? SYSTEMS : [...SYSTEMS].reverse();
      for (const system of order) {
        const r = await run(system, c);
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
  await server.close(1000);

  // The decode forward alone, without HTTP or scheduling: per-step time at B = 1, 4, 8 rows, with
  // one adapter for all rows or one per row, interleaved step by step so that load drifting on a
  // shared machine hits every configuration alike. This is the kernel-level ceiling of the ratios above.
  const { BatchLoraPacker } = await import('../src/serve/lora-batch.js');
  const { KvSlots } = await import('../src/serve/kv-slots.js');
  const configs = CONCURRENCY.flatMap((B) => SYSTEMS.map((system) => ({ B, system })));
  for (const id of adapterIds.slice(1)) await soloAdapters.load(path.join(CACHE, `serve-${id}-r8qv`), { id });
  const heldOf = (id: string) => ({ id, ...soloAdapters.held(id) });
  const steps = flag('steps', 24);
  type Live = { B: number; system: System; lora: ReturnType<InstanceType<typeof BatchLoraPacker>['feeds']>; slots: InstanceType<typeof KvSlots>; lengths: number[]; ms: number[] };
  const live: Live[] = [];
  for (const { B, system } of configs) {
    const sets = Array.from({ length: B }, (_, b) => ({ terms: [{ held: heldOf(system === 'single' ? 'a0' : adapterIds[b]!), scale: 1 }] }));
    const lora = new BatchLoraPacker(solo.cfg).feeds(sets);
    const slots = new KvSlots(solo.cfg, B, PROMPT_TOKENS + steps + 8);
    slots.ensure(PROMPT_TOKENS + steps + 8, []);
    await solo.forward({ ids: sets.map(() => promptIds), cache: solo.cacheOver(slots.view(0, B), sets.map(() => 0), lora.key), lora, logits: 'last' });
    live.push({ B, system, lora, slots, lengths: sets.map(() => promptIds.length), ms: [] as number[] });
  }
  for (let k = 0; k < steps; k++) {
    for (const c of k % 2 === 0 ? live : [...live].reverse()) {
      const t0 = performance.now();
      await solo.forward({ ids: c.lengths.map(() => [5]), cache: solo.cacheOver(c.slots.view(0, c.B), c.lengths, c.lora.key), lora: c.lora, logits: 'last' });
      c.ms.push(performance.now() - t0);
      c.lengths = c.lengths.map((l) => l + 1);
    }
  }
  await solo.release();
  const step1 = live.find((c) => c.B === 1 && c.system === 'single')!;
  const forwardRows = live.map((c) => {
    const single = live.find((x) => x.B === c.B && x.system === 'single')!;
    return {
      rows: c.B,
      system: c.system,
      step_ms: median(c.ms),
      tok_s: (c.B * 1000) / median(c.ms),
      vs_b1: median(c.ms.map((m, i) => (c.B / m) / (1 / step1.ms[i]!))),
      vs_single: median(c.ms.map((m, i) => single.ms[i]! / m)),
    };
  });

  type Out = { system: System | 'generate()'; concurrency: number; agg_tok_s: number; decode_tok_s: number; ttft_p50_ms: number; ttft_p95_ms: number; first_text_p50_ms: number | string; vs_c1: number | string; vs_single: number | string };
  const rows: Out[] = [
    { system: 'generate()', concurrency: 1, agg_tok_s: median(base.agg), decode_tok_s: median(base.decode), ttft_p50_ms: median(base.ttfts), ttft_p95_ms: quantile(base.ttfts, 0.95), first_text_p50_ms: '', vs_c1: '', vs_single: '' },
  ];
  for (const system of SYSTEMS) {
    for (const c of CONCURRENCY) {
      const r = results.get(`${system}/${c}`)!;
      const c1 = results.get(`${system}/1`)!;
      const single = results.get(`single/${c}`)!;
      rows.push({
        system,
        concurrency: c,
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
  printTable(rows);
  process.stdout.write('\ndecode forward alone (no HTTP, no scheduler), steps interleaved:\n');
  printTable(forwardRows);
  const get = (s: System, c: number) => rows.find((r) => r.system === s && r.concurrency === c)! as Out & { vs_c1: number; vs_single: number };
  const targets = {
    c8_over_c1_single: { measured: get('single', 8).vs_c1, target: 4 },
    c8_over_c1_mixed: { measured: get('mixed', 8).vs_c1, target: 4 },
    mixed_over_single: Object.fromEntries(CONCURRENCY.map((c) => [`c${c}`, { measured: get('mixed', c).vs_single, target: 0.9 }])),
  };
  process.stdout.write(`\nc8/c1 aggregate: single ${targets.c8_over_c1_single.measured.toFixed(2)}×, mixed ${targets.c8_over_c1_mixed.measured.toFixed(2)}× (target ≥ 4×)\n`);
  process.stdout.write(`mixed/single: ${CONCURRENCY.map((c) => `c${c} ${get('mixed', c).vs_single.toFixed(2)}×`).join(', ')} (target ≥ 0.9×)\n`);
  process.stdout.write('(vs_c1 and vs_single are medians of per-round ratios; shared machine, so figures are noisy)\n');
  const file = await writeJson('serve.json', {
    model: 'small preset, int4 (MatMulNBits, accuracy_level 4)',
    adapters: '8 × r8 on q_proj,v_proj',
    prompt_tokens: PROMPT_TOKENS,
    max_tokens: MAX_TOKENS,
    requests_per_client: perClient,
    rounds,
    rows,
    forward_only: forwardRows,
    targets,
  });
  process.stdout.write(`wrote ${file}\n`);
}

await main();
