// The one resumable file of fleet sync: a part file written piece by piece (chunks on a device,
// upload segments on the hub), the bitmap of pieces it holds, and a state file that claims them.
// Data is fsynced before the state that claims it is written (atomically), so a crash never marks
// a piece held that is not on disk; on resume every claimed piece can be re-verified. Reads are
// streamed through one bounded buffer: memory stays bounded whatever the file's size.
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import { writeFileAtomic } from '../../util/atomic.js';
import { Bitmap } from '../protocol/bitmap.js';

/** Largest read buffer (bytes): hashing and copying go through it 1 MiB at a time. */
const READ_PIECE = 1 << 20;

export interface Geometry {
  /** Total bytes. */
  size: number;
  /** Bytes per piece (the last one may be shorter). */
  pieceSize: number;
}

export interface ResumableOptions<M> {
  partFile: string;
  stateFile: string;
  /** Name of the metadata field in the state file ("manifest" on a device, "init" on the hub). */
  metaKey: string;
  /** Milliseconds to batch state writes after piece writes; default 250. */
  persistDelayMs?: number;
  onPersistError?: (err: unknown) => void;
  /** The metadata stored beside the bitmap (what the file is of). */
  meta: M;
  geometry: Geometry;
}

export interface ResumeOptions<M> extends Omit<ResumableOptions<M>, 'meta' | 'geometry'> {
  /** Validates the stored metadata; null (or a throw) discards the saved state. */
  parseMeta: (raw: unknown) => M | null;
  geometryOf: (meta: M) => Geometry;
  /** Re-checks a claimed piece read back from disk (e.g. against a chunk hash); default: trusted. */
  verifyPiece?: (meta: M, index: number, data: Buffer) => boolean;
}

const StateFile = z.looseObject({ have: z.string() });

export class ResumableFile<M> {
  private persistTimer: NodeJS.Timeout | null = null;
  private persisting: Promise<void> = Promise.resolve();
  private closed = false;
  private buf: Buffer | null = null;
  readonly pieces: number;

  private constructor(
    private readonly fh: FileHandle,
    readonly meta: M,
    readonly geometry: Geometry,
    readonly have: Bitmap,
    private readonly o: Omit<ResumableOptions<M>, 'meta' | 'geometry'>,
  ) {
    this.pieces = have.size;
  }

  get partFile(): string {
    return this.o.partFile;
  }

  static pieceCount(g: Geometry): number {
    return Math.ceil(g.size / g.pieceSize);
  }

  /** Starts a new file: a part file of `size` bytes (sparse) and a state claiming nothing. */
  static async create<M>(o: ResumableOptions<M>): Promise<ResumableFile<M>> {
    const fh = await fs.open(o.partFile, 'w+');
    try {
      await fh.truncate(o.geometry.size);
      const { meta, geometry, ...rest } = o;
      const f = new ResumableFile(fh, meta, geometry, new Bitmap(ResumableFile.pieceCount(geometry)), rest);
      await f.persist();
      return f;
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Resumes a file saved by an earlier run, re-verifying every piece its state claims. Null when
   * there is nothing usable to resume (no state, unreadable state, metadata refused, no part file);
   * the caller then starts over.
   */
  static async resume<M>(o: ResumeOptions<M>): Promise<{ file: ResumableFile<M>; dropped: number } | null> {
    const raw = await fs.readFile(o.stateFile, 'utf8').catch(() => null);
    if (raw === null) return null;
    let meta: M | null;
    let haveB64: string;
    try {
      const parsed = StateFile.parse(JSON.parse(raw));
      haveB64 = parsed.have;
      meta = o.parseMeta(parsed[o.metaKey]);
    } catch {
      return null;
    }
    if (meta === null) return null;
    const geometry = o.geometryOf(meta);
    const have = Bitmap.fromBase64(ResumableFile.pieceCount(geometry), haveB64);
    if (!have) return null;
    const fh = await fs.open(o.partFile, 'r+').catch(() => null);
    if (!fh) return null;
    const { parseMeta: _p, geometryOf: _g, verifyPiece, ...rest } = o;
    const f = new ResumableFile(fh, meta, geometry, have, rest);
    const st = await fh.stat();
    if (st.size !== geometry.size) await fh.truncate(geometry.size);
    let dropped = 0;
    if (verifyPiece) {
      for (const i of have.indices()) {
        const len = f.pieceLength(i);
        const data = await f.readMaybe(i * geometry.pieceSize, len);
        if (!data || !verifyPiece(meta, i, data)) {
          have.set(i, false);
          dropped++;
        }
      }
    }
    return { file: f, dropped };
  }

  pieceLength(i: number): number {
    const g = this.geometry;
    return i === this.pieces - 1 ? g.size - i * g.pieceSize : g.pieceSize;
  }

  get complete(): boolean {
    return this.have.count() === this.pieces;
  }

  /**
   * Writes piece `i` (its length must be pieceLength(i)) and marks it held; the state follows
   * within persistDelayMs. Returns false when the piece was already held (nothing written).
   */
  async writePiece(i: number, data: Uint8Array): Promise<boolean> {
    if (i < 0 || i >= this.pieces) throw new EdgeloraError(`piece ${i} is outside 0..${this.pieces - 1}`, { where: this.o.partFile });
    if (data.length !== this.pieceLength(i)) throw new EdgeloraError(`piece ${i} has ${data.length} bytes, expected ${this.pieceLength(i)}`, { where: this.o.partFile });
    if (this.have.get(i)) return false;
    await this.fh.write(data, 0, data.length, i * this.geometry.pieceSize);
    this.have.set(i);
    this.schedulePersist();
    return true;
  }

  /** Forgets every piece (e.g. the whole file failed its hash): they will be written again. */
  forget(): void {
    for (let i = this.have.next(); i >= 0; i = this.have.next(i + 1)) this.have.set(i, false);
    this.schedulePersist();
  }

  private schedulePersist(): void {
    if (this.closed) return;
    this.persistTimer ??= setTimeout(() => {
      this.persistTimer = null;
      this.persist().catch((err: unknown) => this.o.onPersistError?.(err));
    }, this.o.persistDelayMs ?? 250);
  }

  /** Saves the state now: the claimed bitmap is taken first, then the data fsynced, then the state written. */
  persist(): Promise<void> {
    if (this.persistTimer) {
      clearTimeout(this.persistTimer);
      this.persistTimer = null;
    }
    const p = this.persisting.then(async () => {
      if (this.closed) return;
      // Taken before the fsync: every piece it claims was written before the fsync began.
      const have = this.have.toBase64();
      await this.fh.sync();
      await writeFileAtomic(this.o.stateFile, JSON.stringify({ [this.o.metaKey]: this.meta, have }));
    });
    this.persisting = p.catch(() => undefined);
    return p;
  }

  private async readMaybe(offset: number, length: number): Promise<Buffer | null> {
    const out = length <= READ_PIECE ? (this.buf ??= Buffer.allocUnsafe(READ_PIECE)).subarray(0, length) : Buffer.allocUnsafe(length);
    const { bytesRead } = await this.fh.read(out, 0, length, offset);
    return bytesRead === length ? out : null;
  }

  /**
   * Reads `length` bytes at `offset`. Up to 1 MiB the bytes live in a buffer that the next read
   * reuses: copy what must outlive it.
   */
  async read(offset: number, length: number): Promise<Buffer> {
    const out = await this.readMaybe(offset, length);
    if (!out) throw new EdgeloraError(`short read of ${length} bytes at ${offset}`, { where: this.o.partFile });
    return out;
  }

  /** Streams the bytes from `offset` in pieces of at most 1 MiB (each valid until the next). */
  async *stream(offset = 0, length = this.geometry.size - offset): AsyncGenerator<Buffer> {
    for (let o = 0; o < length; o += READ_PIECE) yield await this.read(offset + o, Math.min(READ_PIECE, length - o));
  }

  /** sha256 of the whole file, streamed. */
  async sha256(): Promise<string> {
    const h = createHash('sha256');
    for await (const piece of this.stream()) h.update(piece);
    return h.digest('hex');
  }

  /** Stops: pending state is saved (unless `save` is false), the handle closed. */
  async close(save = true): Promise<void> {
    if (this.closed) return;
    if (save) await this.persist().catch(() => undefined);
    if (this.persistTimer) clearTimeout(this.persistTimer);
    this.closed = true;
    await this.persisting;
    await this.fh.close().catch(() => undefined);
  }

  /** Closes and removes the part and state files (a part file moved elsewhere first stays there). */
  async discard(): Promise<void> {
    await this.close(false);
    await fs.rm(this.o.partFile, { force: true });
    await fs.rm(this.o.stateFile, { force: true });
  }
}
