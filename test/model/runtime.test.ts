// ModelRuntime semantics around the fused inference graph: logits at the last position only, the
// in-place KV cache (a continued cache is stale), padding
// rules, the switch to the LoRA-capable graph, and refusing a model directory of an older format.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { relError } from '../helpers/reference.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { randomAdapter } from '../helpers/adapters.js';

const tmp = tempDir();
let dir = '';

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  dir = await quantized(hf, tmp.dir, 'm-nf4', { format: 'nf4' });
});
after(() => tmp.cleanup());

test("logits: 'last' equals the last row of the full logits", async () => {
  const rt = await ModelRuntime.load(dir);
  try {
    const ids = rt.tokenizer.encode('logits at the last position only', { addSpecialTokens: true });
    const V = rt.cfg.vocabSize;
    const all = await rt.forward({ ids: [ids] });
    const last = await rt.forward({ ids: [ids], logits: 'last' });
    assert.deepEqual(last.dims, [1, 1, V]);
    const e = relError(last.logits, all.logits.subarray((ids.length - 1) * V));
    assert.ok(e.rel < 1e-5, `last-position logits differ: rel ${e.rel.toExponential(3)} (max abs ${e.maxAbs.toExponential(3)})`);
  } finally {
    await rt.release();
  }
});

test('a cache that was already continued is refused; the newest one goes on; bad padding changes nothing', async () => {
  const rt = await ModelRuntime.load(dir);
  try {
    const ids = rt.tokenizer.encode('branching is refused', { addSpecialTokens: true });
    // Room reserved, so the next step appends in place rather than into a grown copy.
    const pre = await rt.forward({ ids: [ids], reserve: ids.length + 8 });
    const next = await rt.forward({ ids: [[5]], cache: pre.cache });
    await assert.rejects(rt.forward({ ids: [[6]], cache: pre.cache }), /already continued/);
    // Padding may only end a row of a first forward.
    await assert.rejects(rt.forward({ ids: [[5, 6]], mask: [Uint8Array.of(0, 1)] }), /padding before a real token/);
    await assert.rejects(rt.forward({ ids: [[5, 6]], cache: next.cache, mask: [Uint8Array.of(1, 0)] }), /continues a cache but holds padding/);
    // The refused calls left the newest cache usable.
    const again = await rt.forward({ ids: [[7]], cache: next.cache });
    assert.equal(again.cache.length, ids.length + 2);
  } finally {
    await rt.release();
  }
});

test('the plain decoder switches to the LoRA graph at the first adapter set; empty adapter sets give the plain logits', async () => {
  const rt = await ModelRuntime.load(dir);
  try {
    assert.equal(rt.loraReady, false);
    assert.ok(!rt.session.inputNames.some((n) => n.startsWith('lora.')), 'model.onnx should carry no LoRA inputs');
    const ids = rt.tokenizer.encode('switching graphs keeps the base', { addSpecialTokens: true });
    const plain = await rt.forward({ ids: [ids] });
    const adapterDir = path.join(tmp.dir, 'adapter-qv');
    await randomAdapter(adapterDir, rt.cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 3, fingerprint: rt.manifest.fingerprint });
    const mgr = new AdapterManager(rt);
    const id = await mgr.load(adapterDir);
    mgr.activate(id);
    const withAdapter = await rt.forward({ ids: [ids], lora: mgr.feeds() });
    assert.equal(rt.loraReady, true);
    assert.ok(relError(withAdapter.logits, plain.logits).rel > 1e-4, 'the adapter should change the logits');
    mgr.deactivate(id);
    const empty = await rt.forward({ ids: [ids], lora: mgr.feeds() });
    const e = relError(empty.logits, plain.logits);
    assert.ok(e.rel < 1e-6, `LoRA graph with no adapter differs from the plain decoder: rel ${e.rel.toExponential(3)}`);
    // A cache computed by the plain decoder continues under the LoRA graph with no adapter.
    const cont = await rt.forward({ ids: [[9]], cache: plain.cache });
    assert.equal(cont.cache.length, ids.length + 1);
  } finally {
    await rt.release();
  }
});

test('a model directory of an older format is refused with a hint to re-quantize', async () => {
  const old = path.join(tmp.dir, 'm-old');
  await fs.cp(dir, old, { recursive: true });
  const manifest = JSON.parse(await fs.readFile(path.join(old, 'manifest.json'), 'utf8')) as Record<string, unknown>;
  await fs.writeFile(path.join(old, 'manifest.json'), JSON.stringify({ ...manifest, format: 'edgelora-model/1' }));
  await assert.rejects(ModelRuntime.load(old), (err: Error) => /edgelora-model\/1/.test(err.message) && /re-run `edgelora quantize`/.test(String((err as { hint?: string }).hint ?? err.message)));
});
