// The project's typed graph IR: values carry dtype and (partly symbolic) shape, nodes are plain data
// in topological order. Op helpers infer output shapes, so a mismatch fails at build time with the
// scope (e.g. "layers.3.self_attn") in the message. Serialization to ONNX lives in onnx.ts;
// reverse-mode differentiation over this IR lives in autodiff.ts.
import { EdgeloraError } from '../util/errors.js';

export type DType = 'float32' | 'float16' | 'bfloat16' | 'int64' | 'int32' | 'int8' | 'uint8' | 'bool';
/** A dimension: a number, or a symbol such as 'B', 'T', 'S' resolved at run time. */
export type Dim = number | string;

export interface Value {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly Dim[];
}

export type AttrValue =
  | { kind: 'int'; value: number }
  | { kind: 'ints'; value: number[] }
  | { kind: 'float'; value: number }
  | { kind: 'floats'; value: number[] }
  | { kind: 'string'; value: string };

export interface Node {
  readonly op: string;
  /** '' for standard ONNX, 'com.microsoft' for ORT contrib ops. */
  readonly domain: string;
  readonly inputs: readonly string[]; // '' = omitted optional input
  readonly outputs: readonly string[];
  readonly attrs: Readonly<Record<string, AttrValue>>;
  readonly name: string;
}

export type TypedData = Float32Array | Uint8Array | Int8Array | Int32Array | BigInt64Array | Uint16Array;

export interface Initializer {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Raw little-endian bytes (absent when stored externally). */
  readonly raw?: Uint8Array;
  /** Location in the external data file. */
  readonly external?: { offset: number; length: number };
}

/** Where large initializers go as they are created, so the JS heap never holds a whole model. */
export interface ExternalDataSink {
  /** Minimum size in bytes for a tensor to be stored externally. */
  readonly minBytes: number;
  /** The data file's name relative to the model file. */
  readonly location: string;
  append(bytes: Uint8Array): { offset: number; length: number };
}

export const DTYPE_BYTES: Record<DType, number> = {
  float32: 4, float16: 2, bfloat16: 2, int64: 8, int32: 4, int8: 1, uint8: 1, bool: 1,
};

export function toBytes(data: TypedData): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function isNum(d: Dim): d is number {
  return typeof d === 'number';
}

export class Graph {
  readonly inputs: Value[] = [];
  readonly outputs: Value[] = [];
  readonly nodes: Node[] = [];
  readonly initializers = new Map<string, Initializer>();
  readonly values = new Map<string, Value>();
  private scopes: string[] = [];
  private counter = 0;
  private constCache = new Map<string, Value>();

  constructor(readonly opts: { external?: ExternalDataSink } = {}) {}

  /** The current naming scope, e.g. "layers.3.self_attn". */
  get scope(): string {
    return this.scopes.join('.');
  }

  /** Runs `fn` with names (and error messages) prefixed by `name`. */
  withScope<T>(name: string, fn: () => T): T {
    this.scopes.push(name);
    try {
      return fn();
    } finally {
      this.scopes.pop();
    }
  }

  /** Async twin of withScope: the scope stays pushed until `fn`'s promise settles. */
  async withScopeAsync<T>(name: string, fn: () => Promise<T>): Promise<T> {
    this.scopes.push(name);
    try {
      return await fn();
    } finally {
      this.scopes.pop();
    }
  }

  fail(message: string): never {
    throw new EdgeloraError(message, { where: `graph ${this.scope || '(root)'}` });
  }

  /** A fresh value name under the current scope. */
  fresh(hint: string): string {
    const base = this.scope ? `${this.scope}.${hint}` : hint;
    let name = `${base}_${this.counter++}`;
    while (this.values.has(name)) name = `${base}_${this.counter++}`;
    return name;
  }

  private define(v: Value): Value {
    if (this.values.has(v.name)) this.fail(`value "${v.name}" defined twice`);
    this.values.set(v.name, v);
    return v;
  }

  value(name: string): Value {
    const v = this.values.get(name);
    if (!v) this.fail(`no value named "${name}"`);
    return v;
  }

  input(name: string, dtype: DType, shape: Dim[]): Value {
    const v = this.define({ name, dtype, shape });
    this.inputs.push(v);
    return v;
  }

  output(v: Value, name?: string): Value {
    if (name && name !== v.name) v = this.identity(v, name);
    this.outputs.push(v);
    return v;
  }

  /** A constant tensor stored in the model (weights). `name` is used verbatim. */
  initializer(name: string, dtype: DType, shape: number[], data: TypedData): Value {
    const bytes = toBytes(data);
    const expect = numel(shape) * DTYPE_BYTES[dtype];
    if (bytes.byteLength !== expect) {
      this.fail(`initializer ${name}: ${bytes.byteLength} bytes for shape [${shape}] ${dtype} (expected ${expect})`);
    }
    const sink = this.opts.external;
    const external = sink !== undefined && bytes.byteLength >= sink.minBytes;
    if (external && this.deferred) this.deferred.push({ name, bytes }); // located when withExternalOrder ends
    const init: Initializer = external
      ? { name, dtype, shape, external: this.deferred ? { offset: -1, length: bytes.byteLength } : sink.append(bytes) }
      : { name, dtype, shape, raw: new Uint8Array(bytes) };
    this.initializers.set(name, init);
    return this.define({ name, dtype, shape });
  }

  private deferred: { name: string; bytes: Uint8Array }[] | null = null;

  /**
   * Runs `fn`, then appends the external tensors it added to the data file in the order `rank` gives (stable:
   * equal ranks keep the order they were added in) instead of as they came. A projection group's codes then lie
   * back to back in the file, and so do its scales, so the group's fused weight is one initializer over the
   * stored bytes (see externalSpan) instead of a Concat, which ORT's optimizer would fold into an in-memory copy.
   */
  async withExternalOrder<T>(rank: (name: string) => number, fn: () => Promise<T>): Promise<T> {
    const sink = this.opts.external;
    if (!sink || this.deferred) return fn();
    this.deferred = [];
    let out: T;
    try {
      out = await fn();
    } finally {
      const pending = this.deferred.map((e, i) => ({ ...e, i, r: rank(e.name) })).sort((a, b) => a.r - b.r || a.i - b.i);
      this.deferred = null;
      for (const e of pending) this.initializers.set(e.name, { ...this.initializers.get(e.name)!, external: sink.append(e.bytes) });
    }
    return out;
  }

  /** Every value name some node takes as an input or the graph outputs. */
  readNames(): Set<string> {
    return new Set([...this.nodes.flatMap((n) => n.inputs), ...this.outputs.map((v) => v.name)]);
  }

  /**
   * Where the initializers `names` lie in the external data file if they are stored back to back in this order
   * (the byte range that holds exactly their concatenation along axis 0), else null.
   */
  externalSpan(names: readonly string[]): { offset: number; length: number } | null {
    const parts = names.map((n) => this.initializers.get(n)?.external);
    if (parts.length === 0 || parts.some((p) => p === undefined || p.offset < 0)) return null;
    for (let i = 1; i < parts.length; i++) if (parts[i]!.offset !== parts[i - 1]!.offset + parts[i - 1]!.length) return null;
    return { offset: parts[0]!.offset, length: parts.reduce((a, p) => a + p!.length, 0) };
  }

  /** An initializer that already lies in the external data file (a graph derived from a saved model). */
  externalInitializer(name: string, dtype: DType, shape: number[], external: { offset: number; length: number }): Value {
    this.initializers.set(name, { name, dtype, shape, external });
    return this.define({ name, dtype, shape });
  }

  /**
   * A second initializer over the same stored bytes as `source` (another name, possibly another shape with as
   * many elements). ORT maps external data per initializer: a kernel that prepacks one and releases it (MatMulNBits)
   * leaves the other's mapping untouched, so a kernel reading only a few rows of the other (GatherBlockQuantized)
   * keeps only those pages resident. An embedded source is copied (small tensors only).
   */
  aliasInitializer(source: string, name: string, shape: number[]): Value {
    if (this.values.has(name)) return this.value(name);
    const src = this.initializers.get(source);
    if (!src) return this.fail(`aliasInitializer: ${source} is not an initializer`);
    if (numel(shape) !== numel(src.shape)) this.fail(`aliasInitializer ${name}: [${shape}] does not hold the ${numel(src.shape)} elements of ${source}`);
    const init: Initializer = src.external ? { name, dtype: src.dtype, shape, external: src.external } : { name, dtype: src.dtype, shape, raw: src.raw! };
    this.initializers.set(name, init);
    return this.define({ name, dtype: src.dtype, shape });
  }

  /**
   * Rows [r0, r1) along axis 0 of the external initializer `source`, as a new initializer over the same stored
   * bytes (no copy).
   */
  rowsInitializer(source: string, name: string, r0: number, r1: number): Value {
    const src = this.initializers.get(source);
    if (!src?.external || src.external.offset < 0) return this.fail(`rowsInitializer: ${source} is not a located external initializer`);
    const rows = src.shape[0]!;
    if (!(0 <= r0 && r0 < r1 && r1 <= rows)) this.fail(`rowsInitializer ${name}: rows [${r0}, ${r1}) outside ${source}'s ${rows}`);
    const rowBytes = src.external.length / rows;
    const shape = [r1 - r0, ...src.shape.slice(1)];
    return this.externalInitializer(name, src.dtype, shape, { offset: src.external.offset + r0 * rowBytes, length: (r1 - r0) * rowBytes });
  }

  /** A small float32 constant (deduplicated). */
  constF32(values: number[] | Float32Array, shape: number[] = [values.length]): Value {
    return this.constant('float32', shape, Float32Array.from(values));
  }

  /** A small int64 constant (deduplicated). */
  constI64(values: number[], shape: number[] = [values.length]): Value {
    return this.constant('int64', shape, BigInt64Array.from(values.map((x) => BigInt(x))));
  }

  /** A small uint8 constant (deduplicated). */
  constU8(values: number[], shape: number[] = [values.length]): Value {
    return this.constant('uint8', shape, Uint8Array.from(values));
  }

  private constant(dtype: DType, shape: number[], data: TypedData): Value {
    const bytes = toBytes(data);
    const key = `${dtype}|${shape.join(',')}|${Buffer.from(bytes).toString('base64')}`;
    const hit = this.constCache.get(key);
    if (hit) return hit;
    const name = `const_${this.counter++}`;
    const init: Initializer = { name, dtype, shape, raw: new Uint8Array(bytes) };
    this.initializers.set(name, init);
    const v = this.define({ name, dtype, shape });
    this.constCache.set(key, v);
    return v;
  }

  /**
   * Appends a node. `outs` gives each output's dtype and shape (inferred by the op helpers below);
   * `names` optionally fixes output names (graph outputs such as present_key.0).
   */
  node(
    op: string,
    inputs: (Value | null)[],
    outs: { dtype: DType; shape: Dim[] }[],
    attrs: Record<string, AttrValue> = {},
    opts: { domain?: string; names?: string[] } = {},
  ): Value[] {
    const outVals = outs.map((o, i) => this.define({ name: opts.names?.[i] ?? this.fresh(op), dtype: o.dtype, shape: o.shape }));
    this.nodes.push({
      op,
      domain: opts.domain ?? '',
      inputs: inputs.map((v) => (v ? v.name : '')),
      outputs: outVals.map((v) => v.name),
      attrs,
      name: this.fresh(`${op}_node`),
    });
    return outVals;
  }

  private one(op: string, inputs: (Value | null)[], dtype: DType, shape: Dim[], attrs: Record<string, AttrValue> = {}, domain?: string): Value {
    return this.node(op, inputs, [{ dtype, shape }], attrs, domain === undefined ? {} : { domain })[0]!;
  }

  // ---- shape helpers -------------------------------------------------------------------------

  /** Numpy-style broadcast of two shapes; symbolic dims must match by name unless one side is 1. */
  broadcast(a: readonly Dim[], b: readonly Dim[], what: string): Dim[] {
    const n = Math.max(a.length, b.length);
    const out: Dim[] = [];
    for (let i = 0; i < n; i++) {
      const da = i < n - a.length ? 1 : a[i - (n - a.length)]!;
      const db = i < n - b.length ? 1 : b[i - (n - b.length)]!;
      if (da === db) out.push(da);
      else if (da === 1) out.push(db);
      else if (db === 1) out.push(da);
      else if (!isNum(da) || !isNum(db)) out.push(isNum(da) ? db : da);
      else this.fail(`${what}: cannot broadcast [${a}] with [${b}]`);
    }
    return out;
  }

  private sameDtype(op: string, ...vs: Value[]): DType {
    const d = vs[0]!.dtype;
    for (const v of vs) if (v.dtype !== d) this.fail(`${op}: dtype mismatch ${vs.map((x) => `${x.name}:${x.dtype}`).join(', ')}`);
    return d;
  }

  // ---- elementwise -----------------------------------------------------------------------------

  private binary(op: string, a: Value, b: Value): Value {
    return this.one(op, [a, b], this.sameDtype(op, a, b), this.broadcast(a.shape, b.shape, op));
  }
  add(a: Value, b: Value): Value { return this.binary('Add', a, b); }
  sub(a: Value, b: Value): Value { return this.binary('Sub', a, b); }
  mul(a: Value, b: Value): Value { return this.binary('Mul', a, b); }
  div(a: Value, b: Value): Value { return this.binary('Div', a, b); }
  pow(a: Value, b: Value): Value { return this.one('Pow', [a, b], a.dtype, this.broadcast(a.shape, b.shape, 'Pow')); }
  equal(a: Value, b: Value): Value { return this.one('Equal', [a, b], 'bool', this.broadcast(a.shape, b.shape, 'Equal')); }
  where(c: Value, a: Value, b: Value): Value {
    return this.one('Where', [c, a, b], this.sameDtype('Where', a, b), this.broadcast(c.shape, this.broadcast(a.shape, b.shape, 'Where'), 'Where'));
  }

  private unary(op: string, x: Value, attrs: Record<string, AttrValue> = {}): Value {
    return this.one(op, [x], x.dtype, [...x.shape], attrs);
  }
  neg(x: Value): Value { return this.unary('Neg', x); }
  sqrt(x: Value): Value { return this.unary('Sqrt', x); }
  reciprocal(x: Value): Value { return this.unary('Reciprocal', x); }
  sigmoid(x: Value): Value { return this.unary('Sigmoid', x); }
  exp(x: Value): Value { return this.unary('Exp', x); }
  log(x: Value): Value { return this.unary('Log', x); }
  identity(x: Value, name?: string): Value {
    return this.node('Identity', [x], [{ dtype: x.dtype, shape: [...x.shape] }], {}, name ? { names: [name] } : {})[0]!;
  }
  softmax(x: Value, axis = -1): Value { return this.unary('Softmax', x, { axis: { kind: 'int', value: axis } }); }
  cast(x: Value, to: DType): Value {
    return this.one('Cast', [x], to, [...x.shape], { to: { kind: 'int', value: ONNX_DTYPE[to] } });
  }

  // ---- reductions ------------------------------------------------------------------------------

  /** ReduceMean/ReduceSum/ReduceMax over `axes` (opset 18+: axes as an input). */
  reduce(op: 'ReduceMean' | 'ReduceSum' | 'ReduceMax', x: Value, axes: number[], keepdims = true): Value {
    const r = x.shape.length;
    const norm = axes.map((a) => (a < 0 ? a + r : a));
    const shape: Dim[] = [];
    x.shape.forEach((d, i) => {
      if (norm.includes(i)) {
        if (keepdims) shape.push(1);
      } else shape.push(d);
    });
    return this.one(op, [x, this.constI64(axes)], x.dtype, shape, { keepdims: { kind: 'int', value: keepdims ? 1 : 0 } });
  }

  // ---- linear algebra --------------------------------------------------------------------------

  /** Numpy matmul semantics with batch broadcasting. a [..., M, K] · b [..., K, N]. */
  matmul(a: Value, b: Value): Value {
    if (a.shape.length < 2 || b.shape.length < 2) this.fail(`MatMul needs rank ≥ 2, got [${a.shape}] · [${b.shape}]`);
    const ka = a.shape[a.shape.length - 1]!;
    const kb = b.shape[b.shape.length - 2]!;
    if (isNum(ka) && isNum(kb) && ka !== kb) this.fail(`MatMul: inner dims differ: [${a.shape}] · [${b.shape}]`);
    const batch = this.broadcast(a.shape.slice(0, -2), b.shape.slice(0, -2), 'MatMul');
    return this.one('MatMul', [a, b], this.sameDtype('MatMul', a, b), [...batch, a.shape[a.shape.length - 2]!, b.shape[b.shape.length - 1]!]);
  }

  /** Gemm on 2-D operands: alpha · a · op(b) (+ c). Used for the (tied) lm_head: [M,K]·[N,K]ᵀ. */
  gemm(a: Value, b: Value, opts: { transB?: boolean; c?: Value } = {}): Value {
    if (a.shape.length !== 2 || b.shape.length !== 2) this.fail(`Gemm needs 2-D operands, got [${a.shape}], [${b.shape}]`);
    const n = opts.transB ? b.shape[0]! : b.shape[1]!;
    const k = opts.transB ? b.shape[1]! : b.shape[0]!;
    if (isNum(k) && isNum(a.shape[1]!) && k !== a.shape[1]) this.fail(`Gemm: inner dims differ: [${a.shape}] · [${b.shape}]${opts.transB ? 'ᵀ' : ''}`);
    const attrs: Record<string, AttrValue> = {};
    if (opts.transB) attrs.transB = { kind: 'int', value: 1 };
    return this.one('Gemm', opts.c ? [a, b, opts.c] : [a, b], a.dtype, [a.shape[0]!, n], attrs);
  }

  // ---- shape ops -------------------------------------------------------------------------------

  /**
   * Reshape to `spec`: numbers are literal sizes; a symbol equal to the input's dim at the same
   * position is copied (0 in ONNX); at most one other symbol becomes -1 (inferred).
   */
  reshape(x: Value, spec: Dim[]): Value {
    let inferred = 0;
    const target = spec.map((d, i) => {
      if (isNum(d)) return d;
      if (x.shape[i] === d) return 0;
      inferred++;
      return -1;
    });
    if (inferred > 1) this.fail(`Reshape [${x.shape}] → [${spec}]: more than one dimension to infer`);
    const knownIn = x.shape.every(isNum) ? numel(x.shape as number[]) : NaN;
    const knownOut = spec.every(isNum) ? numel(spec as number[]) : NaN;
    if (Number.isFinite(knownIn) && Number.isFinite(knownOut) && knownIn !== knownOut) {
      this.fail(`Reshape [${x.shape}] → [${spec}]: element counts differ`);
    }
    return this.one('Reshape', [x, this.constI64(target)], x.dtype, [...spec]);
  }

  /** The runtime shape of x as an int64 vector. */
  shapeOf(x: Value, start?: number, end?: number): Value {
    const attrs: Record<string, AttrValue> = {};
    if (start !== undefined) attrs.start = { kind: 'int', value: start };
    if (end !== undefined) attrs.end = { kind: 'int', value: end };
    const r = x.shape.length;
    const len = (end === undefined ? r : end < 0 ? r + end : end) - (start === undefined ? 0 : start < 0 ? r + start : start);
    return this.one('Shape', [x], 'int64', [len], attrs);
  }

  /** Reshape to a runtime shape vector (int64), declaring the resulting symbolic shape. */
  reshapeTo(x: Value, shape: Value, outShape: Dim[]): Value {
    return this.one('Reshape', [x, shape], x.dtype, outShape);
  }

  transpose(x: Value, perm: number[]): Value {
    if (perm.length !== x.shape.length) this.fail(`Transpose perm [${perm}] for rank ${x.shape.length}`);
    return this.one('Transpose', [x], x.dtype, perm.map((p) => x.shape[p]!), { perm: { kind: 'ints', value: perm } });
  }

  concat(xs: Value[], axis: number, outDim: Dim): Value {
    const r = xs[0]!.shape.length;
    const ax = axis < 0 ? axis + r : axis;
    const shape = xs[0]!.shape.map((d, i) => (i === ax ? outDim : d));
    return this.one('Concat', xs, this.sameDtype('Concat', ...xs), shape, { axis: { kind: 'int', value: axis } });
  }

  /** Slice along one axis: [start, end) (end may exceed the size; ONNX clamps). */
  slice(x: Value, axis: number, start: number, end: number, outDim: Dim): Value {
    const r = x.shape.length;
    const ax = axis < 0 ? axis + r : axis;
    const shape = x.shape.map((d, i) => (i === ax ? outDim : d));
    return this.one('Slice', [x, this.constI64([start]), this.constI64([end]), this.constI64([axis])], x.dtype, shape);
  }

  unsqueeze(x: Value, axes: number[]): Value {
    const shape = [...x.shape];
    for (const a of [...axes].sort((p, q) => p - q)) shape.splice(a < 0 ? a + shape.length + 1 : a, 0, 1);
    return this.one('Unsqueeze', [x, this.constI64(axes)], x.dtype, shape);
  }

  /** Gather rows of `table` [V, C] by integer `ids` [...]. */
  gather(table: Value, ids: Value, axis = 0): Value {
    const shape = [...table.shape.slice(0, axis), ...ids.shape, ...table.shape.slice(axis + 1)];
    return this.one('Gather', [table, ids], table.dtype, shape, { axis: { kind: 'int', value: axis } });
  }

  /** A contrib op from ORT (domain com.microsoft). */
  contrib(op: string, inputs: (Value | null)[], dtype: DType, shape: Dim[], attrs: Record<string, AttrValue>): Value {
    return this.one(op, inputs, dtype, shape, attrs, 'com.microsoft');
  }
}

/** ONNX TensorProto.DataType codes. */
export const ONNX_DTYPE: Record<DType, number> = {
  float32: 1, uint8: 2, int8: 3, int32: 6, int64: 7, bool: 9, float16: 10, bfloat16: 16,
};

export function int(value: number): AttrValue {
  return { kind: 'int', value };
}
