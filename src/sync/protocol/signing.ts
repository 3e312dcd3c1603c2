// Ed25519 keys and signatures for manifests and commands. A signature covers the canonical JSON
// (RFC 8785 / JCS: object keys sorted by UTF-16 code units, no whitespace, ECMAScript number and
// string serialization) of the message without its `signature` field.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { EdgeloraError } from '../../util/errors.js';
import { writeFileAtomic } from '../../util/atomic.js';
import { canonicalJson } from '../../util/canonical-json.js';

/** Key id: the first 16 hex digits of sha256 over the raw 32-byte Ed25519 public key. */
export function keyIdOf(pub: KeyObject): string {
  const jwk = pub.export({ format: 'jwk' });
  if (jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || typeof jwk.x !== 'string') throw new EdgeloraError('not an Ed25519 public key');
  return createHash('sha256').update(Buffer.from(jwk.x, 'base64url')).digest('hex').slice(0, 16);
}

export interface SigningKey {
  privateKey: KeyObject;
  publicKey: KeyObject;
  keyId: string;
}

export function generateSigningKey(): SigningKey {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return { privateKey, publicKey, keyId: keyIdOf(publicKey) };
}

/**
 * Writes `<prefix>.key` (PKCS#8 PEM, mode 0600, atomic) and `<prefix>.pub` (SPKI PEM): the hub's
 * Ed25519 signing pair by default; the X25519 pairs (envelope.ts) are written the same way.
 */
export async function writeKeyPair(prefix: string, key: { privateKey: KeyObject; publicKey: KeyObject; keyId: string } = generateSigningKey()): Promise<{ keyFile: string; pubFile: string; keyId: string }> {
  const keyFile = `${prefix}.key`;
  const pubFile = `${prefix}.pub`;
  await writeFileAtomic(keyFile, key.privateKey.export({ format: 'pem', type: 'pkcs8' }) as string, 0o600);
  await fs.chmod(keyFile, 0o600);
  await writeFileAtomic(pubFile, key.publicKey.export({ format: 'pem', type: 'spki' }) as string);
  return { keyFile, pubFile, keyId: key.keyId };
}

export async function loadSigningKey(file: string): Promise<SigningKey> {
  const pem = await fs.readFile(file, 'utf8').catch((err: unknown) => {
    throw new EdgeloraError(`cannot read signing key: ${(err as Error).message}`, { where: file, hint: 'create one with `edgelora keygen <prefix>`' });
  });
  if (/-----BEGIN PUBLIC KEY-----/.test(pem) && !/PRIVATE KEY-----/.test(pem)) {
    throw new EdgeloraError('not a PEM private key: this is a public key (the hub signs with the private one)', { where: file, hint: 'give the .key file written by `edgelora keygen` (the .pub goes to the agents)' });
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(pem);
  } catch (err) {
    throw new EdgeloraError(`not a PEM private key: ${(err as Error).message}`, { where: file, hint: 'pass the .key file written by `edgelora keygen`' });
  }
  if (privateKey.asymmetricKeyType !== 'ed25519') throw new EdgeloraError(`key type ${privateKey.asymmetricKeyType}, expected ed25519`, { where: file });
  const publicKey = createPublicKey(privateKey);
  return { privateKey, publicKey, keyId: keyIdOf(publicKey) };
}

export async function loadPublicKey(file: string): Promise<KeyObject> {
  const pem = await fs.readFile(file, 'utf8').catch((err: unknown) => {
    throw new EdgeloraError(`cannot read public key: ${(err as Error).message}`, { where: file, hint: 'pass the hub .pub file written by `edgelora keygen`' });
  });
  // createPublicKey would happily derive the public half of a private key: refuse it instead, so
  // that the hub's private key is not copied to every device by mistake.
  if (/PRIVATE KEY-----/.test(pem)) {
    throw new EdgeloraError("this is the hub's private key; give the .pub", {
      where: file,
      hint: 'pass the .pub file written next to it by `edgelora keygen`; the .key stays on the hub',
    });
  }
  let pub: KeyObject;
  try {
    pub = createPublicKey(pem);
  } catch (err) {
    throw new EdgeloraError(`not a PEM public key: ${(err as Error).message}`, { where: file });
  }
  if (pub.asymmetricKeyType !== 'ed25519') throw new EdgeloraError(`key type ${pub.asymmetricKeyType}, expected ed25519`, { where: file });
  return pub;
}

/** Signs a message body: returns the body with `signature` (base64, 64 bytes) added. */
export function signMessage<T extends object>(body: T, key: SigningKey): T & { signature: string } {
  const sig = sign(null, Buffer.from(canonicalJson(body)), key.privateKey);
  return { ...body, signature: sig.toString('base64') };
}

/** Checks a signed message against one trusted key; returns the reason it fails, or null when valid. */
export function checkSignature(msg: { keyId: string; signature: string }, trusted: KeyObject): string | null {
  const { signature, ...body } = msg;
  const want = keyIdOf(trusted);
  if (msg.keyId !== want) return `signed by unknown key ${msg.keyId} (trusted hub key is ${want})`;
  const sig = Buffer.from(signature, 'base64');
  if (sig.length !== 64) return 'bad signature: not 64 bytes';
  return verify(null, Buffer.from(canonicalJson(body)), trusted, sig) ? null : 'bad signature: does not verify against the trusted hub key';
}
