// safetensors read/write (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
// header length N, N bytes of JSON header ({name: {dtype, shape, data_offsets}}, "__metadata__"), then
// the raw little-endian tensor bytes. Reads touch only the requested tensor's bytes; writes stream one
// tensor at a time into a temporary file that is fsynced and renamed into place.
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';

export type StDType = 'F32' | 'F16' | 'BF16' | 'I8' | 'U8' | 'I32' | 'I64';

/** Bytes per element of each supported dtype. */
export const DTYPE_SIZE: Readonly<Record<StDType, number>> = Object.freeze({
  F32: 4,
  F16: 2,
  BF16: 2,
  I8: 1,
  U8: 1,
  I32: 4,
  I64: 8,
});

function isStDType(s: string): s is StDType {
  return Object.prototype.hasOwnProperty.call(DTYPE_SIZE, s);
}

export interface TensorInfo {
  name: string;
  dtype: StDType;
  shape: number[];
  /** The file holding the tensor. */
  file: string;
  /** Absolute byte offset of the tensor's first byte in `file`. */
  dataStart: number;
  byteLength: number;
}

/** The reference implementation refuses headers above 100 MB; so do we (a corrupt length is usually huge). */
const MAX_HEADER_BYTES = 100_000_000;

const entrySchema = z.object({
  dtype: z.string(),
  shape: z.array(z.number().int().nonnegative()),
  data_offsets: z.tuple([z.number().int().nonnegative(), z.number().int().nonnegative()]),
});

const indexSchema = z.object({
  metadata: z.record(z.string(), z.unknown()).optional(),
  weight_map: z.record(z.string(), z.string()),
});

function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Parses and validates one safetensors file's header; the file handle stays open for reads. */
async function readHeader(
  file: string,
  fh: FileHandle,
): Promise<{ tensors: TensorInfo[]; metadata: Record<string, string> }> {
  const size = (await fh.stat()).size;
  const bad = (msg: string, tensor?: string, hint?: string) =>
    new EdgeloraError(tensor === undefined ? msg : `tensor "${tensor}": ${msg}`, {
      where: file,
      hint: hint ?? 'the file is not a valid safetensors file (truncated or corrupt download?); fetch it again',
    });
  if (size < 8) throw bad(`file is ${size} bytes, shorter than the 8-byte header length`);
  const lenBuf = new Uint8Array(8);
  await readExactly(fh, lenBuf, 0, file);
  const headerLen64 = new DataView(lenBuf.buffer).getBigUint64(0, true);
  if (headerLen64 > BigInt(size - 8)) {
    throw bad(`header length ${headerLen64} is larger than the file (${size} bytes)`);
  }
  const headerLen = Number(headerLen64);
  if (headerLen > MAX_HEADER_BYTES) throw bad(`header length ${headerLen} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  const headerBytes = new Uint8Array(headerLen);
  await readExactly(fh, headerBytes, 8, file);
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (err) {
    throw bad(`header is not valid UTF-8 JSON (${(err as Error).message})`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw bad('header is not a JSON object');
  }
  const dataStart = 8 + headerLen;
  const dataLen = size - dataStart;
  const metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  const ranges: Array<{ name: string; begin: number; end: number }> = [];
  for (const [name, value] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === '__metadata__') {
      const meta = z.record(z.string(), z.string()).safeParse(value);
      if (!meta.success) throw bad('"__metadata__" must map strings to strings');
      Object.assign(metadata, meta.data);
      continue;
    }
    const entry = entrySchema.safeParse(value);
    if (!entry.success) {
      throw bad(`malformed header entry (${entry.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')})`, name);
    }
    const { dtype, shape, data_offsets } = entry.data;
    if (!isStDType(dtype)) {
      throw bad(`dtype "${dtype}" is not supported`, name, `edgelora reads ${Object.keys(DTYPE_SIZE).join(', ')}`);
    }
    const [begin, end] = data_offsets;
    const expected = numel(shape) * DTYPE_SIZE[dtype];
    if (end < begin || end - begin !== expected) {
      throw bad(
        `data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape [${shape.join(', ')}] of ${dtype} needs ${expected}`,
        name,
      );
    }
    if (end > dataLen) {
      throw bad(`data_offsets end ${end} lies beyond the end of the file's data region (${dataLen} bytes): truncated file`, name);
    }
    ranges.push({ name, begin, end });
    tensors.push({ name, dtype, shape, file, dataStart: dataStart + begin, byteLength: end - begin });
  }
  // Like the reference validator: tensors are packed back to back and cover the data region exactly.
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  for (const r of ranges) {
    if (r.begin < cursor) throw bad(`data_offsets [${r.begin}, ${r.end}] overlap the previous tensor (ends at ${cursor})`, r.name);
    if (r.begin > cursor) throw bad(`gap before data_offsets [${r.begin}, ${r.end}]: bytes ${cursor}..${r.begin} belong to no tensor`, r.name);
    cursor = r.end;
  }
  if (cursor !== dataLen) {
    throw bad(`tensors cover ${cursor} bytes of data but the file has ${dataLen} after the header`);
  }
  return { tensors, metadata };
}

async function readExactly(fh: FileHandle, buf: Uint8Array, position: number, file: string): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesRead } = await fh.read(buf, off, buf.length - off, position + off);
    if (bytesRead === 0) {
      throw new EdgeloraError(`unexpected end of file at byte ${position + off}`, { where: file, hint: 'the file is truncated; fetch it again' });
    }
    off += bytesRead;
  }
}

/** Reads tensors from one safetensors file or a sharded checkpoint, one tensor at a time. */
export class SafetensorsReader {
  /** The file's `__metadata__` (merged over shards). */
  readonly metadata: Record<string, string>;
  private readonly tensors: Map<string, TensorInfo>;
  private readonly handles: Map<string, FileHandle>;
  /** What was opened (file, or directory), for error messages. */
  readonly source: string;

  private constructor(source: string, tensors: Map<string, TensorInfo>, metadata: Record<string, string>, handles: Map<string, FileHandle>) {
    this.source = source;
    this.tensors = tensors;
    this.metadata = metadata;
    this.handles = handles;
  }

  /**
   * Opens a `.safetensors` file, a sharded index (`*.safetensors.index.json`), or a directory holding
   * `model.safetensors.index.json` (preferred) or `model.safetensors`. Validates every header.
   */
  static async open(pathOrDir: string): Promise<SafetensorsReader> {
    const st = await fs.stat(pathOrDir).catch(() => null);
    if (!st) {
      throw new EdgeloraError('no such file or directory', { where: pathOrDir, hint: 'check the model path' });
    }
    if (st.isDirectory()) {
      const index = path.join(pathOrDir, 'model.safetensors.index.json');
      if (await exists(index)) return SafetensorsReader.openIndex(index);
      const single = path.join(pathOrDir, 'model.safetensors');
      if (await exists(single)) return SafetensorsReader.openFiles(pathOrDir, [single]);
      const found = (await fs.readdir(pathOrDir)).filter((f) => f.endsWith('.safetensors'));
      throw new EdgeloraError('no model.safetensors or model.safetensors.index.json in this directory', {
        where: pathOrDir,
        hint: found.length
          ? `found ${found.join(', ')}: pass the file path itself`
          : 'a Hugging Face checkpoint directory holds model.safetensors (or shards with an index); convert .bin/.pt checkpoints first',
      });
    }
    if (pathOrDir.endsWith('.index.json')) return SafetensorsReader.openIndex(pathOrDir);
    return SafetensorsReader.openFiles(pathOrDir, [pathOrDir]);
  }

  private static async openIndex(indexFile: string): Promise<SafetensorsReader> {
    let json: unknown;
    try {
      json = JSON.parse(await fs.readFile(indexFile, 'utf8'));
    } catch (err) {
      throw new EdgeloraError(`cannot read the shard index: ${(err as Error).message}`, { where: indexFile });
    }
    const idx = indexSchema.safeParse(json);
    if (!idx.success) {
      throw new EdgeloraError(`not a safetensors shard index: ${idx.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, {
        where: indexFile,
        hint: 'expected {"weight_map": {"tensor name": "shard file"}}',
      });
    }
    const dir = path.dirname(indexFile);
    const shards = [...new Set(Object.values(idx.data.weight_map))].sort();
    for (const shard of shards) {
      if (!(await exists(path.join(dir, shard)))) {
        const first = Object.entries(idx.data.weight_map).find(([, f]) => f === shard)?.[0] ?? '?';
        throw new EdgeloraError(`shard "${shard}" (holding tensor "${first}") is missing`, {
          where: indexFile,
          hint: 'download every shard listed in the index',
        });
      }
    }
    const reader = await SafetensorsReader.openFiles(indexFile, shards.map((s) => path.join(dir, s)));
    for (const [name, shard] of Object.entries(idx.data.weight_map)) {
      const info = reader.tensors.get(name);
      if (!info || path.basename(info.file) !== path.basename(shard)) {
        await reader.close();
        throw new EdgeloraError(`tensor "${name}" is listed in shard "${shard}" but is not in it`, {
          where: indexFile,
          hint: 'the index and shards come from different checkpoints; fetch them again',
        });
      }
    }
    return reader;
  }

  private static async openFiles(source: string, files: string[]): Promise<SafetensorsReader> {
    const handles = new Map<string, FileHandle>();
    const tensors = new Map<string, TensorInfo>();
    const metadata: Record<string, string> = {};
    try {
      for (const file of files) {
        let fh: FileHandle;
        try {
          fh = await fs.open(file, 'r');
        } catch (err) {
          throw new EdgeloraError(`cannot open: ${(err as Error).message}`, { where: file });
        }
        handles.set(file, fh);
        const h = await readHeader(file, fh);
        Object.assign(metadata, h.metadata);
        for (const t of h.tensors) {
          const prev = tensors.get(t.name);
          if (prev) {
            throw new EdgeloraError(`tensor "${t.name}" appears in both ${prev.file} and ${file}`, { where: source });
          }
          tensors.set(t.name, t);
        }
      }
    } catch (err) {
      for (const fh of handles.values()) await fh.close();
      throw err;
    }
    return new SafetensorsReader(source, tensors, metadata, handles);
  }

  /** Tensor names, in sorted order. */
  names(): string[] {
    return [...this.tensors.keys()].sort();
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) {
      throw new EdgeloraError(`tensor "${name}" not found`, {
        where: this.source,
        hint: `the checkpoint has ${this.tensors.size} tensors (e.g. ${this.names().slice(0, 3).join(', ')}); is it the right model/architecture?`,
      });
    }
    return t;
  }

  /** The tensor's raw little-endian bytes; reads only those bytes. */
  async readRaw(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    const fh = this.handles.get(t.file);
    if (!fh) throw new EdgeloraError('reader is closed', { where: `${t.file}: ${name}` });
    const buf = new Uint8Array(t.byteLength);
    await readExactly(fh, buf, t.dataStart, t.file);
    return buf;
  }

  /**
   * The tensor as float32 (F32/F16/BF16 converted). Integer tensors are refused unless
   * `opts.allowInt` is set, in which case their values are converted to float32.
   */
  async readF32(name: string, opts: { allowInt?: boolean } = {}): Promise<Float32Array> {
    const t = this.info(name);
    if (!opts.allowInt && !(t.dtype === 'F32' || t.dtype === 'F16' || t.dtype === 'BF16')) {
      throw new EdgeloraError(`tensor "${name}" is ${t.dtype}, not a float tensor`, {
        where: t.file,
        hint: 'integer tensors are packed/quantized data; read them with readRaw',
      });
    }
    return rawToF32(await this.readRaw(name), t.dtype);
  }

  async close(): Promise<void> {
    const hs = [...this.handles.values()];
    this.handles.clear();
    for (const fh of hs) await fh.close();
  }
}

async function exists(p: string): Promise<boolean> {
  return fs.stat(p).then(
    () => true,
    () => false,
  );
}

/** Converts little-endian raw bytes of `dtype` to float32 values. */
export function rawToF32(raw: Uint8Array, dtype: StDType): Float32Array {
  const n = raw.byteLength / DTYPE_SIZE[dtype];
  // Typed-array views need aligned offsets; copy when the source is not aligned.
  // (new Uint8Array(raw) copies; a Node Buffer's .slice() would return a view at the same offset.)
  const aligned = raw.byteOffset % 8 === 0 ? raw : new Uint8Array(raw);
  const buf = aligned.buffer;
  const off = aligned.byteOffset;
  switch (dtype) {
    case 'F32':
      return new Float32Array(buf, off, n);
    case 'F16':
      return f16ToF32(new Uint16Array(buf, off, n));
    case 'BF16':
      return bf16ToF32(new Uint16Array(buf, off, n));
    case 'I8':
      return Float32Array.from(new Int8Array(buf, off, n));
    case 'U8':
      return Float32Array.from(aligned);
    case 'I32':
      return Float32Array.from(new Int32Array(buf, off, n));
    case 'I64': {
      const src = new BigInt64Array(buf, off, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = Number(src[i]);
      return out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions (IEEE 754 binary16 and bfloat16), round to nearest, ties to even.

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** float32 value → binary16 bit pattern (round to nearest even; overflow → ±Inf; NaN stays NaN). */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0] as number;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15; // rebiased exponent
  if (e >= 0x1f) return sign | 0x7c00; // too large: infinity
  if (e <= 0) {
    // Subnormal half (or underflow to zero): shift the implicit-1 mantissa right.
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e; // 24-bit significand → 10-bit field scaled by 2^(e-1)
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1))) half++;
    return sign | half; // a carry into the exponent field yields the smallest normal, as it should
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++; // may carry into exponent/Inf: correct
  return sign | half;
}

let f16Table: Float32Array | null = null;

/** binary16 bit pattern → number. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** float32 value → bfloat16 bit pattern (round to nearest even; NaN stays a quiet NaN). */
export function f32ToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0] as number;
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return ((bits >>> 16) | 0x40) & 0xffff;
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

/** bfloat16 bit pattern → number. */
export function bf16BitsToF32(b: number): number {
  u32Scratch[0] = (b & 0xffff) << 16;
  return f32Scratch[0] as number;
}

export function f32ToF16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = f32ToF16Bits(src[i] as number);
  return out;
}

export function f16ToF32(src: Uint16Array): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToF32(h);
  }
  const table = f16Table;
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = table[src[i] as number] as number;
  return out;
}

export function f32ToBf16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const bits = u[i] as number;
    if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) out[i] = ((bits >>> 16) | 0x40) & 0xffff;
    else out[i] = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
  }
  return out;
}

export function bf16ToF32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) u[i] = (src[i] as number) << 16;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing

export type TensorData = Uint8Array | Float32Array;

export interface WriteEntry {
  name: string;
  dtype: StDType;
  shape: number[];
  /**
   * Raw little-endian bytes (Uint8Array), or float32 values (Float32Array; converted when dtype is
   * F16/BF16, refused for integer dtypes), or a producer called once, when this tensor is written.
   */
  data: TensorData | (() => Promise<TensorData>);
}

function toBytes(e: WriteEntry, data: TensorData, file: string): Uint8Array {
  let bytes: Uint8Array;
  if (data instanceof Float32Array) {
    if (e.dtype === 'F32') bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    else if (e.dtype === 'F16') bytes = new Uint8Array(f32ToF16(data).buffer);
    else if (e.dtype === 'BF16') bytes = new Uint8Array(f32ToBf16(data).buffer);
    else {
      throw new EdgeloraError(`tensor "${e.name}": float32 data given for integer dtype ${e.dtype}`, {
        where: file,
        hint: 'pass the raw bytes as a Uint8Array',
      });
    }
  } else {
    bytes = data;
  }
  const expected = numel(e.shape) * DTYPE_SIZE[e.dtype];
  if (bytes.byteLength !== expected) {
    throw new EdgeloraError(
      `tensor "${e.name}": ${bytes.byteLength} bytes given but shape [${e.shape.join(', ')}] of ${e.dtype} needs ${expected}`,
      { where: file },
    );
  }
  return bytes;
}

/**
 * Writes a safetensors file atomically, tensors in the given order. Lazy producers are called one
 * at a time, so peak memory is about one tensor. The header is padded with spaces to a multiple of
 * 8 bytes, as the reference implementation does.
 */
export async function writeSafetensors(file: string, entries: WriteEntry[], metadata?: Record<string, string>): Promise<void> {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  const seen = new Set<string>();
  for (const e of entries) {
    if (e.name === '__metadata__' || seen.has(e.name)) {
      throw new EdgeloraError(`tensor name "${e.name}" is duplicated or reserved`, { where: file });
    }
    if (!isStDType(e.dtype)) throw new EdgeloraError(`tensor "${e.name}": unsupported dtype ${String(e.dtype)}`, { where: file });
    if (!e.shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new EdgeloraError(`tensor "${e.name}": bad shape [${e.shape.join(', ')}]`, { where: file });
    }
    seen.add(e.name);
    const len = numel(e.shape) * DTYPE_SIZE[e.dtype];
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + len] };
    offset += len;
  }
  let headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - (headerBytes.length % 8)) % 8;
  if (pad) {
    const padded = new Uint8Array(headerBytes.length + pad).fill(0x20);
    padded.set(headerBytes);
    headerBytes = padded;
  }
  const lenBytes = new Uint8Array(8);
  new DataView(lenBytes.buffer).setBigUint64(0, BigInt(headerBytes.length), true);

  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fh = await fs.open(tmp, 'w', 0o644);
  try {
    await writeAll(fh, lenBytes);
    await writeAll(fh, headerBytes);
    for (const e of entries) {
      const data = typeof e.data === 'function' ? await e.data() : e.data;
      await writeAll(fh, toBytes(e, data, file));
    }
    await fh.sync();
    await fh.close();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await fs.rename(tmp, file);
  const dh = await fs.open(path.dirname(file), 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

async function writeAll(fh: FileHandle, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.byteLength) {
    const { bytesWritten } = await fh.write(bytes, off, bytes.byteLength - off);
    off += bytesWritten;
  }
}
