// The hub's adapter store: blobs content-addressed by sha256 under `<dir>/blobs/`, and one index
// file (`<dir>/index.json`) holding every blob's metadata, the adapter versions, the hub's sequence
// counter and each target's current signed manifest. Every write is atomic, so a hub restart (or
// crash) loses nothing that was acknowledged.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import lockfile from 'proper-lockfile';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import { fsyncDir, writeFileAtomic } from '../../util/atomic.js';
import { ManifestSchema, TargetSchema, type Manifest } from '../protocol/messages.js';
import { adapterInfo, readPackInfo, sha256Hex, unpack, type AdapterInfo } from '../transfer/pack.js';
import { NAME_RE } from '../protocol/topics.js';

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);

const BlobEntrySchema = z.strictObject({
  sha256: hex64,
  size: z.number().int().positive(),
  /** The name it arrived with (the default adapter id when published). */
  name: z.string().regex(NAME_RE),
  /** "publish" (operator) or "upload:<client id>". */
  source: z.string(),
  storedAt: z.iso.datetime(),
  info: z.strictObject({ rank: z.number(), alpha: z.number(), targets: z.array(z.string()), baseFingerprint: z.string().nullable(), baseSourceFingerprint: hex64.optional() }),
});
export type BlobEntry = z.infer<typeof BlobEntrySchema>;

const IndexSchema = z.strictObject({
  format: z.literal('edgelora-hub-store/1'),
  /** The last manifest sequence number handed out. */
  seq: z.number().int().nonnegative(),
  blobs: z.record(hex64, BlobEntrySchema),
  /** adapter id → blob sha256 → version. */
  versions: z.record(z.string(), z.record(hex64, z.number().int().positive())),
  /** target key ("fleet:x") → its current signed manifest. */
  targets: z.record(z.string(), ManifestSchema),
  /** target key → target, to rebuild Target objects. */
  targetDefs: z.record(z.string(), TargetSchema),
});
type Index = z.infer<typeof IndexSchema>;

export class HubStore {
  private writing: Promise<void> = Promise.resolve();
  private constructor(
    readonly dir: string,
    private index: Index,
    private readonly release: (() => Promise<void>) | null,
  ) {}

  /**
   * Opens (creating when missing) a store. With `lock` (what a hub does) the store is locked for
   * this process until close(): two hubs on one store would hand out the same seq numbers and
   * overwrite each other's index. The lock is a directory refreshed every few seconds, so a
   * killed hub's lock goes stale and the next hub takes it over.
   */
  static async open(dir: string, o: { lock?: boolean } = {}): Promise<HubStore> {
    await fs.mkdir(path.join(dir, 'blobs'), { recursive: true });
    await fs.mkdir(path.join(dir, 'uploads'), { recursive: true });
    let release: (() => Promise<void>) | null = null;
    if (o.lock) {
      try {
        release = await lockfile.lock(dir, { lockfilePath: path.join(dir, 'hub.lock'), stale: 10_000, realpath: false });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ELOCKED') {
          throw new EdgeloraError('the store is in use by another running hub', {
            where: dir,
            hint: 'stop the other `edgelora hub` first, or give this one its own --store (a hub killed without stopping frees the store within 10 s)',
          });
        }
        throw err;
      }
    }
    try {
      return await HubStore.load(dir, release);
    } catch (err) {
      await release?.().catch(() => undefined);
      throw err;
    }
  }

  private static async load(dir: string, release: (() => Promise<void>) | null): Promise<HubStore> {
    const file = path.join(dir, 'index.json');
    let index: Index = { format: 'edgelora-hub-store/1', seq: 0, blobs: {}, versions: {}, targets: {}, targetDefs: {} };
    const raw = await fs.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return null;
      throw err;
    });
    if (raw !== null) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(raw);
      } catch (err) {
        throw new EdgeloraError(`store index is not JSON: ${(err as Error).message}`, { where: file });
      }
      const r = IndexSchema.safeParse(parsed);
      if (!r.success) throw new EdgeloraError(`store index is invalid: ${r.error.issues[0]?.message ?? ''}`, { where: `${file} ${r.error.issues[0]?.path.join('.') ?? ''}` });
      index = r.data;
    }
    for (const sha of Object.keys(index.blobs)) {
      const ok = await fs.stat(path.join(dir, 'blobs', sha)).then(() => true, () => false);
      if (!ok) throw new EdgeloraError(`store index names blob ${sha} but its file is missing`, { where: path.join(dir, 'blobs') });
    }
    return new HubStore(dir, index, release);
  }

  /** Waits for pending index writes and releases the lock (if this store holds one). */
  async close(): Promise<void> {
    await this.writing;
    await this.release?.().catch(() => undefined);
  }

  get uploadsDir(): string {
    return path.join(this.dir, 'uploads');
  }
  blobPath(sha: string): string {
    return path.join(this.dir, 'blobs', sha);
  }

  private save(): Promise<void> {
    const snapshot = JSON.stringify(this.index, null, 1);
    const p = this.writing.then(() => writeFileAtomic(path.join(this.dir, 'index.json'), snapshot));
    this.writing = p.catch(() => undefined);
    return p;
  }

  /** Validates a blob as an adapter pack and stores it (idempotent by content). */
  async putBlob(blob: Buffer, meta: { name: string; source: string; now?: Date }): Promise<BlobEntry> {
    const sha = sha256Hex(blob);
    const existing = this.index.blobs[sha];
    if (existing) return existing;
    const info: AdapterInfo = adapterInfo(await unpack(blob));
    await writeFileAtomic(this.blobPath(sha), blob);
    const entry: BlobEntry = { sha256: sha, size: blob.length, name: meta.name, source: meta.source, storedAt: (meta.now ?? new Date()).toISOString(), info };
    this.index.blobs[sha] = entry;
    await this.save();
    return entry;
  }

  /**
   * Stores a verified file (a finished upload whose sha256 is `sha`) by moving it into blobs/:
   * validated as an adapter pack by streaming it, never read whole into memory.
   */
  async adoptFile(file: string, sha: string, meta: { name: string; source: string; now?: Date }): Promise<BlobEntry> {
    const existing = this.index.blobs[sha];
    if (existing) return existing;
    const fh = await fs.open(file, 'r');
    let info: AdapterInfo;
    let size: number;
    try {
      size = (await fh.stat()).size;
      const buf = Buffer.allocUnsafe(64 * 1024);
      const read = async (offset: number, length: number): Promise<Buffer> => {
        const out = length <= buf.length ? buf.subarray(0, length) : Buffer.allocUnsafe(length);
        const { bytesRead } = await fh.read(out, 0, length, offset);
        if (bytesRead !== length) throw new EdgeloraError(`short read at ${offset}`, { where: file });
        return out;
      };
      info = (await readPackInfo(read, size)).info;
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(file, this.blobPath(sha));
    await fsyncDir(path.dirname(this.blobPath(sha)));
    const entry: BlobEntry = { sha256: sha, size, name: meta.name, source: meta.source, storedAt: (meta.now ?? new Date()).toISOString(), info };
    this.index.blobs[sha] = entry;
    await this.save();
    return entry;
  }

  getEntry(sha: string): BlobEntry | undefined {
    return this.index.blobs[sha];
  }
  /** Finds a blob by full sha256 or a unique prefix (≥ 8 hex digits). */
  findBlob(idOrPrefix: string): BlobEntry | undefined {
    const want = idOrPrefix.replace(/^sha256:/, '');
    if (want.length < 8) return undefined;
    const hits = Object.values(this.index.blobs).filter((b) => b.sha256.startsWith(want));
    return hits.length === 1 ? hits[0] : undefined;
  }
  listBlobs(): BlobEntry[] {
    return Object.values(this.index.blobs);
  }
  /** A stored plaintext blob, or else a sealed publication's ciphertext (both named by their sha256). */
  async readBlob(sha: string): Promise<Buffer> {
    return fs.readFile(this.blobPath(sha)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
      return fs.readFile(this.sealedPath(sha));
    });
  }

  /**
   * Sealed publications (ciphertext) live under sealed/ while a target's current manifest names
   * them, so that repairs after a hub restart send the same bytes; setTarget prunes the rest.
   */
  sealedPath(sha: string): string {
    return path.join(this.dir, 'sealed', sha);
  }
  async putSealed(data: Buffer): Promise<string> {
    const sha = sha256Hex(data);
    await fs.mkdir(path.join(this.dir, 'sealed'), { recursive: true });
    await writeFileAtomic(this.sealedPath(sha), data);
    return sha;
  }
  private async pruneSealed(): Promise<void> {
    const keep = new Set(Object.values(this.index.targets).filter((m) => m.enc).map((m) => m.blob.sha256));
    const names = await fs.readdir(path.join(this.dir, 'sealed')).catch(() => [] as string[]);
    for (const n of names) if (!keep.has(n)) await fs.rm(path.join(this.dir, 'sealed', n), { force: true });
  }

  /** The version of `sha` under adapter id `id`: the same content keeps its version, new content gets max + 1. */
  versionFor(id: string, sha: string): number {
    const v = this.index.versions[id] ?? {};
    return v[sha] ?? Math.max(0, ...Object.values(v)) + 1;
  }
  nextSeq(): number {
    return this.index.seq + 1;
  }

  /**
   * Records a target's new manifest (and the seq and version it used) durably. `contentSha`: the
   * stored plaintext blob it publishes (a sealed manifest's blob.sha256 is its ciphertext's).
   */
  async setTarget(key: string, manifest: Manifest, contentSha: string = manifest.blob.sha256): Promise<void> {
    this.index.seq = Math.max(this.index.seq, manifest.seq);
    const versions = (this.index.versions[manifest.adapter.id] ??= {});
    versions[contentSha] = manifest.adapter.version;
    this.index.targets[key] = manifest;
    this.index.targetDefs[key] = manifest.target;
    await this.save();
    await this.pruneSealed();
  }
  /** Every adapter id and version blob `sha` was published under. */
  versionsOf(sha: string): { id: string; version: number }[] {
    return Object.entries(this.index.versions).flatMap(([id, v]) => (v[sha] === undefined ? [] : [{ id, version: v[sha] }]));
  }
  targets(): Manifest[] {
    return Object.values(this.index.targets);
  }
  target(key: string): Manifest | undefined {
    return this.index.targets[key];
  }
}
