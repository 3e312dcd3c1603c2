// Serializes the graph IR (builder.ts) to an ONNX ModelProto through the onnx-proto package, and
// provides the file-backed external-data sink used while quantizing large models.
import onnxproto from 'onnx-proto';
import { openSync, writeSync, closeSync, fsyncSync } from 'node:fs';
import { Graph, ONNX_DTYPE, type AttrValue, type Dim, type ExternalDataSink } from './builder.js';

const { onnx } = onnxproto;

/** Opsets the project emits: standard ONNX 21 (blocked DequantizeLinear, Reduce* with axes input) and ORT contrib. */
export const OPSET = 21;
export const IR_VERSION = 10;

function dimProto(d: Dim): { dimValue?: number; dimParam?: string } {
  return typeof d === 'number' ? { dimValue: d } : { dimParam: d };
}

function attrProto(name: string, a: AttrValue): InstanceType<typeof onnx.AttributeProto> {
  const T = onnx.AttributeProto.AttributeType;
  switch (a.kind) {
    case 'int':
      return onnx.AttributeProto.create({ name, type: T.INT, i: a.value });
    case 'ints':
      return onnx.AttributeProto.create({ name, type: T.INTS, ints: a.value });
    case 'float':
      return onnx.AttributeProto.create({ name, type: T.FLOAT, f: a.value });
    case 'floats':
      return onnx.AttributeProto.create({ name, type: T.FLOATS, floats: a.value });
    case 'string':
      return onnx.AttributeProto.create({ name, type: T.STRING, s: new TextEncoder().encode(a.value) });
  }
}

/** Model metadata key listing external tensors that are stored in the data file but read by no node of this graph. */
export const STORED_TENSORS_KEY = 'edgelora.stored_tensors';
/** One entry of STORED_TENSORS_KEY's JSON array: name, dtype, shape, offset and length in the data file. */
export type StoredTensorEntry = [name: string, dtype: string, shape: number[], offset: number, length: number];

/** Encodes the graph as ONNX bytes. Initializers already in an external sink are referenced, not copied. */
export function toOnnxBytes(g: Graph, opts: { name?: string; docString?: string } = {}): Uint8Array {
  const valueInfo = (name: string) => {
    const v = g.value(name);
    return onnx.ValueInfoProto.create({
      name,
      type: { tensorType: { elemType: ONNX_DTYPE[v.dtype], shape: { dim: v.shape.map(dimProto) } } },
    });
  };
  const location = g.opts.external?.location;
  // An external initializer no node reads (a projection stored inside its group's span) is not emitted as one:
  // ORT would drop it with a warning per tensor. Its location goes into the model's metadata instead
  // (STORED_TENSORS_KEY), where QuantizedWeights finds it for the graphs that read projections one by one.
  const read = g.readNames();
  const stored = [...g.initializers.values()].filter((init) => init.external !== undefined && !read.has(init.name));
  const emitted = [...g.initializers.values()].filter((init) => !stored.includes(init));
  const initializer = emitted.map((init) => {
    const t = onnx.TensorProto.create({ name: init.name, dataType: ONNX_DTYPE[init.dtype], dims: [...init.shape] });
    if (init.external) {
      t.dataLocation = onnx.TensorProto.DataLocation.EXTERNAL;
      t.externalData = [
        { key: 'location', value: location ?? '' },
        { key: 'offset', value: String(init.external.offset) },
        { key: 'length', value: String(init.external.length) },
      ];
    } else {
      t.rawData = init.raw ?? new Uint8Array(0);
    }
    return t;
  });
  const usesContrib = g.nodes.some((n) => n.domain === 'com.microsoft');
  const model = onnx.ModelProto.create({
    irVersion: IR_VERSION,
    producerName: 'edgelora',
    producerVersion: '0.1.0',
    docString: opts.docString ?? '',
    opsetImport: [{ domain: '', version: OPSET }, ...(usesContrib ? [{ domain: 'com.microsoft', version: 1 }] : [])],
    graph: {
      name: opts.name ?? 'edgelora',
      node: g.nodes.map((n) =>
        onnx.NodeProto.create({
          name: n.name,
          opType: n.op,
          domain: n.domain,
          input: [...n.inputs],
          output: [...n.outputs],
          attribute: Object.entries(n.attrs).map(([k, a]) => attrProto(k, a)),
        }),
      ),
      initializer,
      input: g.inputs.map((v) => valueInfo(v.name)),
      output: g.outputs.map((v) => valueInfo(v.name)),
    },
    metadataProps: stored.length === 0 ? [] : [{ key: STORED_TENSORS_KEY, value: JSON.stringify(stored.map((t): StoredTensorEntry => [t.name, t.dtype, [...t.shape], t.external!.offset, t.external!.length])) }],
  });
  return onnx.ModelProto.encode(model).finish();
}

/** Appends tensors to one data file as they are created (64-byte aligned), fsyncs on close. */
export class FileDataSink implements ExternalDataSink {
  private fd: number;
  private offset = 0;
  constructor(
    path: string,
    readonly location: string,
    readonly minBytes = 1024,
  ) {
    this.fd = openSync(path, 'w');
  }
  append(bytes: Uint8Array): { offset: number; length: number } {
    const pad = (64 - (this.offset % 64)) % 64;
    if (pad) {
      writeSync(this.fd, new Uint8Array(pad));
      this.offset += pad;
    }
    const at = this.offset;
    let done = 0;
    while (done < bytes.byteLength) done += writeSync(this.fd, bytes, done, bytes.byteLength - done);
    this.offset += bytes.byteLength;
    return { offset: at, length: bytes.byteLength };
  }
  get size(): number {
    return this.offset;
  }
  close(): void {
    fsyncSync(this.fd);
    closeSync(this.fd);
  }
}
