// The blob format "edgelora-pack/1": an adapter directory (its top-level regular files) packed
// deterministically into one byte string, so the same directory always gives the same sha256.
// Layout (all integers big-endian): "ELPK", u32 version = 1, u32 file count, then per file in
// ascending byte order of name: u16 name length, name (UTF-8), u64 size, bytes. Nothing follows.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';

export const PACK_MAGIC = Buffer.from('ELPK', 'ascii');
/** File names a pack may hold: one path level, no dot files, no separators. */
export const PACK_NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
export const MAX_PACK_FILES = 64;
export const REQUIRED_FILES = ['adapter_config.json', 'adapter_model.safetensors'] as const;

export interface PackedFile {
  name: string;
  data: Buffer;
}

export function sha256Hex(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Reads the adapter directory's top-level regular files (subdirectories are not part of an adapter). */
export async function readAdapterFiles(dir: string): Promise<PackedFile[]> {
  const ents = await fs.readdir(dir, { withFileTypes: true }).catch((err: unknown) => {
    throw new EdgeloraError(`cannot read adapter directory: ${(err as Error).message}`, { where: dir });
  });
  const files: PackedFile[] = [];
  for (const e of ents) {
    if (!e.isFile() || !PACK_NAME_RE.test(e.name)) continue;
    files.push({ name: e.name, data: await fs.readFile(path.join(dir, e.name)) });
  }
  for (const req of REQUIRED_FILES) {
    if (!files.some((f) => f.name === req)) {
      throw new EdgeloraError(`adapter directory lacks ${req}`, { where: dir, hint: 'an adapter is a PEFT directory: adapter_config.json + adapter_model.safetensors' });
    }
  }
  return files;
}

export function packFiles(files: PackedFile[]): Buffer {
  const sorted = [...files].sort((a, b) => Buffer.compare(Buffer.from(a.name), Buffer.from(b.name)));
  if (sorted.length > MAX_PACK_FILES) throw new EdgeloraError(`too many files (${sorted.length} > ${MAX_PACK_FILES})`);
  const parts: Buffer[] = [];
  const head = Buffer.alloc(12);
  PACK_MAGIC.copy(head, 0);
  head.writeUInt32BE(1, 4);
  head.writeUInt32BE(sorted.length, 8);
  parts.push(head);
  for (const f of sorted) {
    if (!PACK_NAME_RE.test(f.name)) throw new EdgeloraError(`file name not allowed in a pack: "${f.name}"`);
    const nameBuf = Buffer.from(f.name, 'utf8');
    const h = Buffer.alloc(2 + nameBuf.length + 8);
    h.writeUInt16BE(nameBuf.length, 0);
    nameBuf.copy(h, 2);
    h.writeBigUInt64BE(BigInt(f.data.length), 2 + nameBuf.length);
    parts.push(h, f.data);
  }
  return Buffer.concat(parts);
}

export async function packAdapterDir(dir: string): Promise<Buffer> {
  return packFiles(await readAdapterFiles(dir));
}

/** Where one file of a pack lies: its bytes are blob[offset, offset + size). */
export interface PackEntry {
  name: string;
  offset: number;
  size: number;
}

/**
 * Reads a pack's table of contents through `read(offset, length)` (a buffer or a file), checking
 * every length and name, without holding the file contents: a device unpacks a large adapter in
 * bounded memory. Throws EdgeloraError naming what is wrong.
 */
export async function readPackIndex(read: (offset: number, length: number) => Promise<Buffer>, total: number): Promise<PackEntry[]> {
  const bad = (why: string) => new EdgeloraError(`bad adapter pack: ${why}`, { where: 'blob' });
  if (total < 12) throw bad('missing "ELPK" magic');
  const head = await read(0, 12);
  if (!head.subarray(0, 4).equals(PACK_MAGIC)) throw bad('missing "ELPK" magic');
  if (head.readUInt32BE(4) !== 1) throw bad(`unknown pack version ${head.readUInt32BE(4)}`);
  const n = head.readUInt32BE(8);
  if (n > MAX_PACK_FILES) throw bad(`${n} files > ${MAX_PACK_FILES}`);
  let off = 12;
  const entries: PackEntry[] = [];
  let prev: Buffer | null = null;
  for (let i = 0; i < n; i++) {
    if (off + 2 > total) throw bad('truncated file header');
    const nl = (await read(off, 2)).readUInt16BE(0);
    if (off + 2 + nl + 8 > total) throw bad('truncated file header');
    const h = await read(off + 2, nl + 8);
    const nameBuf = h.subarray(0, nl);
    const name = nameBuf.toString('utf8');
    if (!PACK_NAME_RE.test(name)) throw bad(`file name not allowed: ${JSON.stringify(name)}`);
    if (prev && Buffer.compare(prev, nameBuf) >= 0) throw bad('file names not in strictly ascending order');
    prev = Buffer.from(nameBuf);
    const size = h.readBigUInt64BE(nl);
    off += 2 + nl + 8;
    if (size > BigInt(total - off)) throw bad(`file ${name} runs past the end`);
    entries.push({ name, offset: off, size: Number(size) });
    off += Number(size);
  }
  if (off !== total) throw bad(`${total - off} trailing bytes`);
  for (const req of REQUIRED_FILES) if (!entries.some((e) => e.name === req)) throw bad(`lacks ${req}`);
  return entries;
}

/** Unpacks a blob held in memory (the files are views into it). */
export async function unpack(blob: Uint8Array): Promise<PackedFile[]> {
  const buf = Buffer.from(blob.buffer, blob.byteOffset, blob.length);
  const entries = await readPackIndex(async (o, l) => buf.subarray(o, o + l), buf.length);
  return entries.map((e) => ({ name: e.name, data: buf.subarray(e.offset, e.offset + e.size) }));
}

/** JSON files larger than this are not read for adapterInfo (bytes). */
const MAX_INFO_JSON = 1024 * 1024;

/**
 * The index and AdapterInfo of a pack read through `read` (a file on disk): only the small JSON
 * files are held in memory, one at a time, so this is bounded whatever the adapter's size.
 */
export async function readPackInfo(read: (offset: number, length: number) => Promise<Buffer>, total: number): Promise<{ entries: PackEntry[]; info: AdapterInfo }> {
  const entries = await readPackIndex(read, total);
  const small: PackedFile[] = [];
  for (const e of entries) {
    // Copied: `read` may reuse its buffer.
    if (e.name.endsWith('.json') && e.size <= MAX_INFO_JSON) small.push({ name: e.name, data: Buffer.from(await read(e.offset, e.size)) });
  }
  return { entries, info: adapterInfo(small) };
}

/** What a hub puts in a manifest about an adapter, read from its PEFT config and edgelora_adapter.json. */
export interface AdapterInfo {
  rank: number;
  alpha: number;
  targets: string[];
  baseFingerprint: string | null;
  /** The source model (edgelora_adapter.json `source_fingerprint`); absent for adapters from before source binding. */
  baseSourceFingerprint?: string;
}

const PeftConfigSchema = z.looseObject({
  peft_type: z.string().optional(),
  r: z.number().int().positive().default(8),
  lora_alpha: z.number().finite().default(8),
  target_modules: z.union([z.array(z.string()), z.string(), z.null()]).optional(),
});
const EdgeloraAdapterSchema = z.looseObject({ format: z.string().optional(), base_fingerprint: z.string().optional(), source_fingerprint: z.string().regex(/^[0-9a-f]{64}$/).optional() });

function parseJsonFile<T>(schema: z.ZodType<T>, data: Buffer, where: string): T {
  let raw: unknown;
  try {
    raw = JSON.parse(data.toString('utf8'));
  } catch (err) {
    throw new EdgeloraError(`not JSON: ${(err as Error).message}`, { where });
  }
  const r = schema.safeParse(raw);
  if (!r.success) throw new EdgeloraError(`unexpected content: ${r.error.issues[0]?.message ?? 'invalid'}`, { where: `${where} ${r.error.issues[0]?.path.join('.') ?? ''}` });
  return r.data;
}

export function adapterInfo(files: PackedFile[]): AdapterInfo {
  const cfgFile = files.find((f) => f.name === 'adapter_config.json');
  if (!cfgFile) throw new EdgeloraError('adapter lacks adapter_config.json');
  const cfg = parseJsonFile(PeftConfigSchema, cfgFile.data, 'adapter_config.json');
  const el = files.find((f) => f.name === 'edgelora_adapter.json');
  const meta = el ? parseJsonFile(EdgeloraAdapterSchema, el.data, 'edgelora_adapter.json') : null;
  const tm = cfg.target_modules;
  return {
    rank: cfg.r,
    alpha: cfg.lora_alpha,
    targets: tm === undefined || tm === null ? [] : typeof tm === 'string' ? [tm] : tm,
    baseFingerprint: meta?.base_fingerprint ?? null,
    ...(meta?.source_fingerprint ? { baseSourceFingerprint: meta.source_fingerprint } : {}),
  };
}

/** Reads a quantized model directory's base fingerprint (manifest.json `fingerprint`). */
export async function readModelFingerprint(modelDir: string): Promise<string> {
  const file = path.join(modelDir, 'manifest.json');
  const data = await fs.readFile(file).catch((err: unknown) => {
    throw new EdgeloraError(`cannot read model manifest: ${(err as Error).message}`, { where: file, hint: '--model takes a quantized model directory' });
  });
  const m = parseJsonFile(z.looseObject({ fingerprint: z.string().regex(/^[0-9a-f]{16,128}$/) }), data, file);
  return m.fingerprint;
}
