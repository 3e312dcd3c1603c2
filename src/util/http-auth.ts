// Bind and authentication rules shared by every HTTP server edgelora runs (`serve`, the hub's
// --http): loopback by default, Bearer tokens compared in constant time, and no non-loopback
// address without a token.
import { promises as fs } from 'node:fs';
import { createHash, timingSafeEqual } from 'node:crypto';
import { EdgeloraError } from './errors.js';

/** Whether binding `host` keeps the server on this machine. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** Keys of an API key file: one per line; blank lines and lines starting with # are skipped. */
export async function readApiKeys(file: string): Promise<string[]> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    throw new EdgeloraError(`cannot read the API key file: ${(err as Error).message}`, { where: file });
  }
  const keys = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  if (keys.length === 0) throw new EdgeloraError('the API key file holds no key', { where: file, hint: 'write one key per line' });
  if (keys.some((k) => k.length < 16)) throw new EdgeloraError('an API key is shorter than 16 characters', { where: file, hint: 'use e.g. `openssl rand -hex 32`' });
  return keys;
}

/** sha256 digests compare in constant time whatever the lengths; every key is compared. */
export function keyMatches(given: string, keys: readonly string[]): boolean {
  const g = createHash('sha256').update(given).digest();
  let ok = false;
  for (const k of keys) ok = timingSafeEqual(g, createHash('sha256').update(k).digest()) || ok;
  return ok;
}

/** The token of an "Authorization: Bearer <token>" header, or null. */
export function bearerToken(header: string | string[] | undefined): string | null {
  const m = typeof header === 'string' ? /^Bearer\s+(.+)$/i.exec(header) : null;
  return m ? m[1]!.trim() : null;
}

/** Refuses to expose an unauthenticated server beyond this machine. */
export function checkBind(host: string, keys: readonly string[], flags: { host: string; keyFile: string }): void {
  if (!isLoopback(host) && keys.length === 0) {
    throw new EdgeloraError(`binding ${host} would expose the API beyond this machine without authentication`, {
      where: flags.host,
      hint: `give ${flags.keyFile} FILE (clients send "Authorization: Bearer <key>"), or bind 127.0.0.1`,
    });
  }
}
