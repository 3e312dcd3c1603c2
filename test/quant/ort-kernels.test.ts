// Packed weights from our quantizers run through onnxruntime-node's own com.microsoft.MatMulBnb4 and
// com.microsoft.MatMulNBits kernels must equal a plain TypeScript matmul over our dequantized weights.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng } from '../../src/util/rng.js';
import { dequantizeBnb4, quantizeBnb4 } from '../../src/quant/bnb4.js';
import { dequantizeInt4, quantizeInt4 } from '../../src/quant/int4.js';
import { matmulABt, runOneNode } from './ort-one-node.js';

/** ORT's own com.microsoft.MatMulBnb4 on A [M, K] with a packed weight [N, K]. */
function matMulBnb4(
  a: Float32Array,
  q: { packed: Uint8Array; absmax: Float32Array },
  o: { M: number; N: number; K: number; blockSize: number; quantType: 'nf4' | 'fp4' },
): Promise<Float32Array> {
  return runOneNode(
    {
      opType: 'MatMulBnb4',
      domain: 'com.microsoft',
      inputs: ['A', 'B', 'absmax'],
      initializers: [
        { name: 'B', dtype: 'uint8', dims: [q.packed.length], data: q.packed },
        { name: 'absmax', dtype: 'float32', dims: [q.absmax.length], data: q.absmax },
      ],
      a: { name: 'A', dims: [o.M, o.K] },
      output: { name: 'Y', dims: [o.M, o.N] },
      intAttrs: { K: o.K, N: o.N, block_size: o.blockSize, quant_type: o.quantType === 'nf4' ? 1 : 0 },
    },
    a,
  );
}

// fp32 kernels: dequantize to float32 and accumulate in float32; over K ≤ 256 terms the rounding stays
// orders of magnitude below this, relative to the largest |Y|.
const FP32_REL_TOL = 1e-5;

// accuracy_level 4 quantizes A to int8 per block (scale = block absmax / 127, round to nearest), so each A value
// moves by at most its scale/2 and |ΔY[m,n]| ≤ Σ_k scale_k/2 · |W[n,k]|. We bound with the row's absmax (no
// block of A can have a larger scale), plus the fp32 allowance. A bound, not a fudge factor: it holds for any
// blocking ORT picks, and a wrong weight layout blows past it.

const M = 3;
const SHAPES: Array<[number, number]> = [
  [64, 64], // [N, K]
  [256, 256],
  [48, 80], // non-square; K = 80 is not a multiple of the int4 block (32): padded, odd kBlocks
];

function rand(n: number, rng: Rng): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rng.normal();
  return a;
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
}

function maxDiff(y: Float32Array, ref: Float64Array): number {
  let d = 0;
  for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(y[i]! - ref[i]!));
  return d;
}

for (const [N, K] of SHAPES) {
  for (const quantType of ['nf4', 'fp4'] as const) {
    test(`MatMulBnb4 ${quantType} block 64, N=${N} K=${K}: ORT equals TS matmul on dequantized weights`, async () => {
      const rng = new Rng(100 + N + K);
      const w = rand(N * K, rng);
      const a = rand(M * K, rng);
      const blockSize = 64;
      const q = quantizeBnb4(w, { quantType, blockSize });
      const wq = dequantizeBnb4(q.packed, q.absmax, N * K, { quantType, blockSize });
      const ref = matmulABt(a, wq, M, K, N);
      const y = await matMulBnb4(a, q, { M, N, K, blockSize, quantType });
      const d = maxDiff(y, ref);
      const rel = d / maxAbs(ref);
      console.log(`MatMulBnb4 ${quantType} N=${N} K=${K}: max |ΔY| = ${d.toExponential(3)} (relative ${rel.toExponential(3)})`);
      assert.ok(rel <= FP32_REL_TOL, `max relative difference ${rel} > ${FP32_REL_TOL}`);
    });
  }

  for (const symmetric of [false, true]) {
    for (const accuracyLevel of [0, 4]) {
      const label = `MatMulNBits bits 4 block 32 ${symmetric ? 'no zero points' : 'zero points'} accuracy_level ${accuracyLevel}, N=${N} K=${K}`;
      test(`${label}: ORT equals TS matmul on dequantized weights`, async () => {
        const rng = new Rng(200 + N + K);
        const w = rand(N * K, rng);
        const a = rand(M * K, rng);
        const blockSize = 32;
        const q = quantizeInt4(w, N, K, { blockSize, symmetric });
        assert.equal(q.zeroPoints === undefined, symmetric);
        const wq = dequantizeInt4(q);
        const ref = matmulABt(a, wq, M, K, N);
        const initializers = [
          { name: 'B', dtype: 'uint8' as const, dims: [N, q.kBlocks, blockSize / 2], data: q.packed },
          { name: 'scales', dtype: 'float32' as const, dims: [N, q.kBlocks], data: q.scales },
        ];
        if (q.zeroPoints) {
          initializers.push({ name: 'zero_points', dtype: 'uint8', dims: [N, Math.ceil(q.kBlocks / 2)], data: q.zeroPoints });
        }
        const y = await runOneNode(
          {
            opType: 'MatMulNBits',
            domain: 'com.microsoft',
            inputs: q.zeroPoints ? ['A', 'B', 'scales', 'zero_points'] : ['A', 'B', 'scales'],
            initializers,
            a: { name: 'A', dims: [M, K] },
            output: { name: 'Y', dims: [M, N] },
            intAttrs: { K, N, bits: 4, block_size: blockSize, accuracy_level: accuracyLevel },
          },
          a,
        );
        const d = maxDiff(y, ref);
        const scale = maxAbs(ref);
        if (accuracyLevel === 0) {
          console.log(`${label}: max |ΔY| = ${d.toExponential(3)} (relative ${(d / scale).toExponential(3)})`);
          assert.ok(d / scale <= FP32_REL_TOL, `max relative difference ${d / scale} > ${FP32_REL_TOL}`);
          return;
        }
        let worst = 0; // |ΔY| / bound, per element
        for (let m = 0; m < M; m++) {
          const rowScale = maxAbs(a.subarray(m * K, (m + 1) * K)) / 127;
          for (let n = 0; n < N; n++) {
            let bound = 0;
            for (let k = 0; k < K; k++) bound += (rowScale / 2) * Math.abs(wq[n * K + k]!);
            bound += FP32_REL_TOL * scale;
            worst = Math.max(worst, Math.abs(y[m * N + n]! - ref[m * N + n]!) / bound);
          }
        }
        console.log(`${label}: max |ΔY| = ${d.toExponential(3)} (relative ${(d / scale).toExponential(3)}); worst |ΔY| / int8-A bound = ${worst.toFixed(3)}`);
        assert.ok(worst <= 1, `difference exceeds the int8-A rounding bound by ${worst}×`);
      });
    }
  }
}

test('MatMulBnb4 with odd N·K (a half-filled last byte and a partial block)', async () => {
  const N = 5;
  const K = 13; // 65 elements: 33 bytes, the last block holds 1 element
  const rng = new Rng(9);
  const w = rand(N * K, rng);
  const a = rand(M * K, rng);
  const q = quantizeBnb4(w, { quantType: 'nf4', blockSize: 64 });
  const wq = dequantizeBnb4(q.packed, q.absmax, N * K, { quantType: 'nf4', blockSize: 64 });
  const ref = matmulABt(a, wq, M, K, N);
  const y = await matMulBnb4(a, q, { M, N, K, blockSize: 64, quantType: 'nf4' });
  const d = maxDiff(y, ref);
  console.log(`MatMulBnb4 nf4 N=5 K=13: max |ΔY| = ${d.toExponential(3)}`);
  assert.ok(d / maxAbs(ref) <= FP32_REL_TOL, `max difference ${d}`);
});

// Negative control: the same comparison must fail when the nibble order is swapped, or the tests above prove
// nothing about the layout.
test('negative control: swapped nibbles disagree with both kernels', async () => {
  const N = 64;
  const K = 64;
  const rng = new Rng(5);
  const w = rand(N * K, rng);
  const a = rand(M * K, rng);
  const swap = (b: Uint8Array): Uint8Array => b.map((x) => ((x & 0x0f) << 4) | (x >> 4));

  const qb = quantizeBnb4(w, { quantType: 'nf4', blockSize: 64 });
  const refB = matmulABt(a, dequantizeBnb4(qb.packed, qb.absmax, N * K, { quantType: 'nf4', blockSize: 64 }), M, K, N);
  const yB = await runOneNode(
    {
      opType: 'MatMulBnb4',
      domain: 'com.microsoft',
      inputs: ['A', 'B', 'absmax'],
      initializers: [
        { name: 'B', dtype: 'uint8', dims: [qb.packed.length], data: swap(qb.packed) },
        { name: 'absmax', dtype: 'float32', dims: [qb.absmax.length], data: qb.absmax },
      ],
      a: { name: 'A', dims: [M, K] },
      output: { name: 'Y', dims: [M, N] },
      intAttrs: { K, N, block_size: 64, quant_type: 1 },
    },
    a,
  );
  const relB = maxDiff(yB, refB) / maxAbs(refB);

  const qi = quantizeInt4(w, N, K, { blockSize: 32, symmetric: true });
  const refI = matmulABt(a, dequantizeInt4(qi), M, K, N);
  const yI = await runOneNode(
    {
      opType: 'MatMulNBits',
      domain: 'com.microsoft',
      inputs: ['A', 'B', 'scales'],
      initializers: [
        { name: 'B', dtype: 'uint8', dims: [N, qi.kBlocks, 16], data: swap(qi.packed) },
        { name: 'scales', dtype: 'float32', dims: [N, qi.kBlocks], data: qi.scales },
      ],
      a: { name: 'A', dims: [M, K] },
      output: { name: 'Y', dims: [M, N] },
      intAttrs: { K, N, bits: 4, block_size: 32, accuracy_level: 0 },
    },
    a,
  );
  const relI = maxDiff(yI, refI) / maxAbs(refI);
  console.log(`swapped nibbles: MatMulBnb4 relative ${relB.toFixed(3)}, MatMulNBits relative ${relI.toFixed(3)}`);
  assert.ok(relB > 100 * FP32_REL_TOL && relI > 100 * FP32_REL_TOL);
});
