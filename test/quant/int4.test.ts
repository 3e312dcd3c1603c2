// int4 (MatMulNBits layout) quantizer: nibble order and zero-point packing on hand-built inputs, K padding,
// the per-element error bound, and the quantizeLinear entry point.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../../src/util/rng.js';
import { dequantizeInt4, int4Bytes, quantizeInt4 } from '../../src/quant/int4.js';
import { dequantizeLinear, quantizeLinear, quantizedBytes } from '../../src/quant/quantize.js';
import { EdgeloraError } from '../../src/util/errors.js';

test('hand-built block: first element in the LOW nibble, codes and zero point as expected', () => {
  // One row, K = 16, one block of 16: values 0..15 → min 0, max 15, scale 1, zero point 0, q = value.
  const w = new Float32Array(16);
  for (let k = 0; k < 16; k++) w[k] = k;
  const q = quantizeInt4(w, 1, 16, { blockSize: 16 });
  assert.deepEqual(Array.from(q.scales), [1]);
  assert.deepEqual(Array.from(q.zeroPoints!), [0x80]); // zp 0 in the low nibble; pad nibble 8 (odd kBlocks)
  assert.deepEqual(Array.from(q.packed), [0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe]);
  assert.deepEqual(Array.from(dequantizeInt4(q)), Array.from(w));

  // Values −8..7: min −8, max 7 → scale 1, zero point 8, q = value + 8.
  const v = new Float32Array(16);
  for (let k = 0; k < 16; k++) v[k] = k - 8;
  const qv = quantizeInt4(v, 1, 16, { blockSize: 16 });
  assert.deepEqual(Array.from(qv.scales), [1]);
  assert.equal(qv.zeroPoints![0]! & 0x0f, 8);
  assert.deepEqual(Array.from(dequantizeInt4(qv)), Array.from(v));
});

test('zero points: block 2j low nibble, 2j+1 high nibble, per row', () => {
  // Two rows, two blocks each, with different ranges → different zero points.
  const K = 32;
  const w = new Float32Array(2 * K);
  for (let k = 0; k < 16; k++) {
    w[k] = k; // row 0 block 0: [0, 15] → zp 0
    w[16 + k] = -k; // row 0 block 1: [−15, 0] → zp 15
    w[K + k] = k - 5; // row 1 block 0: [−5, 10] → zp 5
    w[K + 16 + k] = k - 10; // row 1 block 1: [−10, 5] → zp 10
  }
  const q = quantizeInt4(w, 2, K, { blockSize: 16 });
  assert.deepEqual(Array.from(q.zeroPoints!), [0xf0, 0xa5]);
  assert.deepEqual(Array.from(dequantizeInt4(q)), Array.from(w, (v) => v + 0)); // + 0 turns the −0 input into 0
});

test('K not a multiple of the block: padded with zeros that dequantize to exactly 0', () => {
  const N = 3;
  const K = 40; // block 32 → 2 blocks, the second holds 8 values + 24 zeros
  const rng = new Rng(4);
  const w = new Float32Array(N * K);
  for (let i = 0; i < w.length; i++) w[i] = rng.normal();
  for (const symmetric of [false, true]) {
    const q = quantizeInt4(w, N, K, { blockSize: 32, symmetric });
    assert.equal(q.kBlocks, 2);
    assert.equal(q.packed.length, N * 2 * 16);
    // padding codes equal the zero point, so a kernel reading them multiplies by exactly 0
    for (let n = 0; n < N; n++) {
      const zp = symmetric ? 8 : q.zeroPoints![n]! >> 4;
      for (let j = 8; j < 32; j++) {
        const byte = q.packed[(n * 2 + 1) * 16 + (j >> 1)]!;
        assert.equal((j & 1) === 0 ? byte & 0x0f : byte >> 4, zp, `row ${n} pad ${j}`);
      }
    }
    // each value within half a step of its block scale (asymmetric), or one step at the clamped extreme (symmetric)
    const back = dequantizeInt4(q);
    let worst = 0;
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) {
        const s = Math.abs(q.scales[n * 2 + Math.floor(k / 32)]!);
        worst = Math.max(worst, Math.abs(back[n * K + k]! - w[n * K + k]!) / s);
      }
    }
    const ROUNDING_SLACK = 1e-5;
    assert.ok(worst <= (symmetric ? 1 : 0.5) + ROUNDING_SLACK, `${symmetric ? 'symmetric' : 'asymmetric'}: worst error ${worst} steps`);
  }
});

test('all-zero block: scale 0, dequantizes to 0', () => {
  const w = new Float32Array(64);
  const q = quantizeInt4(w, 2, 32, { blockSize: 32 });
  assert.deepEqual(Array.from(q.scales), [0, 0]);
  assert.ok(dequantizeInt4(q).every((v) => v === 0));
});

test('quantizeLinear: one entry point for nf4/fp4/int4 with sizes', () => {
  const N = 16;
  const K = 64;
  const rng = new Rng(8);
  const w = new Float32Array(N * K);
  for (let i = 0; i < w.length; i++) w[i] = rng.normal();
  const nf4 = quantizeLinear(w, N, K, 'nf4');
  assert.equal(nf4.format, 'nf4');
  assert.equal(nf4.blockSize, 64);
  assert.equal(quantizedBytes(nf4), 512 + 16 * 4);
  const dq = quantizeLinear(w, N, K, 'nf4', { doubleQuant: true });
  assert.ok(dq.format === 'nf4' && dq.nested !== undefined);
  assert.deepEqual(dq.packed, nf4.packed); // codes use the original absmax, as bitsandbytes does
  const int4 = quantizeLinear(w, N, K, 'int4');
  assert.ok(int4.format === 'int4');
  assert.equal(int4.blockSize, 32);
  assert.equal(quantizedBytes(int4), int4Bytes(int4));
  assert.equal(quantizedBytes(int4), N * 2 * 16 + N * 2 * 4 + N * 1);
  for (const q of [nf4, dq, int4]) {
    const back = dequantizeLinear(q);
    let err = 0;
    for (let i = 0; i < w.length; i++) err += Math.abs(back[i]! - w[i]!);
    // 4-bit on N(0,1): mean abs error ≈ 0.07–0.1 (see bnb4.test.ts); 0.15 catches a broken path
    assert.ok(err / w.length < 0.15, `${q.format}: mean abs error ${err / w.length}`);
  }
  assert.throws(() => quantizeLinear(w, N, K, 'int8' as never), EdgeloraError);
  assert.throws(() => quantizeLinear(w, N, K + 1, 'nf4'), EdgeloraError);
  assert.throws(() => quantizeLinear(w, N, K, 'nf4', { blockSize: 48 }), EdgeloraError);
});
