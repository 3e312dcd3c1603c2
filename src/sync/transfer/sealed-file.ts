// Opening a sealed blob held on disk (a finished download or upload) chunk by chunk into a
// plaintext file, in bounded memory, and reading that file back: the plaintext is hashed while it
// is written and checked against the sha256 sealed with the content key before anything installs it.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { EdgeloraError } from '../../util/errors.js';
import { openChunk, TAG_BYTES } from '../protocol/envelope.js';

export interface SealedSource {
  /** Bytes [offset, offset + length) of the sealed blob. */
  read(offset: number, length: number): Promise<Buffer>;
  size: number;
  /** Sealed chunk size (plaintext chunk + 16). */
  chunkSize: number;
}

/**
 * Opens every chunk of `src` into `outFile` and checks the plaintext's sha256 against `plainSha256`.
 * Throws EdgeloraError (naming the chunk, or the hash) and removes `outFile` on any failure.
 */
export async function openSealedFile(src: SealedSource, contentKey: Buffer, noncePrefix: Buffer, plainSha256: string, outFile: string): Promise<{ size: number }> {
  const chunks = Math.ceil(src.size / src.chunkSize);
  const out = await fs.open(outFile, 'w', 0o600);
  const h = createHash('sha256');
  let pos = 0;
  try {
    for (let i = 0; i < chunks; i++) {
      const len = Math.min(src.chunkSize, src.size - i * src.chunkSize);
      if (len <= TAG_BYTES) throw new EdgeloraError(`sealed chunk ${i} has ${len} bytes, not more than its ${TAG_BYTES}-byte tag`);
      const plain = openChunk(contentKey, noncePrefix, i, chunks, await src.read(i * src.chunkSize, len));
      h.update(plain);
      await out.write(plain, 0, plain.length, pos);
      pos += plain.length;
    }
    const got = h.digest('hex');
    if (got !== plainSha256) throw new EdgeloraError(`decrypted blob hashes to ${got}, the sealed content key says ${plainSha256}`);
    // Not fsynced: the file is read back at once, and a crash before the install only means
    // opening the (durable) sealed part file again. The hub's store.adoptFile fsyncs what it keeps.
  } catch (err) {
    await out.close();
    await fs.rm(outFile, { force: true });
    throw err;
  }
  await out.close();
  return { size: pos };
}

/** read/stream over a plain file, the same shape as ResumableFile's (for unpacking). */
export async function plainReader(file: string): Promise<{ read(o: number, l: number): Promise<Buffer>; stream(o: number, l: number): AsyncGenerator<Buffer>; size: number; close(): Promise<void> }> {
  const fh = await fs.open(file, 'r');
  const size = (await fh.stat()).size;
  const read = async (o: number, l: number): Promise<Buffer> => {
    const b = Buffer.allocUnsafe(l);
    const { bytesRead } = await fh.read(b, 0, l, o);
    if (bytesRead !== l) throw new EdgeloraError(`short read at ${o}`, { where: file });
    return b;
  };
  async function* stream(o: number, l: number): AsyncGenerator<Buffer> {
    for (let p = o; p < o + l; p += 1 << 20) yield await read(p, Math.min(1 << 20, o + l - p));
  }
  return { read, stream, size, close: () => fh.close() };
}
