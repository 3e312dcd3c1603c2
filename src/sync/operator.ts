// The operator's side of the protocol, used by `edgelora publish` and `edgelora fleet status`:
// upload an adapter directory to the hub, ask the hub to sign and publish a stored blob, relay a
// command to a device, and read every device's retained status.
import { randomBytes } from 'node:crypto';
import { EdgeloraError } from '../util/errors.js';
import { decodeJson, encodeJson, HubStatusSchema, PROTOCOL_VERSION, ReplySchema, StatusSchema, type CommandAction, type HubStatus, type Reply, type Status } from './protocol/messages.js';
import { Link, type BrokerOptions } from './transport/mqtt.js';
import { packAdapterDir } from './transfer/pack.js';
import { checkName, parseTopic, topics, type Target } from './protocol/topics.js';
import { uploadBlob } from './transfer/uploader.js';

export interface OperatorOptions {
  broker: BrokerOptions;
  /** Client id; with the shipped ACL it must equal the user name. Default: the user name, else "op-<random>". */
  clientId?: string;
  /** Milliseconds to wait for the hub's reply; default 30000. */
  timeoutMs?: number;
}

export interface FleetSnapshot {
  hub: HubStatus | null;
  devices: Status[];
  /** Retained status messages that failed the schema (device id → reason). */
  invalid: Record<string, string>;
}

export class Operator {
  private readonly waiters = new Map<string, (r: Reply) => void>();
  private counter = 0;
  private lastHub: HubStatus | null = null;
  private constructor(
    readonly link: Link,
    private readonly timeoutMs: number,
  ) {
    link.onMessage((topic, payload) => {
      if (topic === topics.hubStatus && payload.length > 0) {
        const d = decodeJson(HubStatusSchema, payload);
        if (d.ok) this.lastHub = d.value;
        return;
      }
      if (topic !== topics.reply(link.clientId)) return;
      const d = decodeJson(ReplySchema, payload);
      if (!d.ok) return;
      this.waiters.get(d.value.requestId)?.(d.value);
      this.waiters.delete(d.value.requestId);
    });
  }

  /**
   * Connects. Fails at once when every broker URL refuses the connection (nothing listens there,
   * or the credentials are refused), else after `timeoutMs`; the client is closed either way, so
   * the command exits.
   */
  static async open(o: OperatorOptions): Promise<Operator> {
    const clientId = checkName('client id', o.clientId ?? o.broker.username ?? `op-${randomBytes(4).toString('hex')}`);
    const timeoutMs = o.timeoutMs ?? 30_000;
    const link = await Link.open(o.broker, { clientId });
    try {
      await link.waitConnected(timeoutMs, { failFast: true });
      const op = new Operator(link, timeoutMs);
      await link.subscribe([topics.reply(clientId), topics.hubStatus]);
      return op;
    } catch (err) {
      await link.close();
      throw err;
    }
  }

  /**
   * The hub's retained status, waiting up to `waitMs` for it. A hub that never ran on this broker
   * (or one whose broker lost its retained messages) has none: null.
   */
  async hubStatus(waitMs = 1000): Promise<HubStatus | null> {
    const deadline = Date.now() + waitMs;
    while (this.lastHub === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    return this.lastHub;
  }

  /**
   * Fails fast when the hub's retained status says it is offline, instead of waiting out the
   * timeout for a reply that cannot come.
   */
  async requireHub(): Promise<void> {
    const st = await this.hubStatus(Math.min(1000, this.timeoutMs));
    if (st && !st.online) {
      throw new EdgeloraError(`the hub is offline (its last status${st.updatedAt ? ` dates from ${st.updatedAt}` : ''})`, {
        where: this.link.url,
        hint: 'start `edgelora hub` on this broker, or check that --broker names the broker the hub uses',
      });
    }
  }

  async close(): Promise<void> {
    await this.link.close();
  }

  /** Uploads an adapter directory into the hub's store; resolves with its sha256. */
  async uploadDir(dir: string, name: string, onProgress?: (acked: number, total: number) => void): Promise<string> {
    await this.requireHub();
    const blob = await packAdapterDir(dir);
    // Each step waits at most the timeout for its ack; the whole upload may take 10 timeouts.
    return uploadBlob(this.link, blob, checkName('adapter name', name), { ...(onProgress ? { onProgress } : {}), ackTimeoutMs: Math.min(5000, this.timeoutMs), stepTimeoutMs: this.timeoutMs, deadlineMs: this.timeoutMs * 10 });
  }

  private async request(topic: string, body: Record<string, unknown>): Promise<Reply> {
    await this.requireHub();
    const requestId = `r${Date.now().toString(36)}-${(++this.counter).toString(36)}`;
    return new Promise<Reply>((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiters.delete(requestId);
        reject(new EdgeloraError(`no reply from the hub within ${this.timeoutMs} ms (request on ${topic})`, { where: this.link.url, hint: 'is `edgelora hub` running on this broker, and may this user publish there?' }));
      }, this.timeoutMs);
      this.waiters.set(requestId, (r) => {
        clearTimeout(t);
        resolve(r);
      });
      this.link.publish(topic, encodeJson({ ...body, v: PROTOCOL_VERSION, requestId, clientId: this.link.clientId }), { contentType: 'application/json' }).catch((err: unknown) => {
        clearTimeout(t);
        this.waiters.delete(requestId);
        reject(err);
      });
    });
  }

  /** Asks the hub to sign and publish stored blob `sha256` to `target`. */
  publish(sha256: string, target: Target, name?: string): Promise<Reply> {
    return this.request(topics.publishRequest, { type: 'publish', sha256, target, ...(name ? { name } : {}) });
  }

  /** Asks the hub to send a command to a device; the reply carries the device's result. */
  command(deviceId: string, action: CommandAction, adapter?: { id: string; version?: number }): Promise<Reply> {
    return this.request(topics.commandRequest, { type: 'command-request', deviceId, action, ...(adapter ? { adapter } : {}) });
  }

  /** One device's retained status, or null when the broker holds none within `waitMs` (a device that never connected). */
  async deviceStatus(deviceId: string, waitMs = 1000): Promise<Status | null> {
    const topic = topics.status(checkName('device id', deviceId));
    let found: Status | null = null;
    const off = this.link.onMessage((t, payload) => {
      if (t !== topic || payload.length === 0) return;
      const d = decodeJson(StatusSchema, payload);
      if (d.ok) found = d.value;
    });
    try {
      await this.link.subscribe([topic]);
      const deadline = Date.now() + waitMs;
      while (found === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
      return found;
    } finally {
      off();
    }
  }

  /** Collects the retained hub and device statuses for `waitMs` milliseconds. */
  async fleetStatus(waitMs = 1000): Promise<FleetSnapshot> {
    const snap: FleetSnapshot = { hub: null, devices: [], invalid: {} };
    const byId = new Map<string, Status>();
    const off = this.link.onMessage((topic, payload) => {
      const t = parseTopic(topic);
      if (!t || payload.length === 0) return;
      if (t.kind === 'hubStatus') {
        const d = decodeJson(HubStatusSchema, payload);
        if (d.ok) snap.hub = d.value;
      } else if (t.kind === 'status') {
        const d = decodeJson(StatusSchema, payload);
        if (d.ok && d.value.deviceId === t.deviceId) byId.set(t.deviceId, d.value);
        else snap.invalid[t.deviceId] = d.ok ? 'device id does not match the topic' : d.reason;
      }
    });
    // QoS 0: one retained status per device arrives at once, more than a broker queues per client at QoS 1 (see Hub.start).
    await this.link.subscribe([topics.allStatus, topics.hubStatus], 0);
    await new Promise((r) => setTimeout(r, waitMs));
    off();
    snap.devices = [...byId.values()].sort((a, b) => (a.deviceId < b.deviceId ? -1 : 1));
    return snap;
  }
}
