// The hub's keys a device needs, from --trust: the hub's Ed25519 public key, and the hub's X25519
// public key that uploads are sealed to (--hub-enc-key, else `<trust prefix>.x25519.pub` beside it,
// where `edgelora keygen` writes it). Shared by `agent` and `serve --broker`.
import { existsSync } from 'node:fs';
import type { KeyObject } from 'node:crypto';
import { loadPublicKey } from '../sync/protocol/signing.js';
import { loadEncPublicKey } from '../sync/protocol/envelope.js';

export interface HubKeys {
  trustedKey: KeyObject;
  /** Absent when no X25519 key is given or found beside the trusted key (uploads then need --allow-plaintext). */
  hubEncKey?: { raw: Buffer; keyId: string };
}

export async function loadHubKeys(trustFile: string, hubEncKeyFile?: string): Promise<HubKeys> {
  const trustedKey = await loadPublicKey(trustFile);
  const beside = `${trustFile.replace(/\.pub$/, '')}.x25519.pub`;
  const encFile = hubEncKeyFile ?? (existsSync(beside) ? beside : undefined);
  if (!encFile) return { trustedKey };
  const enc = await loadEncPublicKey(encFile);
  return { trustedKey, hubEncKey: { raw: enc.raw, keyId: enc.keyId } };
}
