// GGUF v3 reader: parses the header (metadata key/values and the tensor table) and checks every
// tensor's type, size and offset against the file before anything is converted; tensor bytes are read
// one tensor at a time on request. Errors name the file, the byte offset or the tensor.
import { openSync, readSync, fstatSync, closeSync } from 'node:fs';
import { EdgeloraError } from '../../util/errors.js';
import { BLOCK, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VALUE, ggmlTypeName, isSupportedType, type SupportedType } from './spec.js';

export type GgufValue = number | bigint | string | boolean | GgufValue[];

export interface GgufTensorInfo {
  readonly name: string;
  /** ggml order: dims[0] is the fastest-varying (for a linear weight [K, N] = PyTorch [N, K] row-major). */
  readonly dims: number[];
  readonly typeId: number;
  /** The type's name (e.g. "Q4_K"), or "type N" for an id this reader does not know. */
  readonly typeName: string;
  readonly numel: number;
  /** Absolute byte offset of the tensor's data in the file. */
  readonly start: number;
  /** Bytes the tensor takes; null for a type edgelora does not convert (its size is not checked). */
  readonly byteLength: number | null;
}

/** Sane upper bounds: a corrupt length field is usually huge. */
const MAX_STRING = 1 << 26;
const MAX_ARRAY = 1 << 26;
const MAX_DIMS = 4;

/** Buffered little-endian reads over a file descriptor, failing with the offset on a short file. */
class Cursor {
  private buf = Buffer.alloc(0);
  private bufStart = 0;
  pos = 0;
  constructor(private readonly fd: number, readonly size: number, private readonly file: string) {}

  private need(n: number, what: string): Buffer {
    if (this.pos + n > this.size) {
      throw new EdgeloraError(`truncated: ${what} at byte ${this.pos} needs ${n} bytes but the file ends at ${this.size}`, {
        where: this.file,
        hint: 'the download or copy was cut short; fetch the file again',
      });
    }
    if (this.pos < this.bufStart || this.pos + n > this.bufStart + this.buf.length) {
      const len = Math.min(Math.max(n, 1 << 20), this.size - this.pos);
      this.buf = Buffer.alloc(len);
      readSync(this.fd, this.buf, 0, len, this.pos);
      this.bufStart = this.pos;
    }
    const at = this.pos - this.bufStart;
    this.pos += n;
    return this.buf.subarray(at, at + n);
  }
  u8(what: string): number { return this.need(1, what).readUInt8(0); }
  i8(what: string): number { return this.need(1, what).readInt8(0); }
  u16(what: string): number { return this.need(2, what).readUInt16LE(0); }
  i16(what: string): number { return this.need(2, what).readInt16LE(0); }
  u32(what: string): number { return this.need(4, what).readUInt32LE(0); }
  i32(what: string): number { return this.need(4, what).readInt32LE(0); }
  f32(what: string): number { return this.need(4, what).readFloatLE(0); }
  f64(what: string): number { return this.need(8, what).readDoubleLE(0); }
  u64(what: string): bigint { return this.need(8, what).readBigUInt64LE(0); }
  i64(what: string): bigint { return this.need(8, what).readBigInt64LE(0); }
  /** A uint64 count or offset as a JS number, refused above `max`. */
  count(what: string, max: number): number {
    const at = this.pos;
    const v = this.u64(what);
    if (v > BigInt(max)) throw new EdgeloraError(`${what} at byte ${at} is ${v}, above the limit ${max}: the header is corrupt`, { where: this.file });
    return Number(v);
  }
  string(what: string): string {
    const n = this.count(`${what} length`, MAX_STRING);
    return this.need(n, what).toString('utf8');
  }
}

function smallInt(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function readValue(c: Cursor, type: number, key: string, depth = 0): GgufValue {
  switch (type) {
    case GGUF_VALUE.UINT8: return c.u8(key);
    case GGUF_VALUE.INT8: return c.i8(key);
    case GGUF_VALUE.UINT16: return c.u16(key);
    case GGUF_VALUE.INT16: return c.i16(key);
    case GGUF_VALUE.UINT32: return c.u32(key);
    case GGUF_VALUE.INT32: return c.i32(key);
    case GGUF_VALUE.FLOAT32: return c.f32(key);
    case GGUF_VALUE.FLOAT64: return c.f64(key);
    case GGUF_VALUE.UINT64: return smallInt(c.u64(key));
    case GGUF_VALUE.INT64: return smallInt(c.i64(key));
    case GGUF_VALUE.BOOL: {
      const b = c.u8(key);
      if (b > 1) throw new EdgeloraError(`metadata ${key}: bool byte ${b} is neither 0 nor 1`, { where: 'GGUF header' });
      return b === 1;
    }
    case GGUF_VALUE.STRING: return c.string(key);
    case GGUF_VALUE.ARRAY: {
      if (depth > 2) throw new EdgeloraError(`metadata ${key}: arrays nested deeper than 2`, { where: 'GGUF header' });
      const inner = c.u32(`${key} array type`);
      const n = c.count(`${key} array length`, MAX_ARRAY);
      const out: GgufValue[] = new Array<GgufValue>(n);
      for (let i = 0; i < n; i++) out[i] = readValue(c, inner, key, depth + 1);
      return out;
    }
    default:
      throw new EdgeloraError(`metadata ${key}: unknown value type ${type}`, { where: 'GGUF header', hint: 'is this a GGUF v3 file?' });
  }
}

export class GgufReader {
  private constructor(
    readonly file: string,
    private fd: number | null,
    readonly version: number,
    readonly metadata: ReadonlyMap<string, GgufValue>,
    readonly tensors: ReadonlyMap<string, GgufTensorInfo>,
    readonly alignment: number,
    readonly dataStart: number,
    readonly fileSize: number,
  ) {}

  /** Opens and validates a GGUF file: header, metadata, and every tensor's size and place in the file. */
  static open(file: string): GgufReader {
    let fd: number;
    try {
      fd = openSync(file, 'r');
    } catch (err) {
      throw new EdgeloraError(`cannot open: ${(err as Error).message}`, { where: file });
    }
    try {
      const size = fstatSync(fd).size;
      const c = new Cursor(fd, size, file);
      const magic = c.u32('magic');
      if (magic !== GGUF_MAGIC) throw new EdgeloraError('not a GGUF file (bad magic)', { where: file, hint: 'expected a llama.cpp .gguf model' });
      const version = c.u32('version');
      if (version !== 2 && version !== 3) throw new EdgeloraError(`GGUF version ${version} is not supported (2 or 3)`, { where: file });
      const nTensors = c.count('tensor count', 1 << 20);
      const nKv = c.count('metadata count', 1 << 20);
      const metadata = new Map<string, GgufValue>();
      for (let i = 0; i < nKv; i++) {
        const key = c.string(`metadata key #${i}`);
        const type = c.u32(`metadata ${key} type`);
        metadata.set(key, readValue(c, type, key));
      }
      const align = metadata.get('general.alignment') ?? GGUF_DEFAULT_ALIGNMENT;
      if (typeof align !== 'number' || align <= 0 || (align & (align - 1)) !== 0) {
        throw new EdgeloraError(`general.alignment ${String(align)} is not a power of two`, { where: file });
      }
      const raw: { name: string; dims: number[]; typeId: number; offset: number }[] = [];
      for (let i = 0; i < nTensors; i++) {
        const name = c.string(`tensor #${i} name`);
        const nd = c.u32(`tensor ${name} n_dims`);
        if (nd < 1 || nd > MAX_DIMS) throw new EdgeloraError(`tensor ${name}: ${nd} dimensions (1–${MAX_DIMS} allowed)`, { where: file });
        const dims: number[] = [];
        for (let d = 0; d < nd; d++) dims.push(c.count(`tensor ${name} dim ${d}`, 2 ** 40));
        const typeId = c.u32(`tensor ${name} type`);
        const offset = c.count(`tensor ${name} offset`, Number.MAX_SAFE_INTEGER);
        raw.push({ name, dims, typeId, offset });
      }
      const dataStart = Math.ceil(c.pos / align) * align;
      const tensors = new Map<string, GgufTensorInfo>();
      for (const t of raw) {
        if (tensors.has(t.name)) throw new EdgeloraError(`tensor ${t.name} appears twice`, { where: file });
        const typeName = ggmlTypeName(t.typeId);
        const numel = t.dims.reduce((a, b) => a * b, 1);
        let byteLength: number | null = null;
        if (isSupportedType(typeName)) {
          const b = BLOCK[typeName];
          if (t.dims[0]! % b.elements !== 0) {
            throw new EdgeloraError(`tensor ${t.name}: row of ${t.dims[0]} elements is not a whole number of ${typeName} blocks (${b.elements})`, { where: file });
          }
          byteLength = (numel / b.elements) * b.bytes;
        }
        if (t.offset % align !== 0) {
          throw new EdgeloraError(`tensor ${t.name}: offset ${t.offset} is not aligned to ${align}`, { where: file, hint: 'the file is corrupt' });
        }
        const start = dataStart + t.offset;
        if (start + (byteLength ?? 0) > size) {
          throw new EdgeloraError(`tensor ${t.name}: data at bytes ${start}–${start + (byteLength ?? 0)} lies past the end of the file (${size} bytes)`, {
            where: file,
            hint: 'the file is truncated or its tensor table is corrupt; fetch it again',
          });
        }
        tensors.set(t.name, { name: t.name, dims: t.dims, typeId: t.typeId, typeName, numel, start, byteLength });
      }
      // Tensors of known size must not overlap (a lying offset that still lies inside the file).
      const spans = [...tensors.values()].filter((t) => t.byteLength !== null).sort((a, b) => a.start - b.start);
      for (let i = 1; i < spans.length; i++) {
        const p = spans[i - 1]!;
        const t = spans[i]!;
        if (p.start + p.byteLength! > t.start) {
          throw new EdgeloraError(`tensor ${t.name}: data at byte ${t.start} overlaps tensor ${p.name} (${p.start}–${p.start + p.byteLength!})`, {
            where: file,
            hint: 'the tensor table is corrupt',
          });
        }
      }
      return new GgufReader(file, fd, version, metadata, tensors, align, dataStart, size);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): GgufTensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new EdgeloraError(`missing tensor ${name}`, { where: this.file, hint: 'is this a complete llama/qwen2 GGUF model?' });
    return t;
  }

  /** The type of a tensor, refused with its name and type when edgelora cannot convert it. */
  supportedType(name: string): SupportedType {
    const t = this.info(name);
    if (!isSupportedType(t.typeName)) {
      throw new EdgeloraError(`tensor ${name} has type ${t.typeName}, which edgelora does not convert`, {
        where: this.file,
        hint: 'supported: F32, F16, BF16, Q8_0, Q6_K, Q5_0, Q4_0, Q4_1, Q4_K (re-quantize with llama-quantize, e.g. to Q4_K_M or Q8_0)',
      });
    }
    return t.typeName;
  }

  /** Raw bytes of one tensor (supported types only). */
  readRaw(name: string): Uint8Array {
    this.supportedType(name);
    const t = this.info(name);
    if (this.fd === null) throw new EdgeloraError('reader is closed', { where: this.file });
    const buf = new Uint8Array(t.byteLength!);
    const got = readSync(this.fd, buf, 0, buf.length, t.start);
    if (got !== buf.length) throw new EdgeloraError(`tensor ${name}: short read (${got} of ${buf.length} bytes)`, { where: this.file });
    return buf;
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}
