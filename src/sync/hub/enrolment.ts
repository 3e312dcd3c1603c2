// The hub's list of enrolled device keys (<store>/enrolled.json): the only X25519 keys the hub
// seals publications to. An operator adds a device (`edgelora fleet enroll`) with the key it
// announced or from a key file, and removes it; a key a device merely publishes is never trusted.
// The hub re-reads the file at every publication, so enrolment takes effect without a restart.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import { writeFileAtomic } from '../../util/atomic.js';
import { NAME_RE, type Target } from '../protocol/topics.js';
import { EncPublicKeySchema, type EncPublicKey, type Status } from '../protocol/messages.js';
import { encKeyIdOf } from '../protocol/envelope.js';

const name = z.string().regex(NAME_RE);

export const EnrolmentSchema = z.strictObject({
  deviceId: name,
  key: EncPublicKeySchema,
  /** The fleet (and group) the operator enrolled the device into: a device's own status cannot move it. */
  fleet: name,
  group: name.nullable(),
  enrolledAt: z.iso.datetime(),
  /** "announced" (the key from its retained status) or "file:<path>". */
  source: z.string().max(1024),
});
export type Enrolment = z.infer<typeof EnrolmentSchema>;

const FileSchema = z.strictObject({ format: z.literal('edgelora-enrolled/1'), devices: z.record(z.string(), EnrolmentSchema) });

export function enrolmentFile(storeDir: string): string {
  return path.join(storeDir, 'enrolled.json');
}

/** Every enrolled device (an absent file: none). Throws EdgeloraError on a corrupt file. */
export async function readEnrolments(storeDir: string): Promise<Map<string, Enrolment>> {
  const file = enrolmentFile(storeDir);
  const text = await fs.readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw new EdgeloraError(`cannot read enrolled keys: ${err.message}`, { where: file });
  });
  if (text === null) return new Map();
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`enrolled keys are not JSON: ${(err as Error).message}`, { where: file, hint: 'restore it from a backup, or re-enrol the devices' });
  }
  const r = FileSchema.safeParse(raw);
  if (!r.success) throw new EdgeloraError(`enrolled keys: ${r.error.issues[0]?.message ?? 'invalid'} at ${r.error.issues[0]?.path.join('.') ?? ''}`, { where: file });
  for (const [id, e] of Object.entries(r.data.devices)) {
    if (e.deviceId !== id) throw new EdgeloraError(`enrolled keys: entry ${id} names device ${e.deviceId}`, { where: file });
    if (encKeyIdOf(Buffer.from(e.key.pub, 'base64')) !== e.key.keyId) throw new EdgeloraError(`enrolled keys: ${id}'s key id does not match its key`, { where: file });
  }
  return new Map(Object.entries(r.data.devices));
}

async function writeEnrolments(storeDir: string, m: Map<string, Enrolment>): Promise<void> {
  await fs.mkdir(storeDir, { recursive: true });
  const devices = Object.fromEntries([...m.entries()].sort(([a], [b]) => (a < b ? -1 : 1)));
  await writeFileAtomic(enrolmentFile(storeDir), `${JSON.stringify({ format: 'edgelora-enrolled/1', devices }, null, 2)}\n`);
}

export async function enroll(storeDir: string, e: Enrolment): Promise<void> {
  const parsed = EnrolmentSchema.parse(e);
  if (encKeyIdOf(Buffer.from(parsed.key.pub, 'base64')) !== parsed.key.keyId) throw new EdgeloraError(`key id ${parsed.key.keyId} does not match the key`, { where: parsed.deviceId });
  const m = await readEnrolments(storeDir);
  m.set(parsed.deviceId, parsed);
  await writeEnrolments(storeDir, m);
}

/** Removes a device; its next publications leave it out (revocation by re-publication). Returns whether it was enrolled. */
export async function unenroll(storeDir: string, deviceId: string): Promise<boolean> {
  const m = await readEnrolments(storeDir);
  const had = m.delete(deviceId);
  if (had) await writeEnrolments(storeDir, m);
  return had;
}

/** The enrolled devices a publication to `target` is sealed for. */
export function recipientsFor(enrolled: Map<string, Enrolment>, target: Target): Enrolment[] {
  const all = [...enrolled.values()];
  if (target.kind === 'fleet') return all.filter((e) => e.fleet === target.name);
  if (target.kind === 'group') return all.filter((e) => e.group === target.name);
  return all.filter((e) => e.deviceId === target.name);
}

export type KeyState = 'enrolled' | 'unenrolled' | 'changed' | 'no-key';

/** How a device's announced key compares with its enrolment. */
export function keyState(status: Pick<Status, 'deviceId' | 'encKey'>, enrolled: Map<string, Enrolment>): KeyState {
  const e = enrolled.get(status.deviceId);
  const k: EncPublicKey | null | undefined = status.encKey;
  if (!k) return e ? 'changed' : 'no-key';
  if (!e) return 'unenrolled';
  return e.key.keyId === k.keyId && e.key.pub === k.pub ? 'enrolled' : 'changed';
}

/**
 * The enrolment of a device from its retained status (the key it announces, its fleet and group),
 * for `edgelora fleet enroll <device-id>`. `fleet`/`group` override what the status claims.
 */
export function enrolmentFromStatus(status: Status, o: { fleet?: string; group?: string | null; now?: Date } = {}): Enrolment {
  if (!status.encKey) {
    throw new EdgeloraError(`device ${status.deviceId} announces no X25519 key`, { where: `status of ${status.deviceId}`, hint: 'upgrade its agent (it makes a key at first start), or import its key with --key-file' });
  }
  const fleet = o.fleet ?? status.fleet;
  if (!fleet) throw new EdgeloraError(`device ${status.deviceId} names no fleet`, { where: `status of ${status.deviceId}`, hint: 'pass --fleet' });
  return EnrolmentSchema.parse({
    deviceId: status.deviceId,
    key: status.encKey,
    fleet,
    group: o.group !== undefined ? o.group : (status.group ?? null),
    enrolledAt: (o.now ?? new Date()).toISOString(),
    source: 'announced',
  });
}
