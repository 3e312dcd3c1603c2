// EngineActivator (the agent's activation seam in serve) on an in-process ServeEngine: with
// --default-adapter none a fleet adapter is served under its id while the bare base id stays the
// base alone; with fleet the bare id serves it; an adapter that fails validation (NaN) changes
// nothing; deactivate returns the bare id to the base and unloads the fleet adapter. Swaps while
// rows decode: the engine's rows observer reads back, from the masks really fed, which adapters each
// row gets at every forward; none may change within a row, and a bare-id request resolved during a
// swap gets the old or the new adapter, never the base alone (the cause of fleet.test.ts's
// intermittent "matched neither adapter" streams: the old adapter was unloaded before the new one
// had loaded).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { ServeEngine } from '../../src/serve/engine.js';
import { EngineActivator } from '../../src/serve/fleet.js';
import type { CompletionRequest } from '../../src/serve/engine.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';

const tmp = tempDir();
let engine: ServeEngine;
let modelDir = '';
const dirs: Record<string, string> = {};

before(async () => {
  const model = await quantized(await tinyCheckpoint(tmp.dir), tmp.dir, 'tiny', { format: 'int4', int4AccuracyLevel: 0 });
  const manifest = await readManifest(model);
  const cfg = parseHfConfig(manifest.sourceConfig, model);
  for (const [i, name] of ['a', 'nan', 'b', 'c'].entries()) {
    dirs[name] = path.join(tmp.dir, name);
    await randomAdapter(dirs[name]!, cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 90 + i, fingerprint: manifest.fingerprint, std: name === 'nan' ? Number.NaN : 0.3 });
  }
  modelDir = model;
  engine = await ServeEngine.start(model, { ctx: 64 });
});
after(async () => {
  await engine?.shutdown(0);
  tmp.cleanup();
});

async function greedy(model: string): Promise<number[]> {
  const r = await engine.submit({ promptIds: engine.model.tokenizer.encode('Hi there', { addSpecialTokens: true }), adapters: engine.resolveAdapters(model), maxTokens: 12, sampling: { temperature: 0, topK: 0, topP: 1 }, seed: 0, ignoreEos: true });
  return r.tokenIds;
}

test('default-adapter none vs fleet; a failed activation and deactivate', async () => {
  const base = await greedy('tiny');
  const none = new EngineActivator(engine, 'none');
  await none.activate(dirs.a!, { adapterId: 'a', version: 1, sha256: '1'.repeat(64) });
  assert.deepEqual(engine.adapterInfo().map((x) => x.id), ['a']);
  assert.equal(none.info().fleet_active, 'tiny:a');
  assert.equal(none.info().base_serves, null);
  assert.deepEqual(await greedy('tiny'), base, 'with none, the bare id is the base alone');
  const withA = await greedy('tiny:a');
  assert.notDeepEqual(withA, base);
  await none.deactivate();
  assert.deepEqual(engine.adapterInfo(), []);

  const fleet = new EngineActivator(engine, 'fleet');
  await fleet.activate(dirs.a!, { adapterId: 'a', version: 1, sha256: '1'.repeat(64) });
  assert.deepEqual(await greedy('tiny'), withA, 'with fleet, the bare id serves the fleet adapter');
  await assert.rejects(fleet.activate(dirs.nan!, { adapterId: 'b', version: 1, sha256: '2'.repeat(64) }), /NaN|not finite|non-finite/i);
  assert.equal(fleet.info().fleet_active, 'tiny:a', 'a failed activation changes nothing');
  assert.deepEqual(engine.adapterInfo().map((x) => x.id), ['a']);
  assert.deepEqual(await greedy('tiny'), withA);
  await fleet.deactivate();
  assert.deepEqual(await greedy('tiny'), base);
  assert.equal(fleet.info().base_serves, null);
});

test('swaps while rows decode: no row\'s adapters change mid-row, the bare id never falls back to the base, every row equals its adapter alone', async () => {
  const seen = new Map<CompletionRequest, Set<string>>();
  const eng = await ServeEngine.start(modelDir, { ctx: 64, modelId: 'tiny', observer: { rows: (rows) => rows.forEach((r) => seen.set(r.req, (seen.get(r.req) ?? new Set()).add(r.adapters))) } });
  try {
    const prompt = eng.model.tokenizer.encode('Hi there', { addSpecialTokens: true });
    const TOKENS = 40;
    const req = (adapters: { id: string; scale: number }[]): CompletionRequest => ({ promptIds: prompt, adapters, maxTokens: TOKENS, sampling: { temperature: 0, topK: 0, topP: 1 }, seed: 0, ignoreEos: true });
    // References: each adapter's content alone (batch of one), loaded under other ids.
    const ref: Record<string, number[]> = {};
    // An adapter key is "id#generation:hash16"; the hash names the content.
    const hashOf: Record<string, string> = {};
    for (const n of ['a', 'b', 'c']) {
      await eng.loadAdapter(`ref-${n}`, dirs[n]!);
      hashOf[n] = eng.adapters.held(`ref-${n}`).key.split(':')[1]!;
      ref[n] = (await eng.submit(req([{ id: `ref-${n}`, scale: 1 }]))).tokenIds;
      eng.unloadAdapter(`ref-${n}`);
    }
    const base = (await eng.submit(req([]))).tokenIds;
    assert.ok(new Set([base, ref.a, ref.b, ref.c].map((t) => t!.join(','))).size === 4, 'the adapters and the base give four different greedy texts');
    seen.clear();

    const act = new EngineActivator(eng, 'fleet');
    await act.activate(dirs.a!, { adapterId: 'a', version: 1, sha256: 'a'.repeat(64) });
    // Which content each activation puts behind which id; the last one replaces b's content in place.
    const pushes = [
      { dir: dirs.b!, id: 'b', content: 'b' },
      { dir: dirs.a!, id: 'a', content: 'a' },
      { dir: dirs.b!, id: 'b', content: 'b' },
      { dir: dirs.c!, id: 'b', content: 'c' },
    ];
    let running = true;
    let fellBack = 0;
    let resolves = 0;
    const done: { r: CompletionRequest; tokens: number[] }[] = [];
    // Resolves as fast as the event loop allows, as HTTP handlers do while a swap awaits its load.
    const poll = (async () => {
      while (running) {
        resolves++;
        if (eng.resolveAdapters('tiny').length === 0) fellBack++;
        await new Promise((r) => setImmediate(r));
      }
    })();
    const clients = [0, 1, 2].map(async () => {
      while (running) {
        const r = req(eng.resolveAdapters('tiny'));
        done.push({ r, tokens: (await eng.submit(r)).tokenIds });
      }
    });
    const rowsMore = async (n: number) => {
      const from = done.length;
      while (done.length < from + n) await new Promise((r) => setTimeout(r, 5));
    };
    for (const p of pushes) {
      await rowsMore(3);
      await act.activate(p.dir, { adapterId: p.id, version: done.length, sha256: p.content.repeat(64) });
    }
    await rowsMore(3);
    running = false;
    await Promise.all([poll, ...clients]);

    assert.equal(fellBack, 0, `${fellBack} of ${resolves} bare-id resolves during swaps got the base alone`);
    assert.ok(act.info().swaps_with_rows_in_flight >= 1, `no swap found rows in flight: ${JSON.stringify(act.info())}`);
    let changed = 0;
    const perContent: Record<string, number> = {};
    for (const { r, tokens } of done) {
      const got = seen.get(r);
      assert.ok(got, 'the observer saw every row');
      if (got.size !== 1) changed++;
      const [only] = [...got];
      assert.equal(got.size, 1, `a row's adapters changed between forwards: ${[...got].join(' | ')}`);
      assert.match(only!, /^[ab]#\d+:[0-9a-f]{16}\*1$/, `a bare-id row was fed exactly one fleet adapter at scale 1, not ${JSON.stringify(only)}`);
      const hash = /:([0-9a-f]{16})\*/.exec(only!)![1]!;
      const content = ['a', 'b', 'c'].find((n) => hash === hashOf[n]);
      assert.ok(content, `row fed an adapter of unknown content ${only}`);
      perContent[content] = (perContent[content] ?? 0) + 1;
      const k = tokens.findIndex((t, i) => t !== ref[content]![i]);
      assert.equal(k, -1, `a row fed adapter ${content} diverges from ${content} alone at token ${k}`);
    }
    assert.equal(changed, 0);
    for (const c of ['a', 'b', 'c']) assert.ok((perContent[c] ?? 0) > 0, `no row ran with content ${c}: ${JSON.stringify(perContent)}`);
    process.stdout.write(`# ${done.length} rows over ${pushes.length + 1} activations (${JSON.stringify(perContent)}), ${resolves} resolves during swaps, none fell back to the base\n`);
  } finally {
    await eng.shutdown(0);
  }
});
