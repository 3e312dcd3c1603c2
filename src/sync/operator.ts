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
  private constructor(
    readonly link: Link,
    private readonly timeoutMs: number,
  ) {
    link.onMessage((topic, payload) => {
      if (topic !== topics.reply(link.clientId)) return;
      const d = decodeJson(ReplySchema, payload);
      if (!d.ok) return;
      this.waiters.get(d.value.requestId)?.(d.value);
      this.waiters.delete(d.value.requestId);
    });
  }

  static async open(o: OperatorOptions): Promise<Operator> {
    const clientId = checkName('client id', o.clientId ?? o.broker.username ?? `op-${randomBytes(4).toString('hex')}`);
    const link = await Link.open(o.broker, { clientId });
    await link.waitConnected(o.timeoutMs ?? 30_000);
    await link.subscribe([topics.reply(clientId)]);
    return new Operator(link, o.timeoutMs ?? 30_000);
  }

  async close(): Promise<void> {
    await this.link.close();
  }

  /** Uploads an adapter directory into the hub's store; resolves with its sha256. */
  async uploadDir(dir: string, name: string, onProgress?: (acked: number, total: number) => void): Promise<string> {
    const blob = await packAdapterDir(dir);
    return uploadBlob(this.link, blob, checkName('adapter name', name), { ...(onProgress ? { onProgress } : {}), deadlineMs: this.timeoutMs * 10 });
  }

  private request(topic: string, body: Record<string, unknown>): Promise<Reply> {
    const requestId = `r${Date.now().toString(36)}-${(++this.counter).toString(36)}`;
    return new Promise<Reply>((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiters.delete(requestId);
        reject(new EdgeloraError(`no reply from the hub within ${this.timeoutMs} ms`, { where: topic, hint: 'is `edgelora hub` running on this broker, and may this user publish there?' }));
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
    await this.link.subscribe([topics.allStatus, topics.hubStatus]);
    await new Promise((r) => setTimeout(r, waitMs));
    off();
    snap.devices = [...byId.values()].sort((a, b) => (a.deviceId < b.deviceId ? -1 : 1));
    return snap;
  }
}
