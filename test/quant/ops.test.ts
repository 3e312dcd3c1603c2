// The 4-bit formats' gradient rules (src/quant/ops.ts), registered into autodiff's table beside their
// forwards: dX of Y = X·dequant(W)ᵀ run by ORT must equal dY·W computed here in float64 over the JS
// dequantizers of bnb4.ts / int4.ts (independent of the in-graph one), for NF4 and FP4 (a ragged last
// block), int4 with and without zero points, and int8. One rule per op: a second rule is refused.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import ort from 'onnxruntime-node';
import { Graph, type Value } from '../../src/graph/builder.js';
import { toOnnxBytes } from '../../src/graph/onnx.js';
import { differentiate, registerRule, RULES } from '../../src/graph/autodiff.js';
import { matMulBnb4, matMulNBits, matMulBnb4Rule, matMulNBitsRule } from '../../src/quant/ops.js';
import { dequantizeBnb4, quantizeBnb4 } from '../../src/quant/bnb4.js';
import { dequantizeInt4, int4Layout, quantizeInt4 } from '../../src/quant/int4.js';
import { Rng } from '../../src/util/rng.js';

/** float32 matmuls of K ≤ 96 terms against a float64 sum. */
const TOL = 1e-5;
const M = 3;

function randn(rng: Rng, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.next() * 2 - 1;
  return out;
}

/** Runs loss = Σ (X·Wᵀ ⊙ C) backward through ORT and checks dX = C·W (W: the JS dequantized weight [N, K]). */
async function checkDx(name: string, N: number, K: number, w: Float32Array, emit: (g: Graph, x: Value) => Value): Promise<void> {
  const rng = new Rng(11);
  const xs = randn(rng, M * K);
  const cs = randn(rng, M * N);
  const g = new Graph();
  const x = g.input('x', 'float32', [M, K]);
  const y = emit(g, x); // [M, N]
  const loss = g.reduce('ReduceSum', g.mul(y, g.constF32(cs, [M, N])), [0, 1], false);
  g.output(loss, 'loss');
  const ad = differentiate(g, loss, [x]);
  const session = await ort.InferenceSession.create(toOnnxBytes(g, { name }));
  const feeds: Record<string, ort.Tensor> = { x: new ort.Tensor('float32', xs, [M, K]) };
  for (const [k, f] of ad.runtimeFeeds) feeds[k] = new ort.Tensor(f.dtype as 'float32', f.data as Float32Array, f.shape);
  const out = await session.run(feeds);
  const dx = out['grad.x']!.data as Float32Array;
  await session.release();
  let maxDiff = 0;
  let scale = 0;
  for (let m = 0; m < M; m++) {
    for (let k = 0; k < K; k++) {
      let want = 0;
      for (let n = 0; n < N; n++) want += cs[m * N + n]! * w[n * K + k]!;
      maxDiff = Math.max(maxDiff, Math.abs(dx[m * K + k]! - want));
      scale = Math.max(scale, Math.abs(want));
    }
  }
  assert.ok(maxDiff <= TOL * Math.max(1, scale), `${name}: dX max |Δ| ${maxDiff.toExponential(2)} against dY·W (scale ${scale.toFixed(3)}, tolerance ${TOL} relative)`);
}

for (const quantType of ['nf4', 'fp4'] as const) {
  test(`MatMulBnb4 backward (${quantType}, ragged last block): dX equals dY · the JS dequantized weight`, async () => {
    const N = 5;
    const K = 40; // N·K = 200: three blocks of 64 and a ragged one of 8
    const blockSize = 64;
    const q = quantizeBnb4(randn(new Rng(3), N * K), { quantType, blockSize });
    const w = dequantizeBnb4(q.packed, q.absmax, N * K, { quantType, blockSize });
    await checkDx(`bnb4-${quantType}`, N, K, w, (g, x) => {
      const packed = g.initializer('B', 'uint8', [q.packed.length], q.packed);
      const absmax = g.initializer('absmax', 'float32', [q.absmax.length], q.absmax);
      return matMulBnb4(g, x, { kind: 'bnb4', quantType, blockSize, packed, absmax }, { N, K }, [M, N]);
    });
  });
}

for (const [label, bits, symmetric] of [['int4 with zero points', 4, false], ['int4 symmetric', 4, true], ['int8 with zero points', 8, false]] as const) {
  test(`MatMulNBits backward (${label}, K padded to whole blocks): dX equals dY · the JS dequantized weight`, async () => {
    const N = 6;
    const K = 48; // two blocks of 32, the second half padding
    const blockSize = 32;
    const q = quantizeInt4(randn(new Rng(5), N * K), N, K, { blockSize, bits, symmetric });
    const w = dequantizeInt4(q);
    const kb = q.kBlocks;
    await checkDx(`nbits-${bits}-${symmetric}`, N, K, w, (g, x) => {
      const packed = g.initializer('B', 'uint8', [N, kb, int4Layout(bits, blockSize, kb).blob], q.packed);
      const scales = g.initializer('scales', 'float32', [N * kb], q.scales);
      const zeroPoints = q.zeroPoints ? g.initializer('zp', 'uint8', [q.zeroPoints.length], q.zeroPoints) : null;
      return matMulNBits(g, x, { bits, blockSize, packed, scales, zeroPoints, accuracyLevel: 0 }, { N, K }, [M, N]);
    });
  });
}

test('the 4-bit rules are registered by their format module, and an op keeps one rule', () => {
  assert.equal(RULES.MatMulBnb4, matMulBnb4Rule);
  assert.equal(RULES.MatMulNBits, matMulNBitsRule);
  assert.doesNotThrow(() => registerRule('MatMulBnb4', matMulBnb4Rule), 'registering the same rule again is a no-op');
  assert.throws(() => registerRule('MatMulBnb4', () => []), /already registered/);
  assert.equal(RULES.MatMulBnb4, matMulBnb4Rule, 'a refused registration must not replace the rule');
});
