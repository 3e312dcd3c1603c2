// Test helper: a one-node ONNX model (com.microsoft contrib op with constant weights) run by onnxruntime-node,
// so quantized layouts are checked against ORT's own kernels, independent of the project's graph builder.
import onnxproto from 'onnx-proto';
import * as ort from 'onnxruntime-node';

const { onnx } = onnxproto;

export interface Initializer {
  name: string;
  dtype: 'float32' | 'uint8';
  dims: number[];
  data: Float32Array | Uint8Array;
}

export interface OneNodeSpec {
  opType: string;
  domain: string;
  /** Graph input names, in the node's input order; '' for an omitted optional input. */
  inputs: string[];
  initializers: Initializer[];
  /** The float32 graph input A: [M, K]. */
  a: { name: string; dims: number[] };
  output: { name: string; dims: number[] };
  intAttrs: Record<string, number>;
}

function rawBytes(d: Float32Array | Uint8Array): Uint8Array {
  return new Uint8Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength));
}

export function buildOneNodeModel(spec: OneNodeSpec): Uint8Array {
  const T = onnx.TensorProto.DataType;
  const valueInfo = (name: string, dims: number[]): onnxproto.onnx.IValueInfoProto => ({
    name,
    type: { tensorType: { elemType: T.FLOAT, shape: { dim: dims.map((d) => ({ dimValue: d })) } } },
  });
  const model = onnx.ModelProto.create({
    irVersion: 10,
    producerName: 'edgelora-test',
    opsetImport: [
      { domain: '', version: 21 },
      { domain: 'com.microsoft', version: 1 },
    ],
    graph: {
      name: 'one_node',
      node: [
        {
          opType: spec.opType,
          domain: spec.domain,
          name: 'n0',
          input: spec.inputs,
          output: [spec.output.name],
          attribute: Object.entries(spec.intAttrs).map(([name, i]) => ({
            name,
            type: onnx.AttributeProto.AttributeType.INT,
            i,
          })),
        },
      ],
      initializer: spec.initializers.map((t) => ({
        name: t.name,
        dataType: t.dtype === 'float32' ? T.FLOAT : T.UINT8,
        dims: t.dims,
        rawData: rawBytes(t.data),
      })),
      input: [valueInfo(spec.a.name, spec.a.dims)],
      output: [valueInfo(spec.output.name, spec.output.dims)],
    },
  });
  return onnx.ModelProto.encode(model).finish();
}

/** Builds, loads and runs the one-node model on A; returns Y as float32. */
export async function runOneNode(spec: OneNodeSpec, a: Float32Array): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(buildOneNodeModel(spec), {
    intraOpNumThreads: 1,
    interOpNumThreads: 1,
  });
  try {
    const out = await session.run({ [spec.a.name]: new ort.Tensor('float32', a, spec.a.dims) });
    const y = out[spec.output.name];
    if (!y) throw new Error(`no output ${spec.output.name}`);
    return y.data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Y[m, n] = Σ_k A[m, k] · W[n, k] in float64: the straightforward reference (W in PyTorch [N, K] layout). */
export function matmulABt(a: Float32Array, w: Float32Array, M: number, K: number, N: number): Float64Array {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += a[m * K + k]! * w[n * K + k]!;
      y[m * N + n] = s;
    }
  }
  return y;
}
