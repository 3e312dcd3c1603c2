// The hub's wiring: the store (locked, one hub per store), signed manifests per target, the
// broadcaster (chunk passes and repairs: broadcaster.ts), uploads (uploads.ts), operator requests
// and signed commands to devices, the hub's retained status, and one handler table for every
// inbound message kind. One hub per fleet namespace.
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { EdgeloraError } from '../../util/errors.js';
import { withTimeout } from '../../util/timeout.js';
import {
  CommandRequestSchema,
  DEFAULT_CHUNK_SIZE,
  decodeJson,
  encodeJson,
  CHUNK_HEADER_BYTES,
  MAX_JSON_BYTES,
  ManifestSchema,
  PACK_FORMAT,
  PROTOCOL_VERSION,
  ENC_ALG_V1,
  PublishRequestSchema,
  ReplyToSchema,
  HubStatusSchema,
  type HubStatus,
  ResultSchema,
  StatusSchema,
  type CommandAction,
  type CommandBody,
  type Manifest,
  type ManifestBody,
  type Reply,
  type Result,
  type Status,
  type UploadAck,
} from '../protocol/messages.js';
import { Link, type BrokerOptions } from '../transport/mqtt.js';
import { packAdapterDir } from '../transfer/pack.js';
import { signMessage, type SigningKey } from '../protocol/signing.js';
import { dispatch, Refusals, type Handlers } from '../protocol/inbound.js';
import { HubStore, type BlobEntry } from './store.js';
import { readEnrolments, recipientsFor } from './enrolment.js';
import { sealBlob, type EncKey } from '../protocol/envelope.js';
import { Uploads } from './uploads.js';
import { Broadcaster } from './broadcaster.js';
import { checkName, targetKey, topics, type Target } from '../protocol/topics.js';

export interface HubOptions {
  broker: BrokerOptions;
  /** Store directory (created when missing). */
  storeDir: string;
  key: SigningKey;
  /** MQTT client id; default "edgelora-hub". With the shipped ACL the hub's user name is "hub". */
  clientId?: string;
  /** Chunk payload size in bytes for new publications; default 256 KiB. */
  chunkSize?: number;
  /** Milliseconds to gather missing-chunk requests for one blob before resending their union; default 250. */
  coalesceMs?: number;
  /**
   * A repaired chunk is broadcast to the target when more than this share of the target's online
   * devices asked for it, else sent to each asking device's own topic; default 0.5 (the break-even
   * of broker traffic, see planRepair). 0 broadcasts every repair (protocol 1's first hubs did).
   */
  repairBroadcastShare?: number;
  /**
   * Milliseconds after a pass ended during which a request without `pass` (sent after a silence)
   * is left to the pass's end marker, which a slow device has not seen yet; default 2000.
   */
  passGraceMs?: number;
  /** Chunk publishes awaiting the broker's PUBACK at once; default 16. */
  window?: number;
  /** Largest upload accepted, bytes; default 1 GiB. */
  maxUploadBytes?: number;
  /** Broker packet limit to respect when the broker does not announce one (MQTT 3.1.1); default 1 MB (EMQX's default). */
  maxPacketBytes?: number;
  /** Cap on chunk bytes per second across all broadcasts (spares slow links); default unlimited. */
  rateBytesPerSec?: number;
  /** MQTT 5 expiry of chunk messages, seconds; default 600. */
  chunkExpirySec?: number;
  /**
   * The hub's X25519 key (`edgelora keygen` writes <prefix>.x25519.key): devices seal their uploads
   * to it. Absent: the hub cannot open sealed uploads (it refuses them with a reason).
   */
  encKey?: EncKey;
  /**
   * Lets a publication go out in clear (signed only) when its target has no enrolled recipient,
   * or has devices the hub knows of whose key is not enrolled (a fleet migrating to keys); default
   * false: a target with no enrolled device fails, naming what to do; other devices are left out.
   * (Unsealed uploads are taken either way: `edgelora publish` uploads in clear in this version.)
   */
  allowPlaintext?: boolean;
  /** Clock, injected for tests. */
  now?: () => Date;
  log?: (line: string) => void;
}

export interface HubStats {
  /** Payload bytes the hub published, all topics. */
  bytesOut: number;
  /** Chunk payload bytes (frames incl. header) the hub published. */
  chunkBytesOut: number;
  chunksSent: number;
  /** Chunk frames sent in answer to missing requests. */
  chunksResent: number;
  /** Chunk frames sent to one device's own chunk topic (repairs that only it needed). */
  chunksUnicast: number;
  /** Inbound messages refused (see the 'refused' event). */
  refused: number;
  missingRequests: number;
  /** Missing requests that arrived while a pass was going out (answered by that pass and its end marker). */
  missingDeferred: number;
}

/** What a Hub emits, with the listener arguments. */
export interface HubEvents {
  /** A device's retained status arrived (also its last will). */
  status: [status: Status];
  /** A device answered a command. */
  result: [result: Result];
  /** An upload was verified and stored; `clientId` sent it. */
  upload: [entry: BlobEntry, clientId: string];
  /** A pass (first broadcast or repair) of a blob has gone out. */
  sent: [manifest: Manifest];
  /** An inbound message was refused. */
  refused: [reason: string, topic: string];
}

export class Hub extends EventEmitter<HubEvents> {
  readonly stats: HubStats = { bytesOut: 0, chunkBytesOut: 0, chunksSent: 0, chunksResent: 0, chunksUnicast: 0, refused: 0, missingRequests: 0, missingDeferred: 0 };
  /** The last status each device reported (retained on the broker). */
  readonly devices = new Map<string, Status>();
  private link: Link | null = null;
  private store: HubStore | null = null;
  /** Chunk passes and repairs of every current publication. */
  private readonly broadcaster: Broadcaster;
  private uploads: Uploads | null = null;
  /** Waiting command callers; called with null when the hub stops. */
  private readonly pendingCommands = new Map<string, (r: Result | null) => void>();
  private publishing: Promise<unknown> = Promise.resolve();
  private brokerMaxPacket: number | undefined;
  private readonly now: () => Date;
  private readonly chunkSize: number;
  private cmdCounter = 0;
  /** The stored plaintext blob each manifest of this run publishes (a sealed one's blob.sha256 is its ciphertext's). */
  private readonly contentOf = new WeakMap<Manifest, string>();
  private lastHubStatus: HubStatus | null = null;

  constructor(readonly opts: HubOptions) {
    super();
    this.now = opts.now ?? (() => new Date());
    this.chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    this.broadcaster = new Broadcaster({
      link: () => this.link,
      stats: this.stats,
      opts,
      devices: this.devices,
      current: (key) => this.hubStore.target(key),
      readBlob: (sha) => this.hubStore.readBlob(sha),
      refuse: (reason, topic) => this.refuse(reason, topic),
      log: (line) => this.log(line),
      sent: (m) => this.emit('sent', m),
    });
  }

  private log(line: string): void {
    this.opts.log?.(line);
  }

  /** Why inbound messages were refused: counted, logged, reported in hub/status, and a 'refused' event. */
  readonly refusals = new Refusals(
    () => this.now(),
    (r) => {
      this.stats.refused++;
      this.log(`hub: ${r.topic}: ${r.reason}`);
      this.emit('refused', r.reason, r.topic);
      this.statusSoon();
    },
  );
  private statusTimer: NodeJS.Timeout | null = null;

  private refuse(reason: string, topic: string): void {
    this.refusals.refuse(reason, topic);
  }

  /** Republishes hub/status (with the refusal count) at most every 5 s. */
  private statusSoon(): void {
    this.statusTimer ??= setTimeout(() => {
      this.statusTimer = null;
      this.link?.publish(topics.hubStatus, this.hubStatus(true), { retain: true, contentType: 'application/json' }).catch(() => undefined);
    }, 5000);
  }

  get keyId(): string {
    return this.opts.key.keyId;
  }
  get clientId(): string {
    return this.opts.clientId ?? 'edgelora-hub';
  }
  get hubStore(): HubStore {
    if (!this.store) throw new EdgeloraError('hub not started');
    return this.store;
  }

  /** This run's random id: carried in hub/status so one hub's offline will never passes for another's. */
  readonly instance = randomBytes(6).toString('hex');

  private hubStatus(online: boolean): Buffer {
    const r = this.refusals;
    return encodeJson({ type: 'hub-status', v: PROTOCOL_VERSION, online, keyId: this.keyId, instance: this.instance, refused: r.count, lastRefusal: r.last, updatedAt: this.now().toISOString() });
  }

  async start(): Promise<void> {
    this.store = await HubStore.open(this.opts.storeDir, { lock: true });
    this.uploads = new Uploads({
      store: this.store,
      maxUploadBytes: this.opts.maxUploadBytes ?? 2 ** 30,
      ack: (clientId, ack) => this.ack(clientId, ack),
      refuse: (reason, topic) => this.refuse(reason, topic),
      stored: (entry, clientId) => this.emit('upload', entry, clientId),
      log: (line) => this.log(line),
      now: () => this.now(),
      ...(this.opts.encKey ? { encKey: this.opts.encKey } : {}),
    });
    try {
      // The will is fixed at CONNECT, so its updatedAt says when this hub connected.
      this.link = await Link.open(this.opts.broker, { clientId: this.clientId, will: { topic: topics.hubStatus, payload: this.hubStatus(false), retain: true } });
      const link = this.link;
      link.onMessage((t, p) => this.onMessage(t, p));
      link.client.on('connect', (connack) => {
        this.brokerMaxPacket = connack.properties?.maximumPacketSize;
        this.broadcaster.onReconnect();
        this.log(`hub: connected to ${link.currentUrl}`);
        void this.onConnect();
      });
      link.client.on('disconnect', (packet) => {
        // MQTT 5 reason 0x8E: another client connected with our client id.
        if (packet.reasonCode === 0x8e) this.log(`hub: the broker closed this connection because another client connected with client id "${this.clientId}": is a second hub running? Give each hub its own --client-id (and --store)`);
      });
      await link.waitConnected();
      await link.subscribe([topics.allMissing, topics.allResults, topics.allUploads, topics.publishRequest, topics.commandRequest, topics.allManifests, topics.hubStatus]);
      // Statuses are state, not events, and arrive as one retained message per device at every
      // subscribe: at QoS 1 a broker's per-client queue (Mosquitto's max_queued_messages, 1000 by
      // default) would drop all past the first thousand devices. QoS 0 goes straight to the socket;
      // what a lost connection drops comes back as retained copies on the resubscribe.
      await link.subscribe([topics.allStatus], 0);
    } catch (err) {
      await this.link?.close();
      this.link = null;
      await this.store.close();
      this.store = null;
      throw err;
    }
  }

  private async onConnect(): Promise<void> {
    const link = this.link;
    if (!link) return;
    try {
      await link.publish(topics.hubStatus, this.hubStatus(true), { retain: true, contentType: 'application/json' });
      // The broker may have lost its retained messages (restart without persistence): publish every
      // current manifest again. Devices that already hold it ignore it.
      for (const m of this.hubStore.targets()) await this.publishManifest(m);
      this.broadcaster.pumpAll();
    } catch (err) {
      this.log(`hub: republish after connect failed: ${(err as Error).message}`);
    }
  }

  /** Another hub's status arrived on hub/status: keep ours there while we run, and say so. */
  private onHubStatus(payload: Buffer): void {
    if (payload.length === 0 || !this.link) return;
    const d = decodeJson(HubStatusSchema, payload);
    if (!d.ok) return this.refuse(`hub status refused: ${d.reason}`, topics.hubStatus);
    const st = d.value;
    this.lastHubStatus = st;
    if (st.instance === this.instance) return;
    if (st.online) this.log(`hub: another hub (instance ${st.instance ?? '?'}, key ${st.keyId ?? '?'}) says it is online on this broker; two hubs on one namespace hand out clashing seq numbers: stop one`);
    // A stopped or dead hub's offline status (its will, or an older hub's clean stop) must not
    // hide that this one still runs.
    else void this.link.publish(topics.hubStatus, this.hubStatus(true), { retain: true, contentType: 'application/json' }).catch(() => undefined);
  }

  /**
   * Stops: uploads are saved, and the retained status says offline unless another hub's status
   * has replaced ours. Bounded: with the broker gone it gives up on the goodbye after `graceMs`.
   */
  async stop(graceMs = 2000): Promise<void> {
    if (this.statusTimer) clearTimeout(this.statusTimer);
    this.broadcaster.stop();
    await this.uploads?.close();
    this.uploads = null;
    for (const w of this.pendingCommands.values()) w(null);
    this.pendingCommands.clear();
    const link = this.link;
    this.link = null;
    if (link) {
      const mine = this.lastHubStatus === null || this.lastHubStatus.instance === this.instance;
      if (link.connected && mine) await withTimeout(link.publish(topics.hubStatus, this.hubStatus(false), { retain: true, contentType: 'application/json' }), graceMs, 'offline status').catch(() => undefined);
      await link.close();
    }
    await this.store?.close();
  }

  private get mqtt(): Link {
    if (!this.link) throw new EdgeloraError('hub not started');
    return this.link;
  }

  private async publishJson(topic: string, msg: unknown, retain = false): Promise<void> {
    const buf = encodeJson(msg);
    this.stats.bytesOut += buf.length;
    await this.mqtt.publish(topic, buf, { retain, contentType: 'application/json' });
  }

  private async publishManifest(m: Manifest): Promise<void> {
    await this.publishJson(topics.manifest(m.target), m, true);
  }

  // ---- publishing ----

  /** Packs an adapter directory, stores it, and publishes it to `target`. */
  async publishDir(dir: string, target: Target, name?: string): Promise<Manifest> {
    const blob = await packAdapterDir(dir);
    const entry = await this.hubStore.putBlob(blob, { name: checkName('adapter name', name ?? sanitizeName(path.basename(path.resolve(dir)))), source: 'publish', now: this.now() });
    return this.publish(entry.sha256, target, name);
  }

  /** Signs a manifest for stored blob `sha` (full or unique prefix) and distributes it to `target`. */
  publish(sha: string, target: Target, name?: string): Promise<Manifest> {
    const p = this.publishing.then(() => this.doPublish(sha, target, name));
    this.publishing = p.catch(() => undefined);
    return p;
  }

  private maxChunkForBroker(): number {
    const limit = this.brokerMaxPacket ?? this.opts.maxPacketBytes ?? 1_000_000;
    return limit - CHUNK_HEADER_BYTES - 512; // fixed header, topic and properties fit in 512 bytes
  }

  private async doPublish(shaOrPrefix: string, target: Target, name?: string): Promise<Manifest> {
    const store = this.hubStore;
    const entry: BlobEntry | undefined = store.getEntry(shaOrPrefix) ?? store.findBlob(shaOrPrefix);
    if (!entry) throw new EdgeloraError(`no stored adapter ${shaOrPrefix}`, { where: this.opts.storeDir, hint: 'publish an adapter directory, or use the sha256 an upload reported' });
    const chunkSize = this.chunkSize;
    if (chunkSize > this.maxChunkForBroker()) {
      throw new EdgeloraError(`chunk size ${chunkSize} does not fit the broker's packet limit`, { where: 'chunkSize', hint: `use at most ${this.maxChunkForBroker()} bytes` });
    }
    const plain = await store.readBlob(entry.sha256);
    const sealed = await this.sealFor(target, plain, chunkSize);
    const blob = sealed ? sealed.data : plain;
    const size = sealed ? sealed.data.length : plain.length;
    const wireChunk = sealed ? sealed.chunkSize : chunkSize;
    if (wireChunk > this.maxChunkForBroker()) {
      throw new EdgeloraError(`sealed chunk size ${wireChunk} (${chunkSize} + 16-byte tag) does not fit the broker's packet limit`, { where: 'chunkSize', hint: `use at most ${this.maxChunkForBroker() - 16} bytes` });
    }
    const chunks = Math.ceil(size / wireChunk);
    const chunkSha256: string[] = [];
    for (let i = 0; i < chunks; i++) chunkSha256.push(createHash('sha256').update(blob.subarray(i * wireChunk, Math.min(size, (i + 1) * wireChunk))).digest('hex'));
    const blobSha = sealed ? createHash('sha256').update(blob).digest('hex') : entry.sha256;
    const id = checkName('adapter name', name ?? entry.name);
    const body: ManifestBody = {
      type: 'manifest',
      v: PROTOCOL_VERSION,
      seq: store.nextSeq(),
      target,
      adapter: { id, version: store.versionFor(id, entry.sha256) },
      blob: { format: PACK_FORMAT, sha256: blobSha, size, chunkSize: wireChunk, chunks, chunkSha256 },
      baseFingerprint: entry.info.baseFingerprint,
      ...(entry.info.baseSourceFingerprint ? { baseSourceFingerprint: entry.info.baseSourceFingerprint } : {}),
      lora: { rank: entry.info.rank, alpha: entry.info.alpha, targets: entry.info.targets },
      createdAt: this.now().toISOString(),
      keyId: this.keyId,
      ...(sealed
        ? {
            enc: {
              alg: ENC_ALG_V1,
              noncePrefix: sealed.noncePrefix.toString('base64'),
              recipients: sealed.recipients.map((r) => ({ keyId: r.keyId, epk: r.epk.toString('base64'), wrapped: r.wrapped.toString('base64') })),
            },
          }
        : {}),
    };
    const manifest = ManifestSchema.parse(signMessage(body, this.opts.key));
    if (encodeJson(manifest).length > MAX_JSON_BYTES) {
      throw new EdgeloraError(`manifest of ${chunks} chunks${sealed ? ` and ${sealed.recipients.length} recipients` : ''} exceeds ${MAX_JSON_BYTES} bytes`, { where: 'chunkSize', hint: 'use a larger chunk size, or publish to groups instead of one large fleet' });
    }
    if (sealed) await store.putSealed(blob);
    this.contentOf.set(manifest, entry.sha256);
    const key = targetKey(target);
    await store.setTarget(key, manifest, entry.sha256);
    await this.publishManifest(manifest);
    this.log(`hub: published ${id} v${manifest.adapter.version} (seq ${manifest.seq}, ${size} bytes, ${chunks} chunks${sealed ? `, sealed for ${sealed.recipients.length} recipient(s)` : ', in clear'}) to ${key}`);
    this.broadcaster.broadcast(manifest, blob);
    return manifest;
  }

  /**
   * Seals a publication for the target's enrolled devices, or returns null to send it in clear
   * (only with allowPlaintext). Enrolment is re-read every time: `fleet enroll` needs no restart.
   */
  private async sealFor(target: Target, plain: Buffer, plainChunk: number) {
    const enrolled = await readEnrolments(this.opts.storeDir);
    const recips = recipientsFor(enrolled, target);
    const key = targetKey(target);
    // Devices the hub has heard from in this target that would not be able to read a sealed blob.
    const inTarget = [...this.devices.values()].filter((d) => (target.kind === 'fleet' ? d.fleet === target.name : target.kind === 'group' ? d.group === target.name : d.deviceId === target.name));
    const left = inTarget.filter((d) => !recips.some((r) => r.deviceId === d.deviceId && r.key.keyId === d.encKey?.keyId)).map((d) => d.deviceId);
    if (recips.length === 0 || (this.opts.allowPlaintext && left.length > 0)) {
      if (!this.opts.allowPlaintext) {
        throw new EdgeloraError(`no enrolled device in ${key}: the adapter would go out in clear`, {
          where: key,
          hint: `enrol its devices (\`edgelora fleet enroll <device-id> --store ${this.opts.storeDir}\`), or start the hub with --allow-plaintext during a migration`,
        });
      }
      this.log(`hub: ${key}: publishing in clear (--allow-plaintext): ${recips.length === 0 ? 'no enrolled device' : `not enrolled or key changed: ${left.slice(0, 10).join(', ')}${left.length > 10 ? ', …' : ''}`}`);
      return null;
    }
    if (left.length > 0) this.log(`hub: ${key}: sealed for ${recips.length} enrolled device(s); left out (not enrolled, or announcing another key): ${left.slice(0, 10).join(', ')}`);
    return sealBlob(plain, plainChunk, recips.map((r) => Buffer.from(r.key.pub, 'base64')));
  }

  // ---- commands ----

  /** Sends a signed command to one device; resolves with its result, or rejects after `timeoutMs`. */
  command(deviceId: string, action: CommandAction, adapter?: { id: string; version?: number }, timeoutMs = 30_000): Promise<Result> {
    const id = `c${this.now().getTime().toString(36)}-${(++this.cmdCounter).toString(36)}`;
    const enc = this.opts.encKey;
    const body: CommandBody = {
      type: 'command',
      v: PROTOCOL_VERSION,
      id,
      deviceId: checkName('device id', deviceId),
      action,
      ...(adapter ? { adapter } : {}),
      issuedAt: this.now().toISOString(),
      keyId: this.keyId,
      ...(action === 'upload' && enc ? { hubEncKey: { alg: 'x25519' as const, keyId: enc.keyId, pub: enc.raw.toString('base64') } } : {}),
    };
    return new Promise<Result>((resolve, reject) => {
      const t = setTimeout(() => {
        this.pendingCommands.delete(id);
        reject(new EdgeloraError(`device ${deviceId} did not answer command ${id} (${action}) within ${timeoutMs} ms`, { where: topics.command(deviceId), hint: 'is the device online? see `edgelora fleet status`' }));
      }, timeoutMs);
      this.pendingCommands.set(id, (r) => {
        clearTimeout(t);
        if (r) resolve(r);
        else reject(new EdgeloraError(`hub stopped before device ${deviceId} answered command ${id}`, { where: topics.command(deviceId) }));
      });
      this.publishJson(topics.command(deviceId), signMessage(body, this.opts.key)).catch((err: unknown) => {
        clearTimeout(t);
        this.pendingCommands.delete(id);
        reject(err);
      });
    });
  }

  // ---- inbound ----

  /** The hub's handler table: one handler per inbound message kind. */
  private readonly handlers: Handlers<void> = {
    missing: (t, p) => this.broadcaster.onMissing(t.deviceId, p),
    status: (t, p, topic) => {
      if (p.length === 0) return; // a cleared retained status
      const d = decodeJson(StatusSchema, p);
      if (!d.ok) return this.refuse(`status refused: ${d.reason}`, topic);
      if (d.value.deviceId !== t.deviceId) return this.refuse(`status refused: it names device ${d.value.deviceId}, the topic ${t.deviceId}`, topic);
      this.devices.set(t.deviceId, d.value);
      this.emit('status', d.value);
    },
    result: (t, p, topic) => {
      const d = decodeJson(ResultSchema, p);
      if (!d.ok) return this.refuse(`result refused: ${d.reason}`, topic);
      if (d.value.deviceId !== t.deviceId) return this.refuse(`result refused: it names device ${d.value.deviceId}, the topic ${t.deviceId}`, topic);
      this.pendingCommands.get(d.value.commandId)?.(d.value);
      this.pendingCommands.delete(d.value.commandId);
      this.emit('result', d.value);
    },
    upload: (t, p) => {
      void this.uploads?.onMessage(t.clientId, t.stage, p).catch((err: unknown) => this.log(`hub: upload from ${t.clientId}: ${(err as Error).message}`));
    },
    publishRequest: (_t, p) => void this.onPublishRequest(p),
    commandRequest: (_t, p) => void this.onCommandRequest(p),
    manifest: (t, p) => this.onRetainedManifest(t.target, p),
    hubStatus: (_t, p) => this.onHubStatus(p),
  };

  private onMessage(topic: string, payload: Buffer): void {
    dispatch(this.handlers, topic, payload);
  }


  /** Restores this hub's manifest when something else replaced the retained one on the broker. */
  private onRetainedManifest(target: Target, payload: Buffer): void {
    const ours = this.store?.target(targetKey(target));
    if (!ours) return;
    if (payload.equals(encodeJson(ours))) return;
    this.log(`hub: retained manifest of ${targetKey(target)} was replaced by someone else; restoring it`);
    void this.publishManifest(ours).catch(() => undefined);
  }

  private async reply(clientId: string, msg: Omit<Reply, 'type' | 'v'>): Promise<void> {
    await this.publishJson(topics.reply(clientId), { type: 'reply', v: PROTOCOL_VERSION, ...msg });
  }

  /** Answers a request that failed its schema, when it at least says who asked. */
  private async refuseRequest(kind: string, payload: Buffer, reason: string): Promise<void> {
    this.log(`hub: ${kind} request rejected: ${reason}`);
    let raw: unknown;
    try {
      raw = JSON.parse(payload.toString('utf8'));
    } catch {
      return;
    }
    const who = ReplyToSchema.safeParse(raw);
    if (who.success) await this.reply(who.data.clientId, { requestId: who.data.requestId, ok: false, error: `${kind} request refused: ${reason}` }).catch(() => undefined);
  }

  private async onPublishRequest(payload: Buffer): Promise<void> {
    const d = decodeJson(PublishRequestSchema, payload);
    if (!d.ok) return this.refuseRequest('publish', payload, d.reason);
    const r = d.value;
    try {
      const m = await this.publish(r.sha256, r.target, r.name);
      await this.reply(r.clientId, { requestId: r.requestId, ok: true, manifest: { adapter: m.adapter, seq: m.seq, sha256: this.contentOf.get(m) ?? m.blob.sha256, target: m.target } });
    } catch (err) {
      await this.reply(r.clientId, { requestId: r.requestId, ok: false, error: (err as Error).message }).catch(() => undefined);
    }
  }

  private async onCommandRequest(payload: Buffer): Promise<void> {
    const d = decodeJson(CommandRequestSchema, payload);
    if (!d.ok) return this.refuseRequest('command', payload, d.reason);
    const r = d.value;
    try {
      const result = await this.command(r.deviceId, r.action, r.adapter);
      await this.reply(r.clientId, { requestId: r.requestId, ok: result.ok, ...(result.error ? { error: result.error } : {}), result });
    } catch (err) {
      await this.reply(r.clientId, { requestId: r.requestId, ok: false, error: (err as Error).message }).catch(() => undefined);
    }
  }

  // ---- uploads ----

  private async ack(clientId: string, ack: Omit<UploadAck, 'type' | 'v'>): Promise<void> {
    await this.publishJson(topics.uploadAck(clientId), { type: 'upload-ack', v: PROTOCOL_VERSION, ...ack });
  }
}

/** Turns a directory name into a valid adapter id. */
export function sanitizeName(s: string): string {
  const out = s.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 64);
  return out.length > 0 ? out : 'adapter';
}
