// The one place edgelora talks to mqtt.js: connection options (credentials, TLS, protocol version
// with fallback from MQTT 5 to 3.1.1), publishing with MQTT 5 properties only when the session is
// v5, byte accounting, and an inbound hook tests use to drop, duplicate or reorder messages.
import { promises as fs } from 'node:fs';
import mqtt, { type IClientOptions, type IClientPublishOptions, type MqttClient } from 'mqtt';
import { EdgeloraError } from '../util/errors.js';

/** How to reach the broker; every field but `url` is optional and passed through to mqtt.js. */
export interface BrokerOptions {
  /** mqtt://host:port, mqtts://host:port (TLS), ws:// or wss://. */
  url: string;
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

export class Link {
  /** Payload bytes published (all topics) and by kind, for egress accounting. */
  bytesOut = 0;
  messagesOut = 0;
  private readonly handlers: MessageHandler[] = [];
  /** The work the last delivered message started; mqtt.js reads the next packet only after it. */
  private work: Promise<unknown> = Promise.resolve();
  private constructor(
    readonly client: MqttClient,
    readonly clientId: string,
    readonly url: string,
    private readonly inbound: InboundHook | undefined,
  ) {
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
    const options: IClientOptions = {
      clientId: opts.clientId,
      clean: opts.clean ?? true,
      protocolVersion: version,
      reconnectPeriod: broker.reconnectMs ?? 1000,
      connectTimeout: 10_000,
      keepalive: opts.keepaliveSec ?? 30,
      resubscribe: true,
      ...(broker.username !== undefined ? { username: broker.username } : {}),
      ...(broker.password !== undefined ? { password: broker.password } : {}),
      ...(ca ? { ca } : {}),
      ...(cert ? { cert } : {}),
      ...(key ? { key } : {}),
      ...(broker.insecure ? { rejectUnauthorized: false } : {}),
      // MQTT 5: at most this many QoS 1 messages in flight to us, which bounds what the broker
      // buffers per client (a chunk is up to 256 KiB) while we apply backpressure.
      ...(version === 5 ? { properties: { receiveMaximum: opts.receiveMaximum ?? 16 } } : {}),
      ...(opts.will ? { will: { topic: opts.will.topic, payload: opts.will.payload, qos: 1 as const, retain: opts.will.retain } } : {}),
    };
    let client: MqttClient;
    try {
      client = mqtt.connect(broker.url, options);
    } catch (err) {
      throw new EdgeloraError(`cannot connect: ${(err as Error).message}`, { where: broker.url, hint: 'use mqtt://host:port or mqtts://host:port' });
    }
    // A 3.1.1-only broker (aedes, old Mosquitto) answers a v5 CONNECT with "unacceptable protocol
    // version" (return code 1): retry with 3.1.1 unless v5 was asked for explicitly.
    client.on('error', (err: Error & { code?: number }) => {
      if (err.code === 1 && client.options.protocolVersion === 5 && broker.protocolVersion === undefined) {
        client.options.protocolVersion = 4;
        if (client.options.properties) delete client.options.properties;
        // mqtt.js ends the client after a refused CONNACK; start it again with 3.1.1.
        client.once('close', () => setImmediate(() => client.reconnect()));
      }
    });
    return new Link(client, opts.clientId, broker.url, opts.inbound);
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

  /** Resolves once connected (now or later); rejects after `timeoutMs`. */
  waitConnected(timeoutMs = 10_000): Promise<void> {
    if (this.client.connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.client.off('connect', ok);
        reject(new EdgeloraError(`no connection to the broker after ${timeoutMs} ms`, { where: this.url, hint: 'check --broker, credentials and that the broker runs' }));
      }, timeoutMs);
      const ok = () => {
        clearTimeout(t);
        resolve();
      };
      this.client.once('connect', ok);
    });
  }

  async subscribe(topicList: string[], qos: 0 | 1 = 1): Promise<void> {
    const map: Record<string, { qos: 0 | 1 }> = {};
    for (const t of topicList) map[t] = { qos };
    const grants = await this.client.subscribeAsync(map);
    for (const g of grants) {
      if (g.qos === 128) throw new EdgeloraError('subscription refused by the broker', { where: g.topic, hint: 'check the broker ACL for this user' });
    }
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

  async close(): Promise<void> {
    await this.client.endAsync(true).catch(() => undefined);
  }
}
