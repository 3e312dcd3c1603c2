// The hub's side of uploads (device or operator → hub): `init` answered with the segments already
// held, each `seg` written into a ResumableFile and acknowledged, `fin` answered once the whole
// file hashed (streamed) to the announced sha256 and the store adopted it as an adapter pack.
// Upload state survives a hub restart under <store>/uploads/<client>-<sha256>.{part,json}.
import path from 'node:path';
import { EdgeloraError } from '../../util/errors.js';
import { Bitmap } from '../protocol/bitmap.js';
import { decodeJson, decodeSegment, UploadFinSchema, UploadInitSchema, type UploadAck, type UploadInit } from '../protocol/messages.js';
import { topics } from '../protocol/topics.js';
import { ResumableFile } from '../transfer/resumable-file.js';
import type { BlobEntry, HubStore } from './store.js';
import { unwrap, type EncKey } from '../protocol/envelope.js';
import { openSealedFile } from '../transfer/sealed-file.js';
import { promises as fs } from 'node:fs';

export interface UploadContext {
  store: HubStore;
  /** Largest upload accepted, bytes. */
  maxUploadBytes: number;
  ack(clientId: string, ack: Omit<UploadAck, 'type' | 'v'>): Promise<void>;
  refuse(reason: string, topic: string): void;
  stored(entry: BlobEntry, clientId: string): void;
  log(line: string): void;
  now(): Date;
  /** The hub's X25519 key, to open sealed uploads; absent: they are refused. */
  encKey?: EncKey;
}

export class Uploads {
  private readonly open = new Map<string, ResumableFile<UploadInit>>();
  constructor(private readonly ctx: UploadContext) {}

  private files(clientId: string, sha: string): { partFile: string; stateFile: string } {
    const base = path.join(this.ctx.store.uploadsDir, `${clientId}-${sha}`);
    return { partFile: `${base}.part`, stateFile: `${base}.json` };
  }

  /** The upload in memory, or (after a hub restart) resumed from disk. */
  private async find(clientId: string, sha: string): Promise<ResumableFile<UploadInit> | null> {
    const k = `${clientId}|${sha}`;
    const mem = this.open.get(k);
    if (mem) return mem;
    const r = await ResumableFile.resume<UploadInit>({
      ...this.files(clientId, sha),
      metaKey: 'init',
      parseMeta: (raw) => {
        const p = UploadInitSchema.safeParse(raw);
        return p.success && p.data.sha256 === sha ? p.data : null;
      },
      geometryOf: (init) => ({ size: init.size, pieceSize: init.segmentSize }),
      onPersistError: (err) => this.ctx.log(`hub: saving upload state of ${clientId}: ${(err as Error).message}`),
    });
    if (!r) return null;
    this.open.set(k, r.file);
    return r.file;
  }

  private async drop(clientId: string, f: ResumableFile<UploadInit>): Promise<void> {
    this.open.delete(`${clientId}|${f.meta.sha256}`);
    await f.discard();
  }

  async onMessage(clientId: string, stage: 'init' | 'seg' | 'fin', payload: Buffer): Promise<void> {
    if (stage === 'init') return this.onInit(clientId, payload);
    if (stage === 'seg') return this.onSegment(clientId, payload);
    return this.onFin(clientId, payload);
  }

  private async onInit(clientId: string, payload: Buffer): Promise<void> {
    const topic = topics.uploadInit(clientId);
    const d = decodeJson(UploadInitSchema, payload);
    if (!d.ok) return this.ctx.refuse(`upload init refused: ${d.reason}`, topic);
    const init = d.value;
    const n = Math.ceil(init.size / init.segmentSize);
    if (init.size > this.ctx.maxUploadBytes) return this.ctx.ack(clientId, { sha256: init.sha256, stage: 'init', ok: false, error: `upload of ${init.size} bytes exceeds the hub's limit of ${this.ctx.maxUploadBytes}` });
    if (init.enc) {
      const mine = this.ctx.encKey;
      const why = !mine
        ? 'this hub has no X25519 key to open sealed uploads (start it with --enc-key, from `edgelora keygen`)'
        : init.enc.recipient.keyId !== mine.keyId
          ? `the upload is sealed to key ${init.enc.recipient.keyId}, this hub's is ${mine.keyId}`
          : null;
      if (why) return this.ctx.ack(clientId, { sha256: init.sha256, stage: 'init', ok: false, error: why });
    }
    if (this.ctx.store.getEntry(init.sha256)) return this.ctx.ack(clientId, { sha256: init.sha256, stage: 'init', ok: true, have: Bitmap.full(n).toBase64() });
    let f = await this.find(clientId, init.sha256);
    if (f && (f.meta.size !== init.size || f.meta.segmentSize !== init.segmentSize)) {
      await this.drop(clientId, f);
      f = null;
    }
    if (!f) {
      f = await ResumableFile.create<UploadInit>({
        ...this.files(clientId, init.sha256),
        metaKey: 'init',
        meta: init,
        geometry: { size: init.size, pieceSize: init.segmentSize },
        persistDelayMs: 200,
        onPersistError: (err) => this.ctx.log(`hub: saving upload state of ${clientId}: ${(err as Error).message}`),
      });
      this.open.set(`${clientId}|${init.sha256}`, f);
    }
    return this.ctx.ack(clientId, { sha256: init.sha256, stage: 'init', ok: true, have: f.have.toBase64() });
  }

  private async onSegment(clientId: string, payload: Buffer): Promise<void> {
    const d = decodeSegment(payload);
    if (!d.ok) return this.ctx.refuse(`upload segment refused: ${d.reason}`, topics.uploadSegment(clientId));
    const { sha256, index, data } = d.value;
    const f = await this.find(clientId, sha256);
    if (!f) return this.ctx.ack(clientId, { sha256, stage: 'seg', index, ok: false, error: 'unknown upload: send init' });
    if (index >= f.pieces || data.length !== f.pieceLength(index)) {
      return this.ctx.ack(clientId, { sha256, stage: 'seg', index, ok: false, error: `segment ${index} has ${data.length} bytes, expected ${index >= f.pieces ? 'none' : f.pieceLength(index)}` });
    }
    await f.writePiece(index, data);
    return this.ctx.ack(clientId, { sha256, stage: 'seg', index, ok: true });
  }

  private async onFin(clientId: string, payload: Buffer): Promise<void> {
    const d = decodeJson(UploadFinSchema, payload);
    if (!d.ok) return this.ctx.refuse(`upload fin refused: ${d.reason}`, topics.uploadFin(clientId));
    const fin = d.value;
    const nack = (error: string) => this.ctx.ack(clientId, { sha256: fin.sha256, stage: 'fin', ok: false, error });
    if (this.ctx.store.getEntry(fin.sha256)) return this.ctx.ack(clientId, { sha256: fin.sha256, stage: 'fin', ok: true });
    const f = await this.find(clientId, fin.sha256);
    if (!f) return nack('unknown upload: send init');
    if (fin.size !== f.meta.size) return nack(`size ${fin.size} differs from init's ${f.meta.size}`);
    const lacking = f.pieces - f.have.count();
    if (lacking > 0) return nack(`missing segments: ${lacking}`);
    const got = await f.sha256();
    if (got !== fin.sha256) {
      await this.drop(clientId, f);
      return nack(`checksum mismatch: received bytes hash to ${got}`);
    }
    // A sealed upload: open it chunk by chunk into a plaintext file beside the part file, check the
    // plaintext's sha256 (sealed with the content key), and store the plaintext.
    let file = f.partFile;
    let contentSha = fin.sha256;
    const enc = f.meta.enc;
    if (enc) {
      const mine = this.ctx.encKey;
      if (!mine) return nack('this hub has no X25519 key to open sealed uploads');
      file = `${f.partFile}.plain`;
      try {
        const noncePrefix = Buffer.from(enc.noncePrefix, 'base64');
        const k = unwrap(mine, { keyId: enc.recipient.keyId, epk: Buffer.from(enc.recipient.epk, 'base64'), wrapped: Buffer.from(enc.recipient.wrapped, 'base64') }, noncePrefix);
        contentSha = k.plainSha256;
        await openSealedFile({ read: (o, l) => f.read(o, l), size: f.meta.size, chunkSize: f.meta.segmentSize }, k.contentKey, noncePrefix, k.plainSha256, file);
        k.contentKey.fill(0);
      } catch (err) {
        await this.drop(clientId, f);
        this.ctx.refuse(`sealed upload refused: ${(err as Error).message}`, topics.uploadFin(clientId));
        return nack(`sealed upload refused: ${(err as Error).message}`);
      }
    }
    await f.close();
    let entry: BlobEntry;
    try {
      entry = await this.ctx.store.adoptFile(file, contentSha, { name: f.meta.name, source: `upload:${clientId}`, now: this.ctx.now() });
    } catch (err) {
      await this.drop(clientId, f);
      if (file !== f.partFile) await fs.rm(file, { force: true });
      return nack(`not an adapter: ${err instanceof EdgeloraError ? err.message : (err as Error).message}`);
    }
    await this.drop(clientId, f);
    if (file !== f.partFile) await fs.rm(file, { force: true }); // left behind when the store already held it
    this.ctx.log(`hub: stored upload ${entry.name} (${entry.sha256.slice(0, 12)}, ${entry.size} bytes) from ${clientId}`);
    this.ctx.stored(entry, clientId);
    return this.ctx.ack(clientId, { sha256: fin.sha256, stage: 'fin', ok: true });
  }

  /** Saves and closes every open upload (they resume after a restart). */
  async close(): Promise<void> {
    for (const f of this.open.values()) await f.close();
    this.open.clear();
  }
}
