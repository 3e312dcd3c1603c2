// The one place edgelora talks to mqtt.js: connection options (credentials, TLS, protocol version
// with fallback from MQTT 5 to 3.1.1), publishing with MQTT 5 properties only when the session is
// v5, byte accounting, and an inbound hook tests use to drop, duplicate or reorder messages.
import { EventEmitter } from 'node:events';
import { promises as fs } from 'node:fs';
import mqtt, { type IClientOptions, type IClientPublishOptions, type MqttClient } from 'mqtt';
import { EdgeloraError } from '../../util/errors.js';
import { withTimeout } from '../../util/timeout.js';

/** How to reach the broker; every field but `url` is optional and passed through to mqtt.js. */
export interface BrokerOptions {
  /**
   * mqtt://host:port, mqtts://host:port (TLS), ws:// or wss://; or several (the nodes of a
   * clustered broker), tried in turn: when the node in use is gone the client connects to the
   * next one, resubscribes, and the protocol resumes from its retained messages.
   */
  url: string | readonly string[];
  username?: string;
  password?: string;
  /** PEM file of the CA that signed the broker's certificate (mqtts). */
  caFile?: string;
  /** PEM client certificate and key files (mutual TLS). */
  certFile?: string;
  keyFile?: string;
  /** Accept a broker certificate that does not verify (tests only); default false. */
  insecure?: boolean;
  /** 5 (default: falls back to 4 when the broker refuses 5, as aedes does) or 4 (MQTT 3.1.1). */
  protocolVersion?: 4 | 5;
  /** Milliseconds between reconnect attempts; default 1000. */
  reconnectMs?: number;
}

/** A last will: always a JSON payload (sent with content type application/json on MQTT 5). */
export interface Will {
  topic: string;
  payload: Buffer;
  retain: boolean;
}

/** Called for every inbound message; call `deliver` (any number of times, at any time) to pass it on. */
export type InboundHook = (topic: string, payload: Buffer, deliver: (topic: string, payload: Buffer) => void) => void;

export type MessageHandler = (topic: string, payload: Buffer) => void | Promise<unknown>;

export interface PublishOpts {
  qos?: 0 | 1;
  retain?: boolean;
  /** MQTT 5 message expiry (seconds); ignored on 3.1.1. */
  expirySec?: number;
  /** MQTT 5 user properties; ignored on 3.1.1. */
  user?: Record<string, string>;
  /** MQTT 5 content type; ignored on 3.1.1. */
  contentType?: string;
}

async function readOpt(file: string | undefined, what: string): Promise<Buffer | undefined> {
  if (file === undefined) return undefined;
  return fs.readFile(file).catch((err: unknown) => {
    throw new EdgeloraError(`cannot read ${what}: ${(err as Error).message}`, { where: file });
  });
}

/** The URLs of a BrokerOptions, as a list. */
export function brokerUrlList(b: BrokerOptions): string[] {
  return typeof b.url === 'string' ? [b.url] : [...b.url];
}

const DEFAULT_PORTS: Record<string, number> = { mqtt: 1883, tcp: 1883, mqtts: 8883, tls: 8883, ssl: 8883, ws: 80, wss: 443 };

interface Server {
  host: string;
  port: number;
  protocol: NonNullable<IClientOptions['protocol']>;
}

/** One {host, port, protocol} per URL (they share credentials and TLS files). */
function serverList(urls: string[]): Server[] {
  return urls.map((u) => {
    let parsed: URL;
    try {
      parsed = new URL(u);
    } catch {
      throw new EdgeloraError(`not a broker URL: ${u}`, { where: '--broker', hint: 'write mqtt://host:port or mqtts://host:port' });
    }
    const protocol = parsed.protocol.replace(/:$/, '');
    const port = parsed.port === '' ? DEFAULT_PORTS[protocol] : Number(parsed.port);
    if (port === undefined) throw new EdgeloraError(`unknown broker protocol ${protocol}: in ${u}`, { where: '--broker', hint: 'use mqtt://, mqtts://, ws:// or wss://' });
    return { host: parsed.hostname, port, protocol: protocol as Server['protocol'] };
  });
}

/** Socket errors that mean "nothing listens there" rather than "the network blinked". */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN']);

export class Link {
  /** Payload bytes published (all topics) and by kind, for egress accounting. */
  bytesOut = 0;
  messagesOut = 0;
  private readonly handlers: MessageHandler[] = [];
  /** Connection attempts that failed since the last success, and why the last one did. */
  private failures = 0;
  private lastFailure: string | null = null;
  /** Every topic subscribed, with its QoS: restored after each reconnect. */
  private readonly wanted = new Map<string, 0 | 1>();
  private resubTimer: NodeJS.Timeout | undefined;
  private readonly emitter = new EventEmitter();
  private connects = 0;
  /** The work the last delivered message started; mqtt.js reads the next packet only after it. */
  private work: Promise<unknown> = Promise.resolve();
  private constructor(
    readonly client: MqttClient,
    readonly clientId: string,
    /** Every broker URL, comma-joined, for messages. */
    readonly url: string,
    private readonly urlCount: number,
    private readonly inbound: InboundHook | undefined,
  ) {
    client.on('connect', () => {
      this.failures = 0;
      this.lastFailure = null;
      if (++this.connects > 1) this.resubscribe();
    });
    client.on('error', (err: Error & { code?: string | number }) => {
      if (typeof err.code === 'string' && UNREACHABLE.has(err.code)) {
        this.failures++;
        this.lastFailure = `${err.code}: ${err.message}`;
      } else if (err.code === 4 || err.code === 5 || err.code === 134 || err.code === 135) {
        // CONNACK: bad user name or password / not authorized. Retrying will not change that.
        this.failures = Number.MAX_SAFE_INTEGER;
        this.lastFailure = `the broker refused the credentials (${err.message})`;
      }
    });
    client.on('message', (topic, payload) => {
      const started: Promise<unknown>[] = [];
      const deliver = (t: string, p: Buffer) => {
        for (const h of this.handlers) {
          const r = h(t, p);
          if (r) started.push(r);
        }
      };
      if (this.inbound) this.inbound(topic, payload, deliver);
      else deliver(topic, payload);
      this.work = started.length > 0 ? Promise.allSettled(started) : Promise.resolve();
    });
    // Backpressure: mqtt.js emits 'message', then calls handleMessage and only parses the next
    // packet (and acks this one) after its callback. Waiting for the handlers' work here makes a
    // slow consumer slow the socket down instead of piling up chunks in memory.
    client.handleMessage = (_packet, callback) => {
      this.work.then(
        () => callback(),
        () => callback(),
      );
    };
  }

  /** Creates the client and starts connecting (it keeps retrying in the background). */
  static async open(
    broker: BrokerOptions,
    opts: { clientId: string; will?: Will; clean?: boolean; inbound?: InboundHook; keepaliveSec?: number; /** MQTT 5 receive maximum; default 16. */ receiveMaximum?: number },
  ): Promise<Link> {
    const [ca, cert, key] = await Promise.all([readOpt(broker.caFile, 'CA file'), readOpt(broker.certFile, 'client certificate'), readOpt(broker.keyFile, 'client key')]);
    const version = broker.protocolVersion ?? 5;
    const urls = brokerUrlList(broker);
    const first = urls[0];
    if (first === undefined) throw new EdgeloraError('no broker URL given', { where: 'broker.url', hint: 'pass --broker mqtt://host:1883' });
    const servers = serverList(urls);
    const options: IClientOptions = {
      clientId: opts.clientId,
      clean: opts.clean ?? true,
      protocolVersion: version,
      reconnectPeriod: broker.reconnectMs ?? 1000,
      connectTimeout: 10_000,
      keepalive: opts.keepaliveSec ?? 30,
      // Link resubscribes itself after a reconnect, checking the grants (see subscribe()).
      resubscribe: false,
      ...(broker.username !== undefined ? { username: broker.username } : {}),
      ...(broker.password !== undefined ? { password: broker.password } : {}),
      ...(ca ? { ca } : {}),
      ...(cert ? { cert } : {}),
      ...(key ? { key } : {}),
      ...(broker.insecure ? { rejectUnauthorized: false } : {}),
      // MQTT 5: at most this many QoS 1 messages in flight to us, which bounds what the broker
      // buffers per client (a chunk is up to 256 KiB) while we apply backpressure.
      ...(version === 5 ? { properties: { receiveMaximum: opts.receiveMaximum ?? 16 } } : {}),
      // The will's content type travels only on MQTT 5 (mqtt-packet leaves will properties out of a 3.1.1 CONNECT).
      ...(opts.will ? { will: { topic: opts.will.topic, payload: opts.will.payload, qos: 1 as const, retain: opts.will.retain, properties: { contentType: 'application/json' } } } : {}),
    };
    let client: MqttClient;
    try {
      client = mqtt.connect(first, options);
    } catch (err) {
      throw new EdgeloraError(`cannot connect: ${(err as Error).message}`, { where: urls.join(','), hint: 'use mqtt://host:port or mqtts://host:port' });
    }
    // Failover: after every lost or failed connection the next attempt goes to the next URL. (Our
    // own rotation rather than mqtt.js `servers`, whose rotation would also move on after the
    // protocol fallback below, away from the node that just answered.)
    let at = 0;
    let retrySameNode = false;
    client.on('close', () => {
      if (servers.length < 2) return;
      if (retrySameNode) retrySameNode = false;
      else at = (at + 1) % servers.length;
      const next = servers[at] as Server;
      client.options.host = next.host;
      client.options.hostname = next.host;
      client.options.port = next.port;
      client.options.protocol = next.protocol;
    });
    // A 3.1.1-only broker (aedes, NATS, old Mosquitto) answers a v5 CONNECT with "unacceptable
    // protocol version" (return code 1): retry with 3.1.1 unless v5 was asked for explicitly.
    client.on('error', (err: Error & { code?: number }) => {
      if (err.code === 1 && client.options.protocolVersion === 5 && broker.protocolVersion === undefined) {
        retrySameNode = true;
        client.options.protocolVersion = 4;
        if (client.options.properties) delete client.options.properties;
        // mqtt.js ends the client after a refused CONNACK; start it again with 3.1.1.
        client.once('close', () => setImmediate(() => client.reconnect()));
      }
    });
    return new Link(client, opts.clientId, urls.join(','), urls.length, opts.inbound);
  }

  get v5(): boolean {
    return this.client.options.protocolVersion === 5;
  }
  get connected(): boolean {
    return this.client.connected;
  }

  /** Adds a message handler (a returned promise holds back the next message); returns its remover. */
  onMessage(h: MessageHandler): () => void {
    this.handlers.push(h);
    return () => {
      const i = this.handlers.indexOf(h);
      if (i >= 0) this.handlers.splice(i, 1);
    };
  }

  /** The URL of the node this client is connected (or connecting) to. */
  get currentUrl(): string {
    const o = this.client.options;
    return `${o.protocol ?? 'mqtt'}://${o.hostname ?? o.host ?? '?'}:${o.port ?? '?'}`;
  }

  /**
   * Resolves once connected (now or later); rejects after `timeoutMs`, or with `failFast` as soon
   * as every broker URL refused the connection (nothing listens there, or bad credentials): an
   * operator command then fails at once instead of waiting out its timeout.
   */
  waitConnected(timeoutMs = 10_000, o: { failFast?: boolean } = {}): Promise<void> {
    if (this.client.connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (err: EdgeloraError | null) => {
        clearTimeout(t);
        this.client.off('connect', ok);
        this.client.off('error', onError);
        if (err) reject(err);
        else resolve();
      };
      const t = setTimeout(
        () => done(new EdgeloraError(`no connection to the broker after ${timeoutMs} ms${this.lastFailure ? ` (last error: ${this.lastFailure})` : ''}`, { where: this.url, hint: 'check --broker (host and port), credentials and that the broker runs' })),
        timeoutMs,
      );
      const ok = () => done(null);
      const onError = () => {
        if (o.failFast && this.failures >= this.urlCount) {
          done(new EdgeloraError(`cannot connect to the broker: ${this.lastFailure ?? 'refused'}`, { where: this.url, hint: 'check --broker (host and port), --username/--password, and that the broker runs' }));
        }
      };
      this.client.once('connect', ok);
      this.client.on('error', onError);
    });
  }

  /**
   * Subscribes, and again after every reconnect. A refusal now throws (an ACL says no); after a
   * reconnect refusals and timeouts are retried with backoff, because a cluster node whose
   * JetStream is still electing leaders refuses QoS 1 subscriptions for a while (NATS does).
   */
  async subscribe(topicList: string[], qos: 0 | 1 = 1): Promise<void> {
    for (const t of topicList) this.wanted.set(t, qos);
    await this.subscribeNow(topicList.map((t) => [t, qos]));
  }

  private async subscribeNow(list: [string, 0 | 1][]): Promise<void> {
    const map: Record<string, { qos: 0 | 1 }> = {};
    for (const [t, qos] of list) map[t] = { qos };
    const grants = await this.client.subscribeAsync(map);
    for (const g of grants) {
      if (g.qos === 128) throw new EdgeloraError('subscription refused by the broker', { where: g.topic, hint: 'check the broker ACL for this user' });
    }
  }

  private resubscribe(attempt = 0): void {
    if (this.wanted.size === 0 || !this.client.connected) return;
    clearTimeout(this.resubTimer);
    this.subscribeNow([...this.wanted]).then(
      () => this.emitter.emit('resubscribed'),
      () => {
        // Retried while this connection lasts; a new connection starts over.
        if (this.client.connected) this.resubTimer = setTimeout(() => this.resubscribe(attempt + 1), Math.min(30_000, 500 * 2 ** attempt));
      },
    );
  }

  /** Calls `fn` each time the subscriptions were restored after a reconnect. */
  onResubscribed(fn: () => void): void {
    this.emitter.on('resubscribed', fn);
  }

  /** Publishes; resolves when the broker acknowledged (QoS 1) or the packet was written (QoS 0). */
  async publish(topic: string, payload: Buffer, o: PublishOpts = {}): Promise<void> {
    const po: IClientPublishOptions = { qos: o.qos ?? 1, retain: o.retain ?? false };
    if (this.v5) {
      const props: NonNullable<IClientPublishOptions['properties']> = {};
      if (o.expirySec !== undefined) props.messageExpiryInterval = o.expirySec;
      if (o.user) props.userProperties = o.user;
      if (o.contentType) props.contentType = o.contentType;
      if (Object.keys(props).length > 0) po.properties = props;
    }
    this.bytesOut += payload.length;
    this.messagesOut++;
    await this.client.publishAsync(topic, payload, po);
  }

  /**
   * Disconnects: cleanly (an MQTT DISCONNECT, so the broker drops the last will: a clean stop's
   * own goodbye is the only one sent) when the broker answers within 1 s, else by closing the socket.
   */
  async close(): Promise<void> {
    clearTimeout(this.resubTimer);
    if (this.client.connected) {
      const ok = await withTimeout(this.client.endAsync(false), 1000, 'disconnect').then(
        () => true,
        () => false,
      );
      if (ok) return;
    }
    await this.client.endAsync(true).catch(() => undefined);
  }
}
