// Staged rollouts run by the hub (hawkBit rollout groups / AWS IoT Jobs rollout and abort config):
// a persistent state machine per rollout that publishes the adapter to each stage's devices on
// their own device targets (at most --max-per-minute a rolling minute), counts what they report in
// their retained statuses, advances when a stage meets the success threshold, and aborts at the
// abort threshold (optionally sending the activated devices the fleet's previous adapter again).
// The fleet target keeps the previous adapter until the last stage succeeds, so devices that join
// mid-rollout keep it too. Every transition is saved atomically (rollout-state.ts) before anything
// else happens, so a restarted hub picks the rollout up where it was.
import { EventEmitter } from 'node:events';
import { EdgeloraError } from '../../util/errors.js';
import type { Status } from '../protocol/messages.js';
import { targetKey, type Target } from '../protocol/topics.js';
import type { Hub } from './hub.js';
import {
  MAX_EVENTS,
  RolloutSpecSchema,
  RolloutStore,
  countDevices,
  planStages,
  type RolloutDevice,
  type RolloutSpecInput,
  type RolloutState,
} from './rollout-state.js';

export interface RolloutsOptions {
  hub: Hub;
  /** The hub's store directory; rollouts live in its rollouts/ folder. */
  storeDir: string;
  /** Clock for the state machine (timeouts, the rate window, event times); injected by tests. */
  now?: () => Date;
  /** Milliseconds between re-evaluations (timeouts, the rate window); default 1000. 0: only on statuses and calls. */
  tickMs?: number;
  log?: (line: string) => void;
}

export interface RolloutEvents {
  /** A rollout changed (any transition); carries its new state. */
  change: [state: RolloutState];
}

const ONE_MINUTE = 60_000;

export class Rollouts extends EventEmitter<RolloutEvents> {
  private readonly store: RolloutStore;
  private readonly byId = new Map<string, RolloutState>();
  private readonly now: () => Date;
  private timer: NodeJS.Timeout | null = null;
  /** Every mutation runs in this chain: one transition at a time, each saved before the next. */
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** A status from a device a running rollout waits for re-evaluates that rollout. */
  private readonly onStatus = (s: Status) => {
    for (const st of this.byId.values()) if (st.status === 'running' && st.devices[s.deviceId]?.state === 'sent') return void this.enqueue(() => this.step(st)).catch((err: unknown) => this.log(`rollout ${st.id}: ${(err as Error).message}`));
  };

  constructor(private readonly opts: RolloutsOptions) {
    super();
    this.store = new RolloutStore(opts.storeDir);
    this.now = opts.now ?? (() => new Date());
  }

  /** Loads persisted rollouts and resumes the running ones. Call after hub.start(). */
  async open(): Promise<void> {
    for (const st of await this.store.loadAll()) this.byId.set(st.id, st);
    this.opts.hub.on('status', this.onStatus);
    const tickMs = this.opts.tickMs ?? 1000;
    if (tickMs > 0) {
      this.timer = setInterval(() => void this.tick().catch((err: unknown) => this.log(`rollout: ${(err as Error).message}`)), tickMs);
      this.timer.unref();
    }
    for (const st of this.byId.values()) {
      if (st.status !== 'running' && st.status !== 'paused') continue;
      this.event(st, 'hub-started', `this hub run picked the rollout up (${st.status}) at stage ${st.stage + 1}/${st.plan.length}`, { stage: st.stage });
      await this.save(st);
    }
    await this.tick();
  }

  /** Stops evaluating; waits for the transition in progress. The state on disk stays as it is. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.opts.hub.off('status', this.onStatus);
    await this.queue.catch(() => undefined);
  }

  list(): RolloutState[] {
    return [...this.byId.values()].sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : a.id < b.id ? 1 : -1));
  }

  get(id: string): RolloutState {
    const st = this.byId.get(id);
    if (!st) throw new EdgeloraError(`no rollout ${id}`, { where: 'rollout id', hint: 'list them with `edgelora rollout status`' });
    return st;
  }

  /** Re-evaluates every running rollout (timeouts, rate window, outcomes). */
  tick(): Promise<void> {
    return this.enqueue(async () => {
      for (const st of this.byId.values()) if (st.status === 'running') await this.step(st);
    });
  }

  private enqueue<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(() => (this.closed ? Promise.reject(new EdgeloraError('the hub is stopping')) : fn()));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private log(line: string): void {
    this.opts.log?.(line);
  }

  /** Validates the spec, fixes the plan from the fleet's online devices, saves, and starts stage 1. */
  start(input: RolloutSpecInput): Promise<RolloutState> {
    return this.enqueue(async () => {
      const parsed = RolloutSpecSchema.safeParse(input);
      if (!parsed.success) {
        const i = parsed.error.issues[0];
        throw new EdgeloraError(`bad rollout: ${i?.path.join('.') || '(root)'}: ${i?.message ?? 'invalid'}`, { where: 'rollout spec', hint: 'see `edgelora rollout start --help`' });
      }
      const spec = parsed.data;
      const hub = this.opts.hub;
      const store = hub.hubStore;
      const entry = store.getEntry(spec.adapter) ?? store.findBlob(spec.adapter);
      if (!entry) throw new EdgeloraError(`no stored adapter ${spec.adapter}`, { where: 'rollout adapter', hint: 'upload it first (give `rollout start` the adapter directory), or use a sha256 the hub stored' });
      const fleetTarget: Target = { kind: 'fleet', name: spec.fleet };
      const running = [...this.byId.values()].find((r) => r.spec.fleet === spec.fleet && (r.status === 'running' || r.status === 'paused'));
      if (running) throw new EdgeloraError(`rollout ${running.id} is still ${running.status} on fleet ${spec.fleet}`, { where: `fleet:${spec.fleet}`, hint: `wait for it, or \`edgelora rollout abort ${running.id}\`` });
      const known = [...hub.devices.values()].filter((d) => d.fleet === spec.fleet);
      const current = store.target(targetKey(fleetTarget));
      if (known.length === 0 && !current) throw new EdgeloraError(`unknown fleet ${spec.fleet}: no device has reported it and nothing was published to it`, { where: `fleet:${spec.fleet}`, hint: 'check the name with `edgelora fleet status`' });
      const online = known.filter((d) => d.online).map((d) => d.deviceId);
      if (online.length === 0) throw new EdgeloraError(`fleet ${spec.fleet} has no online device to roll out to (${known.length} known, all offline)`, { where: `fleet:${spec.fleet}`, hint: 'start the agents first; see `edgelora fleet status`' });
      const plan = planStages(online, entry.sha256, spec.stages);
      const adapterId = spec.name ?? entry.name;
      const at = this.now().toISOString();
      const devices: Record<string, RolloutDevice> = {};
      plan.forEach((ids, stage) => {
        for (const d of ids) devices[d] = { stage, state: 'pending', sentAt: null, doneAt: null, reason: null, errorBefore: null };
      });
      const id = this.nextId();
      const st: RolloutState = {
        id,
        spec,
        status: 'running',
        adapter: { id: adapterId, version: store.versionFor(adapterId, entry.sha256), sha256: entry.sha256 },
        previous: current ? { id: current.adapter.id, version: current.adapter.version, sha256: current.blob.sha256 } : null,
        createdAt: at,
        updatedAt: at,
        plan,
        stage: 0,
        stageStartedAt: [at],
        devices,
        fleetPublished: false,
        reason: null,
        events: [],
      };
      this.event(st, 'started', `${adapterId} (${entry.sha256.slice(0, 12)}) to fleet ${spec.fleet}: ${plan.length} stage(s) of ${plan.map((p) => p.length).join('/')} devices`);
      this.byId.set(id, st);
      await this.save(st);
      await this.step(st);
      return st;
    });
  }

  pause(id: string): Promise<RolloutState> {
    return this.enqueue(async () => {
      const st = this.get(id);
      if (st.status !== 'running') throw new EdgeloraError(`rollout ${id} is ${st.status}, not running`, { where: `rollout ${id}` });
      st.status = 'paused';
      this.event(st, 'paused', 'paused by the operator: no new device is sent the adapter');
      await this.save(st);
      return st;
    });
  }

  resume(id: string): Promise<RolloutState> {
    return this.enqueue(async () => {
      const st = this.get(id);
      if (st.status !== 'paused') throw new EdgeloraError(`rollout ${id} is ${st.status}, not paused`, { where: `rollout ${id}` });
      st.status = 'running';
      this.event(st, 'resumed', 'resumed by the operator');
      await this.save(st);
      await this.step(st);
      return st;
    });
  }

  abort(id: string, reason = 'aborted by the operator'): Promise<RolloutState> {
    return this.enqueue(async () => {
      const st = this.get(id);
      if (st.status !== 'running' && st.status !== 'paused') throw new EdgeloraError(`rollout ${id} is ${st.status} already`, { where: `rollout ${id}` });
      await this.doAbort(st, reason);
      return st;
    });
  }

  private nextId(): string {
    let n = this.byId.size + 1;
    while (this.byId.has(`r${n}`)) n++;
    return `r${n}`;
  }

  private event(st: RolloutState, kind: string, message: string, extra: { stage?: number; deviceId?: string } = {}): void {
    const at = this.now().toISOString();
    st.events.push({ at, kind, message, ...extra });
    if (st.events.length > MAX_EVENTS) st.events.splice(0, st.events.length - MAX_EVENTS);
    st.updatedAt = at;
    this.log(`rollout ${st.id}: ${kind}${extra.deviceId ? ` ${extra.deviceId}` : ''}: ${message}`);
  }

  private async save(st: RolloutState): Promise<void> {
    await this.store.save(st);
    this.emit('change', st);
  }

  /** One evaluation: outcomes, timeouts, abort criteria, stage completion, then sends within the rate. */
  private async step(st: RolloutState): Promise<void> {
    if (st.status !== 'running') return;
    let changed = this.observe(st);
    const c = countDevices(st);
    const done = c.activated + c.failed + c.rolledBack;
    const { abortThreshold, abortMin, successThreshold } = st.spec;
    if (c.failed > 0 && done >= abortMin && c.failed / done >= abortThreshold) {
      return this.doAbort(st, `${c.failed} of ${done} devices with an outcome failed (${pct(c.failed / done)} ≥ abort threshold ${pct(abortThreshold)}, at least ${abortMin})`);
    }
    while (st.stage < st.plan.length) {
      const s = countDevices(st, st.stage);
      if (s.pending + s.sent > 0) break;
      const share = s.activated / s.planned;
      if (share < successThreshold) {
        return this.doAbort(st, `stage ${st.stage + 1} ended with ${s.activated} of ${s.planned} devices activated (${pct(share)} < success threshold ${pct(successThreshold)})`);
      }
      this.event(st, 'stage-done', `stage ${st.stage + 1}/${st.plan.length}: ${s.activated} of ${s.planned} activated`, { stage: st.stage });
      st.stage++;
      changed = true;
      if (st.stage < st.plan.length) {
        st.stageStartedAt.push(this.now().toISOString());
        this.event(st, 'stage-started', `stage ${st.stage + 1}/${st.plan.length}: ${st.plan[st.stage]!.length} devices`, { stage: st.stage });
      }
    }
    if (st.stage >= st.plan.length) {
      // Every stage passed: the fleet target gets the adapter, so joiners and devices outside the plan get it too.
      await this.save(st);
      if (!st.fleetPublished) {
        await this.opts.hub.publish(st.adapter.sha256, { kind: 'fleet', name: st.spec.fleet }, st.adapter.id);
        st.fleetPublished = true;
      }
      st.status = 'succeeded';
      this.event(st, 'succeeded', `every stage passed; fleet ${st.spec.fleet} now runs ${st.adapter.id} v${st.adapter.version}`);
      await this.save(st);
      return;
    }
    if (changed) await this.save(st);
    await this.sendWithinRate(st);
  }

  /** Marks sent devices activated / refused / failed / timed out from the statuses the hub holds. */
  private observe(st: RolloutState): boolean {
    let changed = false;
    const now = this.now();
    const tag = `${st.adapter.id} v${st.adapter.version}`;
    for (const [id, d] of Object.entries(st.devices)) {
      if (d.state !== 'sent') continue;
      const s = this.opts.hub.devices.get(id);
      const err = s?.lastError ?? null;
      let outcome: RolloutDevice['state'] | null = null;
      let reason: string | null = null;
      if (s?.active?.sha256 === st.adapter.sha256) outcome = 'activated';
      else if (err && err.at !== d.errorBefore && err.reason.includes(tag)) {
        outcome = err.reason.startsWith('activation of') ? 'failed' : 'refused';
        reason = err.reason;
      } else if (d.sentAt && now.getTime() - Date.parse(d.sentAt) >= st.spec.stageTimeoutMs) {
        outcome = 'timed-out';
        reason = `no outcome within ${st.spec.stageTimeoutMs} ms of the publication${s && !s.online ? ' (the device is offline)' : ''}`;
      }
      if (!outcome) continue;
      d.state = outcome;
      d.doneAt = now.toISOString();
      d.reason = reason;
      changed = true;
      this.event(st, outcome, reason ?? `runs ${tag}`, { stage: d.stage, deviceId: id });
    }
    return changed;
  }

  /** Publishes to the current stage's pending devices, at most maxPerMinute in any rolling minute. */
  private async sendWithinRate(st: RolloutState): Promise<void> {
    const now = this.now();
    let allowance = Infinity;
    if (st.spec.maxPerMinute !== null) {
      const recent = Object.values(st.devices).filter((d) => d.sentAt !== null && now.getTime() - Date.parse(d.sentAt) < ONE_MINUTE).length;
      allowance = st.spec.maxPerMinute - recent;
    }
    for (const id of st.plan[st.stage] ?? []) {
      if (allowance <= 0) break;
      const d = st.devices[id]!;
      if (d.state !== 'pending') continue;
      d.state = 'sent';
      d.sentAt = now.toISOString();
      d.errorBefore = this.opts.hub.devices.get(id)?.lastError?.at ?? null;
      allowance--;
      // Published before it is saved as sent: a crash in between publishes it again after the
      // restart (same bytes, a newer seq: the device just activates what it holds), never not at all.
      await this.opts.hub.publish(st.adapter.sha256, { kind: 'device', name: id }, st.adapter.id);
      this.event(st, 'sent', `published ${st.adapter.id} v${st.adapter.version} to device:${id}`, { stage: d.stage, deviceId: id });
      await this.save(st);
    }
  }

  private async doAbort(st: RolloutState, reason: string): Promise<void> {
    st.status = 'aborted';
    st.reason = reason;
    this.event(st, 'aborted', reason, { stage: st.stage });
    await this.save(st);
    if (!st.spec.rollbackOnAbort) return;
    for (const [id, d] of Object.entries(st.devices)) {
      if (d.state !== 'activated' && d.state !== 'sent') continue;
      try {
        // A device target manifest with a newer seq than the rollout's: the device activates the
        // previous adapter it still holds (no download) and keeps it across reconnects.
        if (st.previous) await this.opts.hub.publish(st.previous.sha256, { kind: 'device', name: id }, st.previous.id);
        else await this.opts.hub.command(id, 'deactivate');
        d.state = 'rolled-back';
        d.doneAt = this.now().toISOString();
        this.event(st, 'rolled-back', st.previous ? `sent back to ${st.previous.id} v${st.previous.version}` : 'deactivated (the fleet ran no adapter before)', { stage: d.stage, deviceId: id });
      } catch (err) {
        this.event(st, 'rollback-failed', (err as Error).message, { stage: d.stage, deviceId: id });
      }
      await this.save(st);
    }
  }
}

function pct(x: number): string {
  return `${Math.round(x * 1000) / 10}%`;
}
