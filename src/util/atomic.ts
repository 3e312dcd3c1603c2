// Atomic writes: a crash never leaves a half-written file or directory behind.
// Files: temporary sibling, fsync, rename, fsync of the parent. Directories: build in a temporary
// sibling, then rename into place (replacing an old one via a second rename).
import { promises as fs, openSync, writeSync, fsyncSync, closeSync, renameSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

function tmpSibling(target: string): string {
  return path.join(path.dirname(target), `.${path.basename(target)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** fsyncs a directory, so a rename into it survives a crash. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Writes data to `target` atomically (tmp + fsync + rename + fsync dir). */
export async function writeFileAtomic(target: string, data: string | Uint8Array, mode?: number): Promise<void> {
  const tmp = tmpSibling(target);
  const fh = await fs.open(tmp, 'w', mode ?? 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close();
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await fs.rename(tmp, target);
  await fsyncDir(path.dirname(target));
}

/** Synchronous twin of writeFileAtomic, for exit paths that cannot await. */
export function writeFileAtomicSync(target: string, data: string | Uint8Array): void {
  const tmp = tmpSibling(target);
  const fd = openSync(tmp, 'w', 0o644);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, target);
}

/** fsyncs every regular file directly inside `dir`, then the directory itself. */
export async function fsyncTree(dir: string): Promise<void> {
  for (const ent of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, ent.name);
    if (ent.isDirectory()) await fsyncTree(p);
    else if (ent.isFile()) {
      const fh = await fs.open(p, 'r');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    }
  }
  await fsyncDir(dir);
}

/**
 * Builds a directory atomically: `fill` writes into a fresh temporary sibling of `target`; on
 * success the files are fsynced and the directory renamed into place (an existing `target` is
 * replaced only when `replace` is set). On failure the temporary directory is removed and
 * `target` is left exactly as it was.
 */
export async function writeDirAtomic<T>(
  target: string,
  fill: (tmpDir: string) => Promise<T>,
  opts: { replace?: boolean } = {},
): Promise<T> {
  const parent = path.dirname(path.resolve(target));
  await fs.mkdir(parent, { recursive: true });
  const tmp = tmpSibling(path.resolve(target));
  await fs.mkdir(tmp);
  let result: T;
  try {
    result = await fill(tmp);
    await fsyncTree(tmp);
  } catch (err) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
  const exists = await fs.stat(target).then(() => true, () => false);
  if (exists) {
    if (!opts.replace) {
      await fs.rm(tmp, { recursive: true, force: true });
      throw new Error(`${target} already exists`);
    }
    const old = tmpSibling(path.resolve(target)) + '-old';
    await fs.rename(target, old);
    await fs.rename(tmp, target);
    await fs.rm(old, { recursive: true, force: true });
  } else {
    await fs.rename(tmp, target);
  }
  await fsyncDir(parent);
  return result;
}
