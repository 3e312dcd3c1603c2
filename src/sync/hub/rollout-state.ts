// A staged rollout's spec and persisted state (zod: the source of truth of rollouts/<id>.json in
// the hub store), the pure rules of the state machine (stage plan, thresholds, rate), and the
// store that writes each rollout atomically on every transition.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import { writeFileAtomic } from '../../util/atomic.js';
import { NAME_RE } from '../protocol/topics.js';

const name = z.string().regex(NAME_RE, 'expected 1-64 characters A-Z a-z 0-9 . _ - (letter or digit first)');
const hex64 = z.string().regex(/^[0-9a-f]{64}$/, 'expected 64 lowercase hex digits (sha256)');
const share = z.number().min(0).max(1);

/** How the fleet is cut into stages: cumulative percentages ending at 100, or a fixed size per stage. */
export const StagesSchema = z.discriminatedUnion('kind', [
  z.strictObject({
    kind: z.literal('percent'),
    values: z
      .array(z.number().gt(0).max(100))
      .min(1)
      .max(100)
      .refine((v) => v.every((x, i) => i === 0 || x > v[i - 1]!), 'stage percentages must increase')
      .refine((v) => v[v.length - 1] === 100, 'the last stage must be 100%'),
  }),
  z.strictObject({ kind: z.literal('size'), size: z.number().int().positive() }),
]);
export type Stages = z.infer<typeof StagesSchema>;

/** What an operator asks for (`edgelora rollout start`, POST /api/rollouts). */
export const RolloutSpecSchema = z.strictObject({
  /** The stored blob: full sha256 or a unique prefix of at least 8 hex digits. */
  adapter: z.string().regex(/^[0-9a-f]{8,64}$/, 'expected a sha256 or a prefix of at least 8 lowercase hex digits'),
  /** Adapter id to publish under; default: the name the blob was stored with. */
  name: name.optional(),
  fleet: name,
  stages: StagesSchema.default({ kind: 'percent', values: [1, 10, 50, 100] }),
  /** Share of a stage's devices that must activate before the next stage starts; default 0.95. */
  successThreshold: share.default(0.95),
  /** Abort once this share of the devices with an outcome failed…; default 0.1. */
  abortThreshold: share.default(0.1),
  /** …and at least this many devices have an outcome; default 5. */
  abortMin: z.number().int().min(1).default(5),
  /** A device that has not reported an outcome this long after its publication counts as timed out; default 10 min. */
  stageTimeoutMs: z.number().int().positive().default(600_000),
  /** Device publications per rolling minute; null: unlimited. */
  maxPerMinute: z.number().int().positive().nullable().default(null),
  /** After an abort, devices that activated the adapter get the fleet's previous adapter again. */
  rollbackOnAbort: z.boolean().default(false),
});
export type RolloutSpecInput = z.input<typeof RolloutSpecSchema>;
export type RolloutSpec = z.infer<typeof RolloutSpecSchema>;

export const RolloutStatus = z.enum(['running', 'paused', 'succeeded', 'aborted']);
export type RolloutStatus = z.infer<typeof RolloutStatus>;

/** One device of the plan: pending → sent → activated | refused | failed | timed-out (→ rolled-back). */
export const DeviceOutcome = z.enum(['pending', 'sent', 'activated', 'refused', 'failed', 'timed-out', 'rolled-back']);
export type DeviceOutcome = z.infer<typeof DeviceOutcome>;

const isoTime = z.iso.datetime();
const adapterRef = z.strictObject({ id: name, version: z.number().int().positive(), sha256: hex64 });

export const RolloutDeviceSchema = z.strictObject({
  stage: z.number().int().nonnegative(),
  state: DeviceOutcome,
  sentAt: isoTime.nullable(),
  doneAt: isoTime.nullable(),
  reason: z.string().max(2000).nullable(),
  /** The device's lastError.at when it was sent the adapter: a later, different one is news (clock-free). */
  errorBefore: isoTime.nullable(),
});
export type RolloutDevice = z.infer<typeof RolloutDeviceSchema>;

export const RolloutEventSchema = z.strictObject({ at: isoTime, kind: z.string().max(64), message: z.string().max(2000), stage: z.number().int().nonnegative().optional(), deviceId: name.optional() });
export type RolloutEvent = z.infer<typeof RolloutEventSchema>;

export const RolloutStateSchema = z.strictObject({
  id: name,
  spec: RolloutSpecSchema,
  status: RolloutStatus,
  /** The adapter as published (its full sha256, id and version). */
  adapter: adapterRef,
  /** What the fleet target ran when the rollout started (what joiners keep, and rollback restores); null: nothing. */
  previous: adapterRef.nullable(),
  createdAt: isoTime,
  updatedAt: isoTime,
  /** Device ids per stage, fixed at start. */
  plan: z.array(z.array(name)),
  /** The stage being rolled out (plan.length once every stage is done). */
  stage: z.number().int().nonnegative(),
  stageStartedAt: z.array(isoTime),
  devices: z.record(name, RolloutDeviceSchema),
  /** True once the fleet target names the adapter (joiners get it from then on). */
  fleetPublished: z.boolean(),
  reason: z.string().max(2000).nullable(),
  /** Every transition, oldest first (the last 1000). */
  events: z.array(RolloutEventSchema),
});
export type RolloutState = z.infer<typeof RolloutStateSchema>;

export const MAX_EVENTS = 1000;

/**
 * Splits `deviceIds` into stages. The order is deterministic and differs per adapter: devices are
 * sorted by sha256(adapter sha256 + ":" + device id), so the same fleet and adapter always give the
 * same plan, and one adapter's canaries are not always the next one's.
 */
export function planStages(deviceIds: readonly string[], adapterSha: string, stages: Stages): string[][] {
  const key = (d: string) => createHash('sha256').update(`${adapterSha}:${d}`).digest('hex');
  const order = [...new Set(deviceIds)].map((d) => ({ d, k: key(d) })).sort((a, b) => (a.k < b.k ? -1 : a.k > b.k ? 1 : 0)).map((x) => x.d);
  const n = order.length;
  const out: string[][] = [];
  if (stages.kind === 'size') {
    for (let i = 0; i < n; i += stages.size) out.push(order.slice(i, i + stages.size));
    return out;
  }
  let from = 0;
  for (const p of stages.values) {
    // At least one device per stage while devices remain: a 1% canary of 10 devices is one device.
    const to = Math.min(n, Math.max(from + 1, Math.ceil((p / 100) * n)));
    if (to > from) out.push(order.slice(from, to));
    from = to;
  }
  return out;
}

export interface Counts {
  planned: number;
  pending: number;
  sent: number;
  activated: number;
  failed: number;
  rolledBack: number;
}

/** Failures are refused, failed and timed-out outcomes; a rolled-back device had activated. */
export function countDevices(st: RolloutState, stage?: number): Counts {
  const c: Counts = { planned: 0, pending: 0, sent: 0, activated: 0, failed: 0, rolledBack: 0 };
  for (const d of Object.values(st.devices)) {
    if (stage !== undefined && d.stage !== stage) continue;
    c.planned++;
    if (d.state === 'pending') c.pending++;
    else if (d.state === 'sent') c.sent++;
    else if (d.state === 'activated') c.activated++;
    else if (d.state === 'rolled-back') c.rolledBack++;
    else c.failed++;
  }
  return c;
}

/** Persists rollouts as <storeDir>/rollouts/<id>.json, each write atomic. */
export class RolloutStore {
  readonly dir: string;
  constructor(storeDir: string) {
    this.dir = path.join(storeDir, 'rollouts');
  }

  async loadAll(): Promise<RolloutState[]> {
    await fs.mkdir(this.dir, { recursive: true });
    const out: RolloutState[] = [];
    for (const f of (await fs.readdir(this.dir)).filter((x) => x.endsWith('.json')).sort()) {
      const file = path.join(this.dir, f);
      let raw: unknown;
      try {
        raw = JSON.parse(await fs.readFile(file, 'utf8'));
      } catch (err) {
        throw new EdgeloraError(`cannot read rollout state: ${(err as Error).message}`, { where: file, hint: 'move the file away to drop that rollout' });
      }
      const r = RolloutStateSchema.safeParse(raw);
      if (!r.success) {
        const i = r.error.issues[0];
        throw new EdgeloraError(`rollout state fails its schema at ${i?.path.join('.') || '(root)'}: ${i?.message ?? 'invalid'}`, { where: file, hint: 'move the file away to drop that rollout' });
      }
      out.push(r.data);
    }
    return out;
  }

  async save(st: RolloutState): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true });
    await writeFileAtomic(path.join(this.dir, `${st.id}.json`), JSON.stringify(st));
  }
}
