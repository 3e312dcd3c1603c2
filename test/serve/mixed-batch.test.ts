// Mixed-adapter batching at the forward level: rows with different adapter sets (none, one, a
// stack with scales) share one prefill and then decode steps through BatchLoraPacker's per-row rank
// masks over KvSlots; every row's logits must equal the same request run alone through the
// independent single-set path (AdapterManager.feeds, the scale folded into bT, its own KV cache).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { relError } from '../helpers/reference.js';
import { randomAdapter } from '../helpers/adapters.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { BatchLoraPacker, type AdapterSet } from '../../src/serve/lora-batch.js';
import { KvSlots } from '../../src/serve/kv-slots.js';
import { argmax } from '../../src/runtime/sampling.js';

const tmp = tempDir();
let dir = '';
let dirNf4 = '';
const adapterDirs: string[] = [];

/**
 * Float summation order differs between a batch of rows and one row (ORT picks other kernels and
 * tilings). The bases here keep activations float (int4 accuracy_level 0, nf4): with int4's
 * accuracy_level 4, activations are rounded to int8 per block inside MatMulNBits, and a one-ulp
 * difference can flip a rounding step (measured ~9e-4 relative after 5 decode steps on the tiny model).
 */
const TOL_REL = 1e-4;

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  dir = await quantized(hf, tmp.dir, 'm-int4', { format: 'int4', int4AccuracyLevel: 0 });
  dirNf4 = await quantized(hf, tmp.dir, 'm-nf4', { format: 'nf4' });
  const rt = await ModelRuntime.load(dir);
  await rt.release();
  // Unbound (no fingerprint), so the same adapters load on both bases. Different targets and ranks, so the packed groups hold uneven spans.
  const specs = [
    { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'] as const },
    { r: 8, alpha: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const },
    { r: 2, alpha: 4, targets: ['down_proj', 'o_proj'] as const },
  ];
  for (const [i, s] of specs.entries()) {
    const d = path.join(tmp.dir, `a${i}`);
    await randomAdapter(d, rt.cfg, { r: s.r, alpha: s.alpha, targets: [...s.targets], seed: 10 + i, fingerprint: null, std: 0.2 });
    adapterDirs.push(d);
  }
});
after(() => tmp.cleanup());

for (const format of ['int4', 'nf4'] as const) test(`${format}: rows with different adapter sets in one batch each equal the same request alone (prefill + 6 decode steps)`, async () => {
  const rt = await ModelRuntime.load(format === 'int4' ? dir : dirNf4);
  try {
    await rt.enableLora();
    const mgr = new AdapterManager(rt);
    for (const [i, d] of adapterDirs.entries()) await mgr.load(d, { id: `a${i}` });
    // Row sets: base, a0, a1 ×0.5, a0 + a2 ×2 stacked, a1 (again, another row), a2.
    const sets: { id: string; scale: number }[][] = [[], [{ id: 'a0', scale: 1 }], [{ id: 'a1', scale: 0.5 }], [{ id: 'a0', scale: 1 }, { id: 'a2', scale: 2 }], [{ id: 'a1', scale: 1 }], [{ id: 'a2', scale: 1 }]];
    const prompt = rt.tokenizer.encode('mixed adapters in one batch', { addSpecialTokens: true });
    const steps = 6;
    const V = rt.cfg.vocabSize;

    // Alone: each row with its own feeds and cache; greedy continuation.
    const alone: Float32Array[][] = [];
    const aloneTokens: number[][] = [];
    for (const s of sets) {
      for (const id of mgr.active()) mgr.deactivate(id);
      for (const t of s) mgr.activate(t.id, t.scale);
      const lora = mgr.feeds();
      let res = await rt.forward({ ids: [prompt], logits: 'last', lora, reserve: prompt.length + steps + 1 });
      const ls = [res.logits.slice(0, V)];
      const toks: number[] = [];
      for (let k = 0; k < steps; k++) {
        const next = argmax(res.logits.subarray(0, V));
        toks.push(next);
        res = await rt.forward({ ids: [[next]], cache: res.cache, lora });
        ls.push(res.logits.slice(0, V));
      }
      alone.push(ls);
      aloneTokens.push(toks);
    }

    // Together: one prefill of all rows, then decode steps feeding each row its alone-run token.
    const B = sets.length;
    const rows: AdapterSet[] = sets.map((s) => ({ terms: s.map((t) => ({ held: { id: t.id, ...mgr.held(t.id) }, scale: t.scale })) }));
    const packer = new BatchLoraPacker(rt.cfg);
    const lora = packer.feeds(rows);
    assert.ok(lora.tensors.size > 0);
    const slots = new KvSlots(rt.cfg, B, 64);
    slots.ensure(prompt.length + steps + 1, []);
    let lengths = rows.map(() => 0);
    let worst = 0;
    let res = await rt.forward({ ids: rows.map(() => prompt), cache: rt.cacheOver(slots.view(0, B), lengths, lora.key), lora, logits: 'last' });
    lengths = lengths.map(() => prompt.length);
    for (let k = 0; k <= steps; k++) {
      for (let b = 0; b < B; b++) {
        const e = relError(res.logits.subarray(b * V, (b + 1) * V), alone[b]![k]!);
        worst = Math.max(worst, e.rel);
        assert.ok(e.rel < TOL_REL, `row ${b} (${JSON.stringify(sets[b])}) step ${k}: batched logits differ from alone: rel ${e.rel.toExponential(3)}, max abs ${e.maxAbs.toExponential(3)} (tolerance ${TOL_REL})`);
      }
      if (k === steps) break;
      res = await rt.forward({ ids: aloneTokens.map((t) => [t[k]!]), cache: rt.cacheOver(slots.view(0, B), lengths, lora.key), lora, logits: 'last' });
      lengths = lengths.map((l) => l + 1);
    }
    // A later batch that needs fewer adapters reuses the packed union: unused columns carry mask 0.
    for (const b of [1, 3]) {
      const sub = packer.feeds([rows[b]!]);
      assert.equal(sub.tensors.get('lora.0.qkv_proj.a')?.dims[1], lora.tensors.get('lora.0.qkv_proj.a')?.dims[1], 'the union was repacked');
      const one = new KvSlots(rt.cfg, 1, 64);
      one.ensure(prompt.length + 1, []);
      const r1 = await rt.forward({ ids: [prompt], cache: rt.cacheOver(one.view(0, 1), [0], sub.key), lora: sub, logits: 'last' });
      const e1 = relError(r1.logits.subarray(0, V), alone[b]![0]!);
      assert.ok(e1.rel < TOL_REL, `row ${b} alone over the wider union differs: rel ${e1.rel.toExponential(3)}`);
    }
    // The sets really differ: without its adapter a row's logits would not match.
    const e = relError(alone[1]![0]!, alone[0]![0]!);
    assert.ok(e.rel > 100 * TOL_REL, `adapter a0 barely changes the logits (rel ${e.rel.toExponential(3)}); the test would not see a leak`);
    process.stdout.write(`# ${format} mixed batch of ${B}: worst relative logit difference vs alone ${worst.toExponential(3)} (tolerance ${TOL_REL})\n`);
  } finally {
    await rt.release();
  }
});

test('a slot moved into a freed slot keeps decoding as before', async () => {
  const rt = await ModelRuntime.load(dir);
  try {
    await rt.enableLora();
    const V = rt.cfg.vocabSize;
    const p1 = rt.tokenizer.encode('first row', { addSpecialTokens: true });
    const p2 = rt.tokenizer.encode('second row here', { addSpecialTokens: true });
    const none = { key: '', tensors: new Map() };
    const alone = await rt.forward({ ids: [p2], logits: 'last', reserve: p2.length + 2 });
    const ref = await rt.forward({ ids: [[7]], cache: alone.cache });
    const slots = new KvSlots(rt.cfg, 2, 64);
    slots.ensure(32, []);
    await rt.forward({ ids: [p1], cache: rt.cacheOver(slots.view(0, 1), [0], ''), lora: none, logits: 'last' });
    await rt.forward({ ids: [p2], cache: rt.cacheOver(slots.view(1, 1), [0], ''), lora: none, logits: 'last' });
    slots.move(1, 0, p2.length); // row 0 finished; row 1 takes its slot
    slots.ensure(200, [p2.length]); // and the buffers grow under it
    const res = await rt.forward({ ids: [[7]], cache: rt.cacheOver(slots.view(0, 1), [p2.length], ''), lora: none, logits: 'last' });
    const e = relError(res.logits.subarray(0, V), ref.logits.subarray(0, V));
    assert.ok(e.rel < TOL_REL, `moved row differs: rel ${e.rel.toExponential(3)}`);
  } finally {
    await rt.release();
  }
});
