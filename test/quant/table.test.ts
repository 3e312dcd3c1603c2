// 8-bit MatMulNBits and a quantized vocabulary table against ONNX Runtime's own kernels: our bits=8 layout
// (asymmetric with zero points, and symmetric with the implicit zero point 128) through com.microsoft.MatMulNBits,
// and ONE packed initializer read by both com.microsoft.GatherBlockQuantized (the token lookup) and MatMulNBits
// (the lm_head), each compared with a plain TypeScript computation on our dequantized values.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import onnxproto from 'onnx-proto';
import * as ort from 'onnxruntime-node';
import { Rng } from '../../src/util/rng.js';
import { dequantizeInt4, quantizeInt4, type Int4Quantized } from '../../src/quant/int4.js';
import { matmulABt } from './ort-one-node.js';

const { onnx } = onnxproto;
const T = onnx.TensorProto.DataType;

/** float32 kernels (accuracy_level 0) or an exact gather: only summation order differs. */
const FP32_REL_TOL = 1e-5;

const raw = (d: Float32Array | Uint8Array): Uint8Array => new Uint8Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength));
const ia = (name: string, i: number) => ({ name, type: onnx.AttributeProto.AttributeType.INT, i });

/** A [V, C] table in one initializer W; E = GatherBlockQuantized(W, ids) [n, C/bs, bs], Y = MatMulNBits(A, W) [M, V]. */
function tableModel(q: Int4Quantized, withZp: boolean, M: number, accuracyLevel: number): Uint8Array {
  const { N: V, K: C, blockSize: bs, kBlocks: kb } = q;
  const bits = q.bits ?? 4;
  const inits = [
    { name: 'W', dataType: T.UINT8, dims: [V, kb, (bs * bits) / 8], rawData: raw(q.packed) },
    { name: 'S', dataType: T.FLOAT, dims: [V, kb], rawData: raw(q.scales) },
    // GatherBlockQuantized wants scales of data's rank; MatMulNBits refuses that shape (both checked by ORT at load).
    { name: 'S3', dataType: T.FLOAT, dims: [V, kb, 1], rawData: raw(q.scales) },
  ];
  if (withZp) inits.push({ name: 'Z', dataType: T.UINT8, dims: [V, kb], rawData: raw(q.zeroPoints!) });
  const nodes = [
    { opType: 'MatMulNBits', domain: 'com.microsoft', input: ['A', 'W', 'S', withZp ? 'Z' : ''], output: ['Y'], attribute: [ia('K', C), ia('N', V), ia('bits', bits), ia('block_size', bs), ia('accuracy_level', accuracyLevel)] },
  ];
  if (!withZp) {
    nodes.push({ opType: 'GatherBlockQuantized', domain: 'com.microsoft', input: ['W', 'ids', 'S3'], output: ['E'], attribute: [ia('bits', bits), ia('block_size', bs), ia('gather_axis', 0), ia('quantize_axis', 2)] });
  }
  const vi = (name: string, elemType: number, dims: number[]) => ({ name, type: { tensorType: { elemType, shape: { dim: dims.map((d) => ({ dimValue: d })) } } } });
  const model = onnx.ModelProto.create({
    irVersion: 10,
    producerName: 'edgelora-test',
    opsetImport: [{ domain: '', version: 21 }, { domain: 'com.microsoft', version: 1 }],
    graph: {
      name: 'table',
      node: nodes,
      initializer: inits,
      input: [vi('A', T.FLOAT, [M, C]), ...(withZp ? [] : [vi('ids', T.INT64, [3])])],
      output: [vi('Y', T.FLOAT, [M, V]), ...(withZp ? [] : [vi('E', T.FLOAT, [3, kb, bs])])],
    },
  });
  return onnx.ModelProto.encode(model).finish();
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
}

const V = 96;
const C = 64;
const M = 3;

for (const bits of [8, 4] as const) {
  for (const symmetric of bits === 8 ? [false, true] : [true]) {
    const label = `bits ${bits} ${symmetric ? 'symmetric (implicit zero point)' : 'with zero points'}`;
    test(`${label}: MatMulNBits${symmetric ? ' and GatherBlockQuantized on the same initializer' : ''} equal TS on our dequantized table`, async () => {
      const rng = new Rng(300 + bits);
      const w = Float32Array.from({ length: V * C }, () => rng.normal());
      const a = Float32Array.from({ length: M * C }, () => rng.normal());
      const q = quantizeInt4(w, V, C, { blockSize: 32, bits, symmetric });
      assert.equal(q.zeroPoints === undefined, symmetric);
      const wq = dequantizeInt4(q);
      // Our quantizer is close to the source: a wrong scale or zero point would show here first.
      let qerr = 0;
      for (let i = 0; i < w.length; i++) qerr = Math.max(qerr, Math.abs(w[i]! - wq[i]!));
      const step = maxAbs(w) / (bits === 8 ? 127 : 7);
      assert.ok(qerr <= step, `quantization error ${qerr} above one step ${step}`);
      const session = await ort.InferenceSession.create(tableModel(q, !symmetric, M, 0), { intraOpNumThreads: 1 });
      try {
        const ids = [5, 0, V - 1];
        const feeds: Record<string, ort.Tensor> = { A: new ort.Tensor('float32', a, [M, C]) };
        if (symmetric) feeds.ids = new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [3]);
        const out = await session.run(feeds);
        const y = out.Y!.data as Float32Array;
        const ref = matmulABt(a, wq, M, C, V);
        let d = 0;
        for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(y[i]! - ref[i]!));
        const rel = d / maxAbs(ref);
        console.log(`${label}: MatMulNBits max |ΔY| ${d.toExponential(3)} (relative ${rel.toExponential(3)})`);
        assert.ok(rel <= FP32_REL_TOL, `MatMulNBits: relative difference ${rel} > ${FP32_REL_TOL}`);
        if (symmetric) {
          const e = out.E!.data as Float32Array;
          let de = 0;
          ids.forEach((id, r) => {
            for (let c = 0; c < C; c++) de = Math.max(de, Math.abs(e[r * C + c]! - wq[id * C + c]!));
          });
          console.log(`${label}: GatherBlockQuantized max |Δrow| ${de.toExponential(3)}`);
          assert.ok(de <= FP32_REL_TOL * maxAbs(wq), `GatherBlockQuantized rows differ by ${de}`);
        }
      } finally {
        await session.release();
      }
    });
  }
}

test('negative control: a zero point one off (127 for 128) moves the dequantized 8-bit values the tests above compare', () => {
  const rng = new Rng(7);
  const w = Float32Array.from({ length: V * C }, () => rng.normal());
  const q = quantizeInt4(w, V, C, { blockSize: 32, bits: 8, symmetric: true });
  const right = dequantizeInt4(q);
  const wrongZp = dequantizeInt4({ ...q, scales: q.scales, zeroPoints: new Uint8Array(V * q.kBlocks).fill(127) });
  let d = 0;
  for (let i = 0; i < right.length; i++) d = Math.max(d, Math.abs(right[i]! - wrongZp[i]!));
  assert.ok(d > 1e-3, `a zero point off by one must move values (moved ${d})`);
});
