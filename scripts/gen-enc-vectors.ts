// Writes test/sync/vectors/enc-v1.json: the sealed-blob construction (docs/protocol.md,
// "Encryption") run by src/sync/protocol/envelope.ts on fixed inputs. Run once; the test
// (test/sync/envelope.test.ts) checks the file both against envelope.ts and step by step with raw
// node:crypto calls, so the file pins the byte layout the doc describes.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { createHash, diffieHellman } from 'node:crypto';
import { chunkAad, chunkNonce, deriveWrapKey, encKeyFromPrivateRaw, sealChunk, wrapAad, wrapFor, x25519FromRaw } from '../src/sync/protocol/envelope.ts';

const bytes = (start: number, n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (start + i) & 0xff));
const recipient = encKeyFromPrivateRaw(bytes(0x01, 32));
const ephemeral = encKeyFromPrivateRaw(bytes(0x41, 32));
const contentKey = bytes(0x81, 32);
const noncePrefix = Buffer.from('a1a2a3a4a5a6a7a8', 'hex');
// The plaintext blob: two chunks of a 48-byte plaintext chunk size.
const plain = Buffer.from('{"peft_type":"LORA","r":8,"note":"Anouk Verhoeven / Valparaiso"}\n', 'utf8');
const plainChunk = 48;
const chunks = Math.ceil(plain.length / plainChunk);
const plainSha = createHash('sha256').update(plain).digest();
const shared = diffieHellman({ privateKey: ephemeral.privateKey, publicKey: x25519FromRaw(recipient.raw) });
const { kek, nonce } = deriveWrapKey(shared, ephemeral.raw, recipient.raw);
const r = wrapFor(recipient.raw, contentKey, plainSha, noncePrefix, ephemeral);
const sealed = Array.from({ length: chunks }, (_, i) => sealChunk(contentKey, noncePrefix, i, chunks, plain.subarray(i * plainChunk, (i + 1) * plainChunk)));
const hex = (b: Buffer) => b.toString('hex');
const out = {
  about: 'edgelora-enc/1 test vectors (x25519-hkdf-sha256-aes256gcm/1); see docs/protocol.md, "Encryption". All byte strings are hex.',
  recipient: { privateKey: hex(bytes(0x01, 32)), publicKey: hex(recipient.raw), keyId: recipient.keyId },
  ephemeral: { privateKey: hex(bytes(0x41, 32)), publicKey: hex(ephemeral.raw) },
  contentKey: hex(contentKey),
  noncePrefix: hex(noncePrefix),
  plaintext: hex(plain),
  plainChunkSize: plainChunk,
  plainSha256: hex(plainSha),
  wrap: { sharedSecret: hex(shared), salt: hex(Buffer.concat([ephemeral.raw, recipient.raw])), info: hex(Buffer.from('edgelora-wrap/1')), kek: hex(kek), nonce: hex(nonce), aad: hex(wrapAad(noncePrefix)), wrapped: hex(r.wrapped) },
  chunks: sealed.map((c, i) => ({ index: i, count: chunks, nonce: hex(chunkNonce(noncePrefix, i)), aad: hex(chunkAad(i, chunks)), sealed: hex(c), sealedSha256: createHash('sha256').update(c).digest('hex') })),
  blobSha256: createHash('sha256').update(Buffer.concat(sealed)).digest('hex'),
};
const file = path.resolve(import.meta.dirname, '../test/sync/vectors/enc-v1.json');
writeFileSync(file, `${JSON.stringify(out, null, 2)}\n`);
process.stdout.write(`wrote ${file}\n`);
