// Confidential blobs ("edgelora-enc/1"): X25519 encryption keys (device, hub), the per-blob content
// key wrapped for each recipient (ephemeral-static X25519 + HKDF-SHA256 + AES-256-GCM), and the
// chunk-by-chunk AES-256-GCM of the blob itself. node:crypto only; docs/protocol.md, "Encryption",
// gives every byte, and test/sync/vectors/enc-v1.json pins them.
import { createCipheriv, createDecipheriv, createHash, createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, randomBytes, type KeyObject } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import { EdgeloraError } from '../../util/errors.js';
import { writeFileAtomic } from '../../util/atomic.js';
import { writeKeyPair } from './signing.js';

export const TAG_BYTES = 16;
export const NONCE_PREFIX_BYTES = 8;
/** Wrapped payload: content key (32) || sha256 of the plaintext blob (32), sealed: + 16-byte tag. */
export const WRAPPED_BYTES = 32 + 32 + TAG_BYTES;
export const WRAP_LABEL = Buffer.from('edgelora-wrap/1', 'ascii');
export const CHUNK_LABEL = Buffer.from('edgelora-chunk/1', 'ascii');

/** An X25519 key pair; `raw` is the 32-byte public key (RFC 7748 u-coordinate, little-endian). */
export interface EncKey {
  privateKey: KeyObject;
  publicKey: KeyObject;
  raw: Buffer;
  keyId: string;
}

/** The raw 32-byte X25519 public key of a KeyObject (public, or private: its public half). */
export function rawX25519(key: KeyObject): Buffer {
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  const jwk = pub.export({ format: 'jwk' });
  if (jwk.kty !== 'OKP' || jwk.crv !== 'X25519' || typeof jwk.x !== 'string') throw new EdgeloraError('not an X25519 key');
  return Buffer.from(jwk.x, 'base64url');
}

export function x25519FromRaw(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new EdgeloraError(`an X25519 public key is 32 bytes, not ${raw.length}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

/** Encryption key id: the first 16 hex digits of sha256 over the raw 32-byte X25519 public key. */
export function encKeyIdOf(raw: Uint8Array): string {
  return createHash('sha256').update(raw).digest('hex').slice(0, 16);
}

function encKeyOf(privateKey: KeyObject): EncKey {
  const publicKey = createPublicKey(privateKey);
  const raw = rawX25519(publicKey);
  return { privateKey, publicKey, raw, keyId: encKeyIdOf(raw) };
}

export function generateEncKey(): EncKey {
  return encKeyOf(generateKeyPairSync('x25519').privateKey);
}

/** The key pair of 32 raw private bytes (RFC 7748 scalar): test vectors and other-language devices. */
export function encKeyFromPrivateRaw(d: Uint8Array): EncKey {
  if (d.length !== 32) throw new EdgeloraError(`an X25519 private key is 32 bytes, not ${d.length}`);
  // A PKCS#8 X25519 key is a fixed 16-byte prefix + the 32 private bytes (RFC 8410).
  const der = Buffer.concat([Buffer.from('302e020100300506032b656e04220420', 'hex'), Buffer.from(d)]);
  return encKeyOf(createPrivateKey({ key: der, format: 'der', type: 'pkcs8' }));
}

/** Writes `<prefix>.key` (PKCS#8 PEM, mode 0600, atomic) and `<prefix>.pub` (SPKI PEM). */
export async function writeEncKeyPair(prefix: string, key: EncKey = generateEncKey()): Promise<{ keyFile: string; pubFile: string; keyId: string }> {
  return writeKeyPair(prefix, key);
}

export async function loadEncKey(file: string): Promise<EncKey> {
  const pem = await fs.readFile(file, 'utf8').catch((err: unknown) => {
    throw new EdgeloraError(`cannot read X25519 key: ${(err as Error).message}`, { where: file, hint: '`edgelora keygen <prefix>` writes <prefix>.x25519.key beside the signing key' });
  });
  let k: KeyObject;
  try {
    k = createPrivateKey(pem);
  } catch (err) {
    throw new EdgeloraError(`not a PEM private key: ${(err as Error).message}`, { where: file, hint: 'pass the .x25519.key file written by `edgelora keygen`' });
  }
  if (k.asymmetricKeyType !== 'x25519') throw new EdgeloraError(`key type ${k.asymmetricKeyType}, expected x25519`, { where: file, hint: 'pass the .x25519.key file, not the Ed25519 signing key' });
  return encKeyOf(k);
}

/** Reads an X25519 public key file (SPKI PEM); refuses a private key, so that it is not copied around by mistake. */
export async function loadEncPublicKey(file: string): Promise<{ key: KeyObject; raw: Buffer; keyId: string }> {
  const pem = await fs.readFile(file, 'utf8').catch((err: unknown) => {
    throw new EdgeloraError(`cannot read X25519 public key: ${(err as Error).message}`, { where: file });
  });
  if (/PRIVATE KEY-----/.test(pem)) throw new EdgeloraError('this is a private key; give the .pub', { where: file, hint: 'the .x25519.pub written beside it' });
  let key: KeyObject;
  try {
    key = createPublicKey(pem);
  } catch (err) {
    throw new EdgeloraError(`not a PEM public key: ${(err as Error).message}`, { where: file });
  }
  if (key.asymmetricKeyType !== 'x25519') throw new EdgeloraError(`key type ${key.asymmetricKeyType}, expected x25519`, { where: file, hint: 'pass an .x25519.pub file' });
  const raw = rawX25519(key);
  return { key, raw, keyId: encKeyIdOf(raw) };
}

/**
 * The device's key pair in `file`, made at first start (mode 0600, written atomically: a crash
 * leaves either no key or a whole one).
 */
export async function loadOrCreateEncKey(file: string): Promise<{ key: EncKey; created: boolean }> {
  if (existsSync(file)) return { key: await loadEncKey(file), created: false };
  const key = generateEncKey();
  await writeFileAtomic(file, key.privateKey.export({ format: 'pem', type: 'pkcs8' }) as string, 0o600);
  return { key, created: true };
}

/** One recipient's entry in a manifest (or upload init): whose key, the ephemeral key, the sealed content key. */
export interface Recipient {
  keyId: string;
  /** Raw 32-byte ephemeral X25519 public key. */
  epk: Buffer;
  /** AES-256-GCM(kek, wrapNonce, wrapAad, contentKey || plainSha256) || tag: 80 bytes. */
  wrapped: Buffer;
}

/** kek (32) and wrap nonce (12) = HKDF-SHA256(ikm = X25519 shared secret, salt = epk || recipient pub, info = "edgelora-wrap/1", 44). */
export function deriveWrapKey(shared: Buffer, epk: Buffer, recipientRaw: Buffer): { kek: Buffer; nonce: Buffer } {
  if (shared.every((b) => b === 0)) throw new EdgeloraError('X25519 gave the all-zero secret (a low-order public key): refused');
  const okm = Buffer.from(hkdfSync('sha256', shared, Buffer.concat([epk, recipientRaw]), WRAP_LABEL, 44));
  return { kek: okm.subarray(0, 32), nonce: okm.subarray(32, 44) };
}

/** Wrap AAD: "edgelora-wrap/1" || noncePrefix (8): a wrapped key opens only for the publication it came with. */
export function wrapAad(noncePrefix: Buffer): Buffer {
  return Buffer.concat([WRAP_LABEL, noncePrefix]);
}

/** Seals (contentKey, plainSha256) for one recipient. `ephemeral` is for test vectors only. */
export function wrapFor(recipientRaw: Buffer, contentKey: Buffer, plainSha256: Buffer, noncePrefix: Buffer, ephemeral?: EncKey): Recipient {
  const eph = ephemeral ?? generateEncKey();
  const shared = diffieHellman({ privateKey: eph.privateKey, publicKey: x25519FromRaw(recipientRaw) });
  const { kek, nonce } = deriveWrapKey(shared, eph.raw, recipientRaw);
  const c = createCipheriv('aes-256-gcm', kek, nonce);
  c.setAAD(wrapAad(noncePrefix));
  const wrapped = Buffer.concat([c.update(Buffer.concat([contentKey, plainSha256])), c.final(), c.getAuthTag()]);
  return { keyId: encKeyIdOf(recipientRaw), epk: eph.raw, wrapped };
}

/** Opens this key's entry; throws EdgeloraError when it does not authenticate. */
export function unwrap(me: EncKey, r: Recipient, noncePrefix: Buffer): { contentKey: Buffer; plainSha256: string } {
  if (r.wrapped.length !== WRAPPED_BYTES) throw new EdgeloraError(`wrapped key is ${r.wrapped.length} bytes, expected ${WRAPPED_BYTES}`);
  const shared = diffieHellman({ privateKey: me.privateKey, publicKey: x25519FromRaw(r.epk) });
  const { kek, nonce } = deriveWrapKey(shared, r.epk, me.raw);
  const d = createDecipheriv('aes-256-gcm', kek, nonce);
  d.setAAD(wrapAad(noncePrefix));
  d.setAuthTag(r.wrapped.subarray(64));
  let plain: Buffer;
  try {
    plain = Buffer.concat([d.update(r.wrapped.subarray(0, 64)), d.final()]);
  } catch {
    throw new EdgeloraError(`the wrapped content key for key ${me.keyId} does not authenticate (tampered wrap, ephemeral key or nonce prefix, or not this device's key)`);
  }
  return { contentKey: plain.subarray(0, 32), plainSha256: plain.subarray(32).toString('hex') };
}

/** Chunk nonce: noncePrefix (8) || u32 BE chunk index. */
export function chunkNonce(noncePrefix: Buffer, index: number): Buffer {
  const n = Buffer.alloc(12);
  noncePrefix.copy(n, 0);
  n.writeUInt32BE(index, 8);
  return n;
}

/** Chunk AAD: "edgelora-chunk/1" || u32 BE index || u32 BE chunk count (reordering and truncation fail). */
export function chunkAad(index: number, chunks: number): Buffer {
  const a = Buffer.alloc(CHUNK_LABEL.length + 8);
  CHUNK_LABEL.copy(a, 0);
  a.writeUInt32BE(index, CHUNK_LABEL.length);
  a.writeUInt32BE(chunks, CHUNK_LABEL.length + 4);
  return a;
}

export function sealChunk(contentKey: Buffer, noncePrefix: Buffer, index: number, chunks: number, plain: Uint8Array): Buffer {
  const c = createCipheriv('aes-256-gcm', contentKey, chunkNonce(noncePrefix, index));
  c.setAAD(chunkAad(index, chunks));
  return Buffer.concat([c.update(plain), c.final(), c.getAuthTag()]);
}

/** Opens one sealed chunk; throws EdgeloraError naming the chunk when it does not authenticate. */
export function openChunk(contentKey: Buffer, noncePrefix: Buffer, index: number, chunks: number, sealed: Uint8Array): Buffer {
  const s = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.length);
  if (s.length < TAG_BYTES) throw new EdgeloraError(`sealed chunk ${index} is shorter than its tag`);
  const d = createDecipheriv('aes-256-gcm', contentKey, chunkNonce(noncePrefix, index));
  d.setAAD(chunkAad(index, chunks));
  d.setAuthTag(s.subarray(s.length - TAG_BYTES));
  try {
    return Buffer.concat([d.update(s.subarray(0, s.length - TAG_BYTES)), d.final()]);
  } catch {
    throw new EdgeloraError(`chunk ${index} of ${chunks} does not decrypt: its ciphertext, nonce prefix or content key was tampered with`);
  }
}

/** Sealed size of a blob of `plainSize` bytes cut into plaintext chunks of `plainChunk` bytes. */
export function sealedGeometry(plainSize: number, plainChunk: number): { chunks: number; size: number; chunkSize: number } {
  const chunks = Math.ceil(plainSize / plainChunk);
  return { chunks, size: plainSize + chunks * TAG_BYTES, chunkSize: plainChunk + TAG_BYTES };
}

export interface Sealed {
  /** The sealed blob: chunk i (plaintext bytes [i·P, (i+1)·P)) sealed, concatenated. */
  data: Buffer;
  noncePrefix: Buffer;
  recipients: Recipient[];
  /** Sealed chunk size (plaintext chunk + 16). */
  chunkSize: number;
  chunks: number;
}

/**
 * Seals `plain` for `recipients` (raw X25519 keys) with a fresh random content key and nonce
 * prefix. `fixed` is for test vectors only.
 */
export function sealBlob(plain: Buffer, plainChunk: number, recipients: Buffer[], fixed?: { contentKey: Buffer; noncePrefix: Buffer; ephemeral: EncKey }): Sealed {
  const contentKey = fixed?.contentKey ?? randomBytes(32);
  const noncePrefix = fixed?.noncePrefix ?? randomBytes(NONCE_PREFIX_BYTES);
  const g = sealedGeometry(plain.length, plainChunk);
  const parts: Buffer[] = [];
  for (let i = 0; i < g.chunks; i++) parts.push(sealChunk(contentKey, noncePrefix, i, g.chunks, plain.subarray(i * plainChunk, Math.min(plain.length, (i + 1) * plainChunk))));
  const plainSha = createHash('sha256').update(plain).digest();
  const recips = recipients.map((r) => wrapFor(r, contentKey, plainSha, noncePrefix, fixed?.ephemeral));
  if (!fixed) contentKey.fill(0);
  return { data: Buffer.concat(parts), noncePrefix, recipients: recips, chunkSize: g.chunkSize, chunks: g.chunks };
}
