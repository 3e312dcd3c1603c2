// The MQTT topic table of the edgelora sync protocol, version 1: every topic the hub, the agents
// and operator tools use is built here and nowhere else. See docs/protocol.md for who publishes
// and who subscribes to each, with QoS and retain flags.
import { EdgeloraError } from '../../util/errors.js';

export const ROOT = 'edgelora/v1';

/** Who a distribution is for: a whole fleet, a group (global name), or one device. */
export type TargetKind = 'fleet' | 'group' | 'device';
export interface Target {
  kind: TargetKind;
  name: string;
}

/** Names that can appear as one topic level: no wildcards, no separators, no leading '$'. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function checkName(what: string, name: string): string {
  if (!NAME_RE.test(name)) {
    throw new EdgeloraError(`invalid ${what} "${name}"`, {
      where: what,
      hint: 'use 1-64 characters from A-Z a-z 0-9 . _ - , starting with a letter or digit',
    });
  }
  return name;
}

/** Parses "fleet:<name>", "group:<name>" or "device:<id>". */
export function parseTarget(spec: string): Target {
  const m = /^(fleet|group|device):(.+)$/.exec(spec);
  if (!m) {
    throw new EdgeloraError(`bad target "${spec}"`, { where: '--to', hint: 'write fleet:<name>, group:<name> or device:<id>' });
  }
  const kind = m[1] as TargetKind;
  return { kind, name: checkName(kind === 'device' ? 'device id' : `${kind} name`, m[2] ?? '') };
}

export function targetKey(t: Target): string {
  return `${t.kind}:${t.name}`;
}

export const topics = {
  // hub → devices of a target
  /** Retained, QoS 1: the signed manifest (JSON) of what the target should run. */
  manifest: (t: Target) => `${ROOT}/t/${t.kind}/${t.name}/manifest`,
  /** QoS 1: binary chunk frames of the blob the manifest names. */
  chunk: (t: Target) => `${ROOT}/t/${t.kind}/${t.name}/chunk`,
  /** QoS 1: signed commands to one device. */
  command: (deviceId: string) => `${ROOT}/t/device/${deviceId}/cmd`,
  /** QoS 1: acknowledgements of an upload from this client. */
  uploadAck: (clientId: string) => `${ROOT}/t/device/${clientId}/up/ack`,
  /** QoS 1: the hub's reply to a publish or command request from this operator client. */
  reply: (clientId: string) => `${ROOT}/t/device/${clientId}/reply`,

  // device (or operator client) → hub, each under its own id
  /** Retained, QoS 1: the device's status (JSON); its last will is the offline status. */
  status: (deviceId: string) => `${ROOT}/dev/${deviceId}/status`,
  /** QoS 1: a request for the chunks this device lacks (JSON with a bitmap). */
  missing: (deviceId: string) => `${ROOT}/dev/${deviceId}/missing`,
  /** QoS 1: the result of a command (JSON, carries the command id). */
  result: (deviceId: string) => `${ROOT}/dev/${deviceId}/result`,
  uploadInit: (clientId: string) => `${ROOT}/dev/${clientId}/up/init`,
  uploadSegment: (clientId: string) => `${ROOT}/dev/${clientId}/up/seg`,
  uploadFin: (clientId: string) => `${ROOT}/dev/${clientId}/up/fin`,

  // operator → hub
  /** QoS 1: a request to sign and publish a stored adapter to a target (operators only, by ACL). */
  publishRequest: `${ROOT}/hub/publish`,
  /** QoS 1: a request to send a command to a device through the hub (operators only, by ACL). */
  commandRequest: `${ROOT}/hub/command`,
  /** Retained, QoS 1: the hub's own status (online, key id); last will offline. */
  hubStatus: `${ROOT}/hub/status`,

  // subscriptions (wildcards)
  allManifests: `${ROOT}/t/+/+/manifest`,
  allStatus: `${ROOT}/dev/+/status`,
  allMissing: `${ROOT}/dev/+/missing`,
  allResults: `${ROOT}/dev/+/result`,
  allUploads: `${ROOT}/dev/+/up/+`,
};

/** What a topic the hub subscribed to is about, or null for a topic outside the table. */
export type ParsedTopic =
  | { kind: 'manifest' | 'chunk'; target: Target }
  | { kind: 'status' | 'missing' | 'result'; deviceId: string }
  | { kind: 'upload'; clientId: string; stage: 'init' | 'seg' | 'fin' }
  | { kind: 'command' | 'uploadAck' | 'reply'; deviceId: string }
  | { kind: 'publishRequest' | 'commandRequest' | 'hubStatus' };

export function parseTopic(topic: string): ParsedTopic | null {
  if (topic === topics.publishRequest) return { kind: 'publishRequest' };
  if (topic === topics.commandRequest) return { kind: 'commandRequest' };
  if (topic === topics.hubStatus) return { kind: 'hubStatus' };
  const parts = topic.split('/');
  if (parts[0] !== 'edgelora' || parts[1] !== 'v1') return null;
  const [, , area, a, b, c, d] = parts;
  if (area === 't' && a !== undefined && b !== undefined) {
    if ((a === 'fleet' || a === 'group' || a === 'device') && (c === 'manifest' || c === 'chunk') && d === undefined) {
      return { kind: c, target: { kind: a, name: b } };
    }
    if (a === 'device' && c === 'cmd' && d === undefined) return { kind: 'command', deviceId: b };
    if (a === 'device' && c === 'up' && d === 'ack') return { kind: 'uploadAck', deviceId: b };
    if (a === 'device' && c === 'reply' && d === undefined) return { kind: 'reply', deviceId: b };
    return null;
  }
  if (area === 'dev' && a !== undefined) {
    if ((b === 'status' || b === 'missing' || b === 'result') && c === undefined) return { kind: b, deviceId: a };
    if (b === 'up' && (c === 'init' || c === 'seg' || c === 'fin') && d === undefined) return { kind: 'upload', clientId: a, stage: c };
  }
  return null;
}
