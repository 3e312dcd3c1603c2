// GGUF v3 writer: metadata key/values with explicit value types, then the tensor table and the
// tensor data (each aligned to general.alignment). Tensor bytes are produced one at a time and
// streamed into a temporary sibling that is fsynced and renamed into place, so a failed export
// leaves no file behind.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { EdgeloraError } from '../../util/errors.js';
import { GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VALUE, GGUF_VERSION, GGML_TYPE, tensorBytes, type SupportedType } from './spec.js';

export type GgufMeta =
  | { type: 'string'; value: string }
  | { type: 'u32'; value: number }
  | { type: 'i32'; value: number }
  | { type: 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string[]'; value: readonly string[] }
  | { type: 'i32[]'; value: readonly number[] }
  | { type: 'f32[]'; value: readonly number[] };

export interface GgufTensorOut {
  readonly name: string;
  /** ggml order (dims[0] fastest): a PyTorch [N, K] weight is [K, N]. */
  readonly dims: readonly number[];
  readonly type: SupportedType;
  /** Produces the tensor's bytes when it is its turn to be written. */
  readonly data: () => Uint8Array | Promise<Uint8Array>;
}

class Bytes {
  private parts: Buffer[] = [];
  size = 0;
  push(b: Buffer): void {
    this.parts.push(b);
    this.size += b.length;
  }
  u32(v: number): void { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.push(b); }
  i32(v: number): void { const b = Buffer.alloc(4); b.writeInt32LE(v); this.push(b); }
  u64(v: number): void { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); this.push(b); }
  f32(v: number): void { const b = Buffer.alloc(4); b.writeFloatLE(v); this.push(b); }
  str(s: string): void { const b = Buffer.from(s, 'utf8'); this.u64(b.length); this.push(b); }
  concat(): Buffer { return Buffer.concat(this.parts); }
}

function writeMeta(out: Bytes, key: string, m: GgufMeta): void {
  out.str(key);
  switch (m.type) {
    case 'string': out.u32(GGUF_VALUE.STRING); out.str(m.value); break;
    case 'u32': out.u32(GGUF_VALUE.UINT32); out.u32(m.value); break;
    case 'i32': out.u32(GGUF_VALUE.INT32); out.i32(m.value); break;
    case 'f32': out.u32(GGUF_VALUE.FLOAT32); out.f32(m.value); break;
    case 'bool': out.u32(GGUF_VALUE.BOOL); out.push(Buffer.from([m.value ? 1 : 0])); break;
    case 'string[]': out.u32(GGUF_VALUE.ARRAY); out.u32(GGUF_VALUE.STRING); out.u64(m.value.length); for (const s of m.value) out.str(s); break;
    case 'i32[]': out.u32(GGUF_VALUE.ARRAY); out.u32(GGUF_VALUE.INT32); out.u64(m.value.length); for (const v of m.value) out.i32(v); break;
    case 'f32[]': out.u32(GGUF_VALUE.ARRAY); out.u32(GGUF_VALUE.FLOAT32); out.u64(m.value.length); for (const v of m.value) out.f32(v); break;
  }
}

/** Writes a GGUF file atomically. Returns its size in bytes. */
export async function writeGguf(target: string, metadata: ReadonlyArray<readonly [string, GgufMeta]>, tensors: readonly GgufTensorOut[]): Promise<number> {
  const align = GGUF_DEFAULT_ALIGNMENT;
  const head = new Bytes();
  head.u32(GGUF_MAGIC);
  head.u32(GGUF_VERSION);
  head.u64(tensors.length);
  head.u64(metadata.length);
  for (const [k, m] of metadata) writeMeta(head, k, m);
  let offset = 0;
  const sizes: number[] = [];
  for (const t of tensors) {
    const numel = t.dims.reduce((a, b) => a * b, 1);
    const bytes = tensorBytes(t.type, numel);
    if (!Number.isInteger(bytes)) throw new EdgeloraError(`tensor ${t.name}: ${numel} elements are not whole ${t.type} blocks`, { where: target });
    sizes.push(bytes);
    head.str(t.name);
    head.u32(t.dims.length);
    for (const d of t.dims) head.u64(d);
    head.u32(GGML_TYPE[t.type]);
    head.u64(offset);
    offset = Math.ceil((offset + bytes) / align) * align;
  }
  const header = head.concat();
  const dataStart = Math.ceil(header.length / align) * align;
  const tmp = path.join(path.dirname(path.resolve(target)), `.${path.basename(target)}.tmp-${randomBytes(4).toString('hex')}`);
  await fs.mkdir(path.dirname(path.resolve(target)), { recursive: true });
  const fh = await fs.open(tmp, 'w');
  try {
    await fh.write(header, 0, header.length, 0);
    let pos = dataStart;
    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i]!;
      const data = await t.data();
      if (data.length !== sizes[i]) {
        throw new EdgeloraError(`tensor ${t.name}: produced ${data.length} bytes, ${t.type} [${t.dims}] needs ${sizes[i]}`, { where: target });
      }
      await fh.write(data, 0, data.length, pos);
      pos = Math.ceil((pos + data.length) / align) * align;
    }
    await fh.truncate(pos);
    await fh.sync();
    await fh.close();
    await fs.rename(tmp, target);
    return pos;
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true });
    throw err;
  }
}
