// EngineActivator (the agent's activation seam in serve) on an in-process ServeEngine: with
// --default-adapter none a fleet adapter is served under its id while the bare base id stays the
// base alone; with fleet the bare id serves it; an adapter that fails validation (NaN) changes
// nothing; deactivate returns the bare id to the base and unloads the fleet adapter.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { ServeEngine } from '../../src/serve/engine.js';
import { EngineActivator } from '../../src/serve/fleet.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';

const tmp = tempDir();
let engine: ServeEngine;
const dirs: Record<string, string> = {};

before(async () => {
  const model = await quantized(await tinyCheckpoint(tmp.dir), tmp.dir, 'tiny', { format: 'int4', int4AccuracyLevel: 0 });
  const manifest = await readManifest(model);
  const cfg = parseHfConfig(manifest.sourceConfig, model);
  for (const [i, name] of ['a', 'nan'].entries()) {
    dirs[name] = path.join(tmp.dir, name);
    await randomAdapter(dirs[name]!, cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 90 + i, fingerprint: manifest.fingerprint, std: name === 'nan' ? Number.NaN : 0.3 });
  }
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
