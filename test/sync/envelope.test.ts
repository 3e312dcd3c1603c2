// The sealed-blob construction against its test vectors (test/sync/vectors/enc-v1.json): recomputed
// step by step with raw node:crypto calls written out here (X25519, HKDF-SHA256, AES-256-GCM, the
// labels and layouts of docs/protocol.md), and through src/sync/protocol/envelope.ts; plus what
// must fail: a flipped bit anywhere, a swapped chunk, a truncated blob, a low-order key.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createCipheriv, createDecipheriv, createHash, createPrivateKey, createPublicKey, diffieHellman, hkdfSync } from 'node:crypto';
import { encKeyFromPrivateRaw, openChunk, sealBlob, sealChunk, unwrap, wrapFor, x25519FromRaw, encKeyIdOf, generateEncKey, deriveWrapKey } from '../../src/sync/protocol/envelope.ts';

const V = JSON.parse(readFileSync(path.join(import.meta.dirname, 'vectors', 'enc-v1.json'), 'utf8')) as {
  recipient: { privateKey: string; publicKey: string; keyId: string };
  ephemeral: { privateKey: string; publicKey: string };
  contentKey: string;
  noncePrefix: string;
  plaintext: string;
  plainChunkSize: number;
  plainSha256: string;
  wrap: { sharedSecret: string; salt: string; info: string; kek: string; nonce: string; aad: string; wrapped: string };
  chunks: { index: number; count: number; nonce: string; aad: string; sealed: string; sealedSha256: string }[];
  blobSha256: string;
};
const h = (s: string) => Buffer.from(s, 'hex');

// Raw node:crypto: a PKCS#8 X25519 private key is 302e020100300506032b656e04220420 || 32 bytes (RFC 8410).
const rawPriv = (d: Buffer) => createPrivateKey({ key: Buffer.concat([h('302e020100300506032b656e04220420'), d]), format: 'der', type: 'pkcs8' });
// An SPKI X25519 public key is 302a300506032b656e032100 || 32 bytes.
const rawPub = (x: Buffer) => createPublicKey({ key: Buffer.concat([h('302a300506032b656e032100'), x]), format: 'der', type: 'spki' });
const pubOf = (d: Buffer) => createPublicKey(rawPriv(d)).export({ format: 'der', type: 'spki' }).subarray(12);

test('test vectors: recomputed step by step with raw node:crypto', () => {
  // Keys and key id.
  assert.equal(pubOf(h(V.recipient.privateKey)).toString('hex'), V.recipient.publicKey);
  assert.equal(pubOf(h(V.ephemeral.privateKey)).toString('hex'), V.ephemeral.publicKey);
  assert.equal(createHash('sha256').update(h(V.recipient.publicKey)).digest('hex').slice(0, 16), V.recipient.keyId);
  // Shared secret: X25519(ephemeral private, recipient public) = X25519(recipient private, ephemeral public).
  const shared = diffieHellman({ privateKey: rawPriv(h(V.ephemeral.privateKey)), publicKey: rawPub(h(V.recipient.publicKey)) });
  assert.equal(shared.toString('hex'), V.wrap.sharedSecret);
  assert.equal(diffieHellman({ privateKey: rawPriv(h(V.recipient.privateKey)), publicKey: rawPub(h(V.ephemeral.publicKey)) }).toString('hex'), V.wrap.sharedSecret);
  // HKDF-SHA256(ikm = shared, salt = epk || recipient pub, info = "edgelora-wrap/1", 44 bytes) = kek (32) || nonce (12).
  const salt = Buffer.concat([h(V.ephemeral.publicKey), h(V.recipient.publicKey)]);
  assert.equal(salt.toString('hex'), V.wrap.salt);
  assert.equal(Buffer.from('edgelora-wrap/1', 'ascii').toString('hex'), V.wrap.info);
  const okm = Buffer.from(hkdfSync('sha256', shared, salt, Buffer.from('edgelora-wrap/1', 'ascii'), 44));
  assert.equal(okm.subarray(0, 32).toString('hex'), V.wrap.kek);
  assert.equal(okm.subarray(32).toString('hex'), V.wrap.nonce);
  // Wrap: AES-256-GCM(kek, nonce, aad = "edgelora-wrap/1" || noncePrefix) over contentKey || plainSha256, tag appended.
  const aad = Buffer.concat([Buffer.from('edgelora-wrap/1', 'ascii'), h(V.noncePrefix)]);
  assert.equal(aad.toString('hex'), V.wrap.aad);
  assert.equal(createHash('sha256').update(h(V.plaintext)).digest('hex'), V.plainSha256);
  const c = createCipheriv('aes-256-gcm', okm.subarray(0, 32), okm.subarray(32));
  c.setAAD(aad);
  const wrapped = Buffer.concat([c.update(Buffer.concat([h(V.contentKey), h(V.plainSha256)])), c.final(), c.getAuthTag()]);
  assert.equal(wrapped.length, 80);
  assert.equal(wrapped.toString('hex'), V.wrap.wrapped);
  // Chunks: nonce = noncePrefix || u32 BE index; aad = "edgelora-chunk/1" || u32 BE index || u32 BE count.
  const plain = h(V.plaintext);
  const count = Math.ceil(plain.length / V.plainChunkSize);
  assert.equal(V.chunks.length, count);
  const all: Buffer[] = [];
  for (const ch of V.chunks) {
    const nonce = Buffer.concat([h(V.noncePrefix), Buffer.from([0, 0, 0, ch.index])]);
    assert.equal(nonce.toString('hex'), ch.nonce);
    const cAad = Buffer.concat([Buffer.from('edgelora-chunk/1', 'ascii'), Buffer.from([0, 0, 0, ch.index, 0, 0, 0, count])]);
    assert.equal(cAad.toString('hex'), ch.aad);
    const e = createCipheriv('aes-256-gcm', h(V.contentKey), nonce);
    e.setAAD(cAad);
    const sealed = Buffer.concat([e.update(plain.subarray(ch.index * V.plainChunkSize, (ch.index + 1) * V.plainChunkSize)), e.final(), e.getAuthTag()]);
    assert.equal(sealed.toString('hex'), ch.sealed);
    assert.equal(createHash('sha256').update(sealed).digest('hex'), ch.sealedSha256);
    all.push(sealed);
    // And it opens with a plain decipher.
    const d = createDecipheriv('aes-256-gcm', h(V.contentKey), nonce);
    d.setAAD(cAad);
    d.setAuthTag(sealed.subarray(sealed.length - 16));
    assert.deepEqual(Buffer.concat([d.update(sealed.subarray(0, sealed.length - 16)), d.final()]), plain.subarray(ch.index * V.plainChunkSize, (ch.index + 1) * V.plainChunkSize));
  }
  assert.equal(createHash('sha256').update(Buffer.concat(all)).digest('hex'), V.blobSha256);
});

test('test vectors: envelope.ts gives the same bytes and opens them', () => {
  const recipient = encKeyFromPrivateRaw(h(V.recipient.privateKey));
  const ephemeral = encKeyFromPrivateRaw(h(V.ephemeral.privateKey));
  assert.equal(recipient.raw.toString('hex'), V.recipient.publicKey);
  assert.equal(recipient.keyId, V.recipient.keyId);
  const r = wrapFor(recipient.raw, h(V.contentKey), h(V.plainSha256), h(V.noncePrefix), ephemeral);
  assert.equal(r.wrapped.toString('hex'), V.wrap.wrapped);
  assert.equal(r.epk.toString('hex'), V.ephemeral.publicKey);
  const k = unwrap(recipient, r, h(V.noncePrefix));
  assert.equal(k.contentKey.toString('hex'), V.contentKey);
  assert.equal(k.plainSha256, V.plainSha256);
  const s = sealBlob(h(V.plaintext), V.plainChunkSize, [recipient.raw], { contentKey: Buffer.from(h(V.contentKey)), noncePrefix: h(V.noncePrefix), ephemeral });
  assert.equal(s.data.toString('hex'), V.chunks.map((c) => c.sealed).join(''));
  assert.equal(s.recipients[0]?.wrapped.toString('hex'), V.wrap.wrapped);
  for (const ch of V.chunks) assert.equal(sealChunk(h(V.contentKey), h(V.noncePrefix), ch.index, ch.count, h(V.plaintext).subarray(ch.index * V.plainChunkSize, (ch.index + 1) * V.plainChunkSize)).toString('hex'), ch.sealed);
});

test('tampering: a flipped bit in the wrap, the ephemeral key, the nonce prefix or a chunk fails; so do swapped and re-counted chunks', () => {
  const recipient = encKeyFromPrivateRaw(h(V.recipient.privateKey));
  const base = { keyId: V.recipient.keyId, epk: h(V.ephemeral.publicKey), wrapped: h(V.wrap.wrapped) };
  const np = h(V.noncePrefix);
  for (let byte = 0; byte < 80; byte += 7) {
    const w = Buffer.from(base.wrapped);
    w[byte]! ^= 0x01;
    assert.throws(() => unwrap(recipient, { ...base, wrapped: w }, np), /does not authenticate/);
  }
  const epk = Buffer.from(base.epk);
  epk[5]! ^= 0x10;
  assert.throws(() => unwrap(recipient, { ...base, epk }, np), /does not authenticate/);
  const np2 = Buffer.from(np);
  np2[0]! ^= 0x01;
  assert.throws(() => unwrap(recipient, base, np2), /does not authenticate/);
  const other = generateEncKey();
  assert.throws(() => unwrap(other, base, np), /does not authenticate/);
  const ck = h(V.contentKey);
  const [c0, c1] = V.chunks.map((c) => h(c.sealed)) as [Buffer, Buffer];
  assert.ok(openChunk(ck, np, 0, 2, c0).length > 0);
  for (let byte = 0; byte < c0.length; byte += 5) {
    const t = Buffer.from(c0);
    t[byte]! ^= 0x80;
    assert.throws(() => openChunk(ck, np, 0, 2, t), /does not decrypt/);
  }
  assert.throws(() => openChunk(ck, np2, 0, 2, c0), /does not decrypt/, 'another nonce prefix');
  assert.throws(() => openChunk(ck, np, 1, 2, c0), /does not decrypt/, 'chunk 0 presented as chunk 1');
  assert.throws(() => openChunk(ck, np, 0, 1, c0), /does not decrypt/, 'a blob truncated to one chunk');
  assert.ok(openChunk(ck, np, 1, 2, c1).length > 0);
});

test('a low-order (all-zero-secret) ephemeral key is refused, not used', () => {
  const recipient = generateEncKey();
  // u = 0 is a point of small order: X25519 with it gives the all-zero secret.
  assert.throws(() => {
    const shared = diffieHellman({ privateKey: recipient.privateKey, publicKey: x25519FromRaw(Buffer.alloc(32)) });
    deriveWrapKey(shared, Buffer.alloc(32), recipient.raw);
  });
  assert.equal(encKeyIdOf(recipient.raw), createHash('sha256').update(recipient.raw).digest('hex').slice(0, 16));
});
