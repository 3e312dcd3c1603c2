// The one ResumableFile both roles use (agent downloads, hub uploads): pieces land at their offsets,
// the state claims only pieces written before its fsync, a resume re-verifies every claimed piece
// (a piece changed on disk is dropped), streamed sha256 equals node's hash of the whole, and the
// state keeps the role's metadata under its own key.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { ResumableFile } from '../../src/sync/transfer/resumable-file.ts';
import { tmpDir } from './helpers.ts';

const work = tmpDir('resumable');
after(() => fs.rm(work, { recursive: true, force: true }));

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

test('ResumableFile: write out of order, persist, resume with re-verification, streamed hash', async () => {
  // 3.5 MiB in 256 KiB pieces (14 pieces, the last one short): streamed reads cross the 1 MiB buffer.
  const data = randomBytes(3 * 1024 * 1024 + 512 * 1024 - 1000);
  const pieceSize = 256 * 1024;
  const n = Math.ceil(data.length / pieceSize);
  const hashes = Array.from({ length: n }, (_, i) => sha(data.subarray(i * pieceSize, (i + 1) * pieceSize)));
  const files = { partFile: path.join(work, 'x.part'), stateFile: path.join(work, 'x.json'), metaKey: 'manifest' };
  const meta = { name: 'x', hashes };
  const f = await ResumableFile.create({ ...files, meta, geometry: { size: data.length, pieceSize } });
  assert.equal(f.pieces, n);
  assert.equal(f.pieceLength(n - 1), data.length - (n - 1) * pieceSize);
  const piece = (i: number) => data.subarray(i * pieceSize, Math.min(data.length, (i + 1) * pieceSize));
  for (const i of [5, 0, n - 1, 3]) assert.equal(await f.writePiece(i, piece(i)), true);
  assert.equal(await f.writePiece(5, piece(5)), false, 'a piece already held is not written again');
  await assert.rejects(f.writePiece(1, Buffer.alloc(10)), /piece 1 has 10 bytes, expected 262144/);
  await f.close(); // saves the state

  const state = JSON.parse(await fs.readFile(files.stateFile, 'utf8')) as { manifest: typeof meta; have: string };
  assert.deepEqual(state.manifest, meta, 'the metadata is kept under the role\'s key');

  // Change held piece 3 on disk: the resume must drop it, keep the others.
  const fh = await fs.open(files.partFile, 'r+');
  await fh.write(Buffer.from('tampered'), 0, 8, 3 * pieceSize + 100);
  await fh.close();
  const r = await ResumableFile.resume<typeof meta>({
    ...files,
    parseMeta: (raw) => raw as typeof meta,
    geometryOf: () => ({ size: data.length, pieceSize }),
    verifyPiece: (m, i, d) => sha(d) === m.hashes[i],
  });
  assert.ok(r, 'resumed');
  assert.equal(r.dropped, 1, 'the changed piece failed re-verification');
  assert.deepEqual(r.file.have.indices(), [0, 5, n - 1]);
  for (let i = 0; i < n; i++) if (!r.file.have.get(i)) await r.file.writePiece(i, piece(i));
  assert.equal(r.file.complete, true);
  assert.equal(await r.file.sha256(), sha(data), 'streamed sha256 of the part file equals the hash of the data');
  const back = Buffer.concat(await (async () => {
    const out: Buffer[] = [];
    for await (const p of r.file.stream()) out.push(Buffer.from(p));
    return out;
  })());
  assert.ok(back.equals(data), 'the streamed bytes are the data');
  await r.file.discard();
  await assert.rejects(fs.stat(files.partFile), /ENOENT/);
  await assert.rejects(fs.stat(files.stateFile), /ENOENT/);

  // Nothing to resume, or metadata the role refuses: null (the caller starts over).
  assert.equal(await ResumableFile.resume({ ...files, parseMeta: () => meta, geometryOf: () => ({ size: 1, pieceSize: 1 }) }), null);
  const g = await ResumableFile.create({ ...files, meta, geometry: { size: data.length, pieceSize } });
  await g.close();
  assert.equal(await ResumableFile.resume({ ...files, parseMeta: () => null, geometryOf: () => ({ size: data.length, pieceSize }) }), null);
});
