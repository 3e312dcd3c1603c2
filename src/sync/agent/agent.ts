// The device agent's wiring (state.json in state.ts, the part file in transfer/resumable-file.ts):
// follows the signed manifests of its fleet, group and device topics (newest seq
// wins), receives the blob's chunks into a persistent partial file (so a killed agent resumes),
// asks the hub for exactly the chunks it lacks, verifies every chunk, the whole blob, the signature
// and the base model, installs the adapter atomically as a PEFT directory, activates it through the
// injected AdapterActivator (rolling back when that fails), reports a retained status, and answers
// signed commands. State directory layout: see docs/protocol.md, "Agent state".
import { EventEmitter } from 'node:events';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { KeyObject } from 'node:crypto';
import { EdgeloraError } from '../../util/errors.js';
import { matchBase, type BaseMatch } from '../../model/base-identity.js';
import { writeDirAtomic } from '../../util/atomic.js';
import { withTimeout } from '../../util/timeout.js';
import { ValidatingActivator, type AdapterActivator } from './activator.js';
import {
  CommandSchema,
  decodeChunk,
  decodeJson,
  encodeJson,
  CHUNK_HEADER_BYTES,
  MAX_CHUNK_SIZE,
  MAX_JSON_BYTES,
  ManifestSchema,
  PASS_END_INDEX,
  PROTOCOL_VERSION,
  type AdapterRefMsg,
  type AgentState,
  type Command,
  type Manifest,
  type Result,
  type Status,
  UploadAckSchema,
} from '../protocol/messages.js';
import { Link, type BrokerOptions, type InboundHook } from '../transport/mqtt.js';
import { packAdapterDir, readPackInfo, sha256Hex, type PackEntry } from '../transfer/pack.js';
import { ResumableFile } from '../transfer/resumable-file.js';
import { AgentStore, type Installed, type State } from './state.js';

export type { Installed } from './state.js';
import { dispatch, Refusals, type Handlers } from '../protocol/inbound.js';
import { checkSignature } from '../protocol/signing.js';
import { checkName, targetKey, topics, type Target } from '../protocol/topics.js';
import { uploadBlob } from '../transfer/uploader.js';
import { loadOrCreateEncKey, unwrap, type EncKey } from '../protocol/envelope.js';
import { openSealedFile, plainReader } from '../transfer/sealed-file.js';

export interface AgentOptions {
  broker: BrokerOptions;
  deviceId: string;
  fleet: string;
  group?: string;
  /** State directory (created when missing): installed adapters, transfer state, state.json. */
  stateDir: string;
  /** The hub's Ed25519 public key: manifests and commands must verify against it. */
  trustedKey: KeyObject;
  /**
   * This device's base model fingerprint (manifest.json `fingerprint`); with `modelSourceFingerprint`, what
   * decides which publications it takes (matchBase: its source model at any quantization). null/absent: accept any.
   */
  modelFingerprint?: string | null;
  /** This device's source model fingerprint (manifest.json `sourceFingerprint`); null/absent: not recorded. */
  modelSourceFingerprint?: string | null;
  /** Loads adapters into the runtime; default ValidatingActivator (file checks only). */
  activator?: AdapterActivator;
  /** Sees every inbound message before the agent does (tests: loss, duplication, reordering). */
  inbound?: InboundHook;
  /** Milliseconds without a new chunk before asking the hub for the missing ones; default 2000. */
  quietMs?: number;
  /** Upper bound of the backoff between repeated missing requests, ms; default 30000. */
  maxRetryMs?: number;
  /** Least milliseconds between two progress status messages; default 1000. */
  statusIntervalMs?: number;
  /** Installed adapters kept on disk besides the active and previous one; default 3. */
  keepInstalled?: number;
  /** Upload segment size, bytes; default 256 KiB. */
  uploadSegmentSize?: number;
  /**
   * The hub's X25519 public key, for uploads not started by a signed command (which carries it).
   * Uploads are sealed to it; with no hub key known they are refused unless allowPlaintext.
   */
  hubEncKey?: { raw: Buffer; keyId: string };
  /** Lets an upload go in clear when no hub key is known; default false. */
  allowPlaintext?: boolean;
  now?: () => Date;
  log?: (line: string) => void;
}

interface Transfer {
  manifest: Manifest;
  /** The part file and the chunks it holds (state in transfer/current.json, key "manifest"). */
  file: ResumableFile<Manifest>;
  quietTimer: NodeJS.Timeout | null;
  retries: number;
  finishing: boolean;
  /** Highest pass-end marker seen for this blob (not persisted). */
  passSeen: number;
  /** Quiet timeouts put off in a row because the agent itself was busy. */
  deferrals: number;
}

const MAX_SMALL_JSON = 64 * 1024;

/** What an Agent emits, with the listener arguments. */
export interface AgentEvents {
  /** The agent's status changed (what it publishes, retained). */
  status: [status: Status];
  /** An inbound message was refused (also counted in counters.rejected and kept in lastError). */
  refused: [reason: string, topic: string];
  /** An adapter was activated. */
  activated: [installed: Installed];
  /** Activating an adapter failed; the agent rolled back. */
  'activation-failed': [installed: Installed, error: unknown];
}

export class Agent extends EventEmitter<AgentEvents> {
  private link: Link | null = null;
  private readonly store: AgentStore;
  private transfer: Transfer | null = null;
  private agentState: AgentState = 'idle';
  private lastError: { at: string; reason: string; topic?: string } | null = null;
  private serial: Promise<void> = Promise.resolve();
  /** Tasks in the serial queue (queued or running). */
  private queued = 0;
  private lastStatusAt = 0;
  private statusTimer: NodeJS.Timeout | null = null;
  private readonly recentCommands = new Map<string, Result>();
  /** Commands still running, by id: a repeat of one waits for the same result. */
  private readonly runningCommands = new Map<string, Promise<Result>>();
  private stopped = false;
  /** Aborted by stop(): uploads run beside the serial queue, so stop() ends them this way. */
  private readonly stopping = new AbortController();
  readonly activator: AdapterActivator;
  private readonly now: () => Date;
  readonly deviceId: string;
  private encKeyPair: EncKey | null = null;
  /** Counters for tests and benchmarks. */
  readonly counters = { reconnects: 0, chunksReceived: 0, chunksDuplicate: 0, chunksCorrupt: 0, missingRequests: 0, rejected: 0 };

  constructor(readonly opts: AgentOptions) {
    super();
    this.deviceId = checkName('device id', opts.deviceId);
    checkName('fleet name', opts.fleet);
    if (opts.group !== undefined) checkName('group name', opts.group);
    this.activator = opts.activator ?? new ValidatingActivator();
    this.now = opts.now ?? (() => new Date());
    this.store = new AgentStore(opts.stateDir, this.deviceId, (line) => this.log(line));
  }

  /** This device's side of the base check (matchBase); an agent without a model accepts any base. */
  private matchBase(adapter: { fingerprint: string | null; sourceFingerprint: string | null }, what: string): BaseMatch {
    return matchBase(adapter, { fingerprint: this.opts.modelFingerprint ?? null, sourceFingerprint: this.opts.modelSourceFingerprint ?? null, quant: "this device's quantization" }, what);
  }

  private log(line: string): void {
    this.opts.log?.(`[${this.deviceId}] ${line}`);
  }

  get targets(): Target[] {
    const t: Target[] = [{ kind: 'fleet', name: this.opts.fleet }];
    if (this.opts.group) t.push({ kind: 'group', name: this.opts.group });
    t.push({ kind: 'device', name: this.deviceId });
    return t;
  }

  private p(...parts: string[]): string {
    return path.join(this.opts.stateDir, ...parts);
  }

  // ---- lifecycle ----

  async start(): Promise<void> {
    await fs.mkdir(this.p('adapters'), { recursive: true });
    await fs.mkdir(this.p('transfer'), { recursive: true });
    await this.store.load();
    // The device's X25519 key: made at first start, kept (0600) in the state directory.
    const k = await loadOrCreateEncKey(this.p('device.x25519.key'));
    this.encKeyPair = k.key;
    this.log(`${k.created ? 'made' : 'loaded'} X25519 key ${k.key.keyId} (${this.p('device.x25519.key')}); the hub seals adapters to it once an operator enrolled it`);
    await this.activateAtBoot();
    await this.loadTransfer();
    const will = encodeJson({ type: 'status', v: PROTOCOL_VERSION, deviceId: this.deviceId, online: false, state: 'offline', encKey: this.encKeyAnnounce });
    this.link = await Link.open(this.opts.broker, {
      clientId: this.deviceId,
      will: { topic: topics.status(this.deviceId), payload: will, retain: true },
      ...(this.opts.inbound ? { inbound: this.opts.inbound } : {}),
    });
    this.link.onMessage((t, p) => this.onMessage(t, p));
    let connects = 0;
    const link = this.link;
    link.client.on('connect', () => {
      // Logged here, before the subscriptions deliver a retained manifest ("downloading …").
      this.log(`connected to ${link.currentUrl}; active: ${this.active ? `${this.active.id} v${this.active.version}` : 'none'}`);
      if (++connects > 1) this.counters.reconnects++;
      void this.publishStatus(true);
    });
    // After a reconnect (maybe to another node, or a restarted broker) the hub may have missed our
    // requests: ask again once we can receive the answer.
    link.onResubscribed(() => {
      if (this.transfer) this.armQuiet(this.transfer, this.quietMs);
    });
    const subs = this.targets.flatMap((t) => [topics.manifest(t), topics.chunk(t)]);
    subs.push(topics.command(this.deviceId), topics.uploadAck(this.deviceId));
    await this.link.waitConnected();
    await this.link.subscribe(subs);
    await this.publishStatus(true);
    if (this.transfer) this.armQuiet(this.transfer, this.quietMs);
  }

  /** Stops cleanly: transfer state is saved, the status says offline. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.stopping.abort();
    await this.serial.catch(() => undefined);
    if (this.statusTimer) clearTimeout(this.statusTimer);
    const t = this.transfer;
    if (t) {
      if (t.quietTimer) clearTimeout(t.quietTimer);
      await t.file.close();
      this.transfer = null;
    }
    const link = this.link;
    this.link = null;
    if (link) {
      if (link.connected) {
        const bye = link.publish(topics.status(this.deviceId), encodeJson({ type: 'status', v: PROTOCOL_VERSION, deviceId: this.deviceId, online: false, state: 'offline', encKey: this.encKeyAnnounce }), { retain: true });
        await withTimeout(bye, 2000, 'offline status').catch(() => undefined);
      }
      await link.close();
    }
  }

  /** The broker node this agent is connected (or connecting) to. */
  get brokerUrl(): string | null {
    return this.link?.currentUrl ?? null;
  }

  private get quietMs(): number {
    return this.opts.quietMs ?? 2000;
  }

  /** Runs `fn` after everything queued before it; state changes never interleave. */
  private enqueue<T>(fn: () => Promise<T>): Promise<T> {
    this.queued++;
    const p = this.serial.then(fn).finally(() => this.queued--);
    this.serial = p.then(
      () => undefined,
      (err: unknown) => this.log(`error: ${(err as Error).message}`),
    );
    return p;
  }

  // ---- persistent state (state.ts) ----

  private get state(): State {
    return this.store.state;
  }
  private saveState(): Promise<void> {
    return this.store.save();
  }
  private installed(sha: string | null): Installed | undefined {
    return this.store.installed(sha);
  }
  /** The active adapter's directory, or null. */
  get activeDir(): string | null {
    const a = this.active;
    return a ? this.store.adapterDir(a) : null;
  }
  get active(): Installed | null {
    return this.store.installed(this.state.active) ?? null;
  }
  get previous(): Installed | null {
    return this.store.installed(this.state.previous) ?? null;
  }
  get installedAdapters(): Installed[] {
    return [...this.state.installed];
  }
  adapterDir(i: Installed): string {
    return this.store.adapterDir(i);
  }

  private async activateAtBoot(): Promise<void> {
    for (const sha of [this.state.active, this.state.previous]) {
      const inst = this.installed(sha);
      if (!inst) continue;
      try {
        await this.activator.activate(this.adapterDir(inst), { adapterId: inst.id, version: inst.version, sha256: inst.sha256 });
        if (sha !== this.state.active) {
          this.setError(`active adapter failed to load at start; rolled back to ${inst.id} v${inst.version}`);
          this.state.previous = null;
          this.state.active = sha;
          await this.saveState();
        }
        return;
      } catch (err) {
        this.setError(`adapter ${inst.id} v${inst.version} failed to load at start: ${(err as Error).message}`);
      }
    }
    if (this.state.active !== null) {
      this.state.active = null;
      await this.activator.deactivate().catch(() => undefined);
      await this.saveState();
    }
  }

  /** This device's X25519 key (after start). */
  get encKey(): EncKey | null {
    return this.encKeyPair;
  }
  private get encKeyAnnounce(): Status['encKey'] {
    const k = this.encKeyPair;
    return k ? { alg: 'x25519', keyId: k.keyId, pub: k.raw.toString('base64') } : null;
  }

  /**
   * A sealed manifest's content key and plaintext sha256 for this device; a string says why this
   * device cannot open it. A manifest in clear: its blob is the content.
   */
  private openManifest(m: Manifest): { contentKey: Buffer; noncePrefix: Buffer; plainSha256: string } | string {
    if (!m.enc) return { contentKey: Buffer.alloc(0), noncePrefix: Buffer.alloc(0), plainSha256: m.blob.sha256 };
    const me = this.encKeyPair;
    if (!me) return 'this agent has no X25519 key yet';
    const r = m.enc.recipients.find((x) => x.keyId === me.keyId);
    if (!r) {
      return `adapter ${m.adapter.id} v${m.adapter.version} is sealed for ${m.enc.recipients.length} enrolled device(s) and this device's key ${me.keyId} is not one of them: enrol it on the hub (\`edgelora fleet enroll ${this.deviceId}\`), then publish again`;
    }
    const noncePrefix = Buffer.from(m.enc.noncePrefix, 'base64');
    try {
      const k = unwrap(me, { keyId: r.keyId, epk: Buffer.from(r.epk, 'base64'), wrapped: Buffer.from(r.wrapped, 'base64') }, noncePrefix);
      return { ...k, noncePrefix };
    } catch (err) {
      return `adapter ${m.adapter.id} v${m.adapter.version}: ${(err as Error).message}`;
    }
  }

  // ---- status ----

  status(): Status {
    const ref = (i: Installed | undefined): AdapterRefMsg | null => (i ? { id: i.id, version: i.version, sha256: i.sha256 } : null);
    const t = this.transfer;
    return {
      type: 'status',
      v: PROTOCOL_VERSION,
      deviceId: this.deviceId,
      online: !this.stopped,
      state: this.agentState,
      fleet: this.opts.fleet,
      ...(this.opts.group ? { group: this.opts.group } : {}),
      baseFingerprint: this.opts.modelFingerprint ?? null,
      active: ref(this.installed(this.state.active)),
      previous: ref(this.installed(this.state.previous)),
      transfer: t ? { adapter: t.manifest.adapter, sha256: t.manifest.blob.sha256, seq: t.manifest.seq, received: t.file.have.count(), total: t.manifest.blob.chunks } : null,
      lastError: this.lastError,
      encKey: this.encKeyAnnounce,
      updatedAt: this.now().toISOString(),
    };
  }

  private async publishStatus(force = false): Promise<void> {
    const link = this.link;
    if (!link || this.stopped) return;
    const wait = (this.opts.statusIntervalMs ?? 1000) - (Date.now() - this.lastStatusAt);
    if (!force && wait > 0) {
      this.statusTimer ??= setTimeout(() => {
        this.statusTimer = null;
        void this.publishStatus(true);
      }, wait);
      return;
    }
    if (this.statusTimer) {
      clearTimeout(this.statusTimer);
      this.statusTimer = null;
    }
    this.lastStatusAt = Date.now();
    const s = this.status();
    this.emit('status', s);
    if (!link.connected) return;
    await link.publish(topics.status(this.deviceId), encodeJson(s), { retain: true, contentType: 'application/json' }).catch(() => undefined);
  }

  private setState(s: AgentState): void {
    this.agentState = s;
    void this.publishStatus(true);
  }

  private setError(reason: string, topic?: string): void {
    this.lastError = { at: this.now().toISOString(), reason, ...(topic ? { topic } : {}) };
    this.log(`${topic ? `${topic}: ` : ''}${reason}`);
  }

  /** Why inbound messages were refused: counted, in lastError and the status, and a 'refused' event. */
  readonly refusals = new Refusals(
    () => this.now(),
    (r) => {
      this.counters.rejected++;
      this.setError(r.reason, r.topic);
      this.emit('refused', r.reason, r.topic);
      void this.publishStatus(true);
    },
  );

  private refuse(reason: string, topic: string): void {
    this.refusals.refuse(reason, topic);
  }

  // ---- inbound ----

  /**
   * The agent's handler table: one handler per inbound message kind. A returned promise settles
   * when the message's work is done, and holds back the next message (backpressure).
   */
  private readonly handlers: Handlers<Promise<unknown> | void> = {
    manifest: (t, payload, topic) => {
      // An empty retained message clears the manifest; it is not an instruction.
      if (payload.length === 0) return;
      const d = decodeJson(ManifestSchema, payload, MAX_JSON_BYTES);
      if (!d.ok) return this.refuse(`manifest refused: ${d.reason}`, topic);
      return this.enqueue(() => this.onManifest(t.target, d.value, topic));
    },
    chunk: (_t, payload, topic) => {
      if (payload.length > MAX_CHUNK_SIZE + CHUNK_HEADER_BYTES) return this.refuse(`chunk refused: oversize message: ${payload.length} bytes`, topic);
      const d = decodeChunk(payload);
      if (!d.ok) return this.refuse(`chunk refused: ${d.reason}`, topic);
      const frame = d.value;
      return this.enqueue(() => this.onChunk(frame.sha256, frame.index, frame.count, frame.data, topic));
    },
    command: (_t, payload, topic) => {
      const d = decodeJson(CommandSchema, payload, MAX_SMALL_JSON);
      if (!d.ok) return this.refuse(`command refused: ${d.reason}`, topic);
      const sig = checkSignature(d.value, this.opts.trustedKey);
      if (sig) return this.refuse(`command refused: ${sig}`, topic);
      if (d.value.deviceId !== this.deviceId) return this.refuse(`command refused: addressed to ${d.value.deviceId}`, topic);
      // Not awaited: an upload command waits for acks that arrive through this same client.
      void this.onCommand(d.value);
    },
    uploadAck: (_t, payload, topic) => {
      // Valid acks are the uploader's business (it has its own handler); invalid ones are reported.
      const d = decodeJson(UploadAckSchema, payload, MAX_SMALL_JSON);
      if (!d.ok) return this.refuse(`upload ack refused: ${d.reason}`, topic);
    },
  };

  private onMessage(topic: string, payload: Buffer): Promise<unknown> | void {
    if (this.stopped) return;
    return dispatch(this.handlers, topic, payload);
  }


  private async onManifest(topicTarget: Target, m: Manifest, topic: string): Promise<void> {
    const sig = checkSignature(m, this.opts.trustedKey);
    if (sig) return this.refuse(`manifest refused: ${sig}`, topic);
    if (targetKey(m.target) !== targetKey(topicTarget)) return this.refuse(`manifest refused: it is for ${targetKey(m.target)}, not ${targetKey(topicTarget)}`, topic);
    if (m.seq <= this.state.appliedSeq) return; // already acted on (normal after every reconnect)
    const cur = this.transfer;
    if (cur && m.seq <= cur.manifest.seq) {
      // The same manifest again (e.g. republished after a broker restart): ask for what is missing soon.
      if (m.seq === cur.manifest.seq) {
        cur.retries = 0;
        this.armQuiet(cur, this.quietMs);
      }
      return;
    }
    const mine = this.opts.modelFingerprint;
    if (mine && m.baseFingerprint === null && m.baseSourceFingerprint === undefined) {
      // A device that knows its model takes only publications that say which model they are for.
      return this.refuse(`manifest refused: adapter ${m.adapter.id} v${m.adapter.version} is for base model (unspecified), this device runs ${mine}`, topic);
    }
    const base = this.matchBase({ fingerprint: m.baseFingerprint, sourceFingerprint: m.baseSourceFingerprint ?? null }, `adapter ${m.adapter.id} v${m.adapter.version}`);
    if (base.kind === 'refused') {
      return this.refuse(`manifest refused: adapter ${m.adapter.id} v${m.adapter.version} is for base model ${m.baseFingerprint ?? '(unspecified)'}, this device runs ${mine}: ${base.reason} (${base.hint})`, topic);
    }
    if (base.kind === 'other-quantization') this.log(`note: ${base.note}`);
    const opened = this.openManifest(m);
    if (typeof opened === 'string') return this.refuse(`manifest refused: ${opened}`, topic);
    if (cur) await this.dropTransfer();
    const already = this.installed(opened.plainSha256);
    if (already) {
      // Same bytes as an adapter we hold: no download needed. The newest manifest names it: a blob
      // re-published under another id (or version) is reported, and found by commands, under that.
      this.state.appliedSeq = m.seq;
      if (already.id !== m.adapter.id || already.version !== m.adapter.version) {
        this.log(`${already.id} v${already.version} is now named ${m.adapter.id} v${m.adapter.version} (manifest seq ${m.seq}, same sha256)`);
        already.id = m.adapter.id;
        already.version = m.adapter.version;
      }
      already.seq = m.seq;
      if (this.state.active !== already.sha256) await this.activateInstalled(already, `manifest seq ${m.seq}`);
      else await this.saveState();
      this.setState('idle');
      return;
    }
    await this.beginTransfer(m);
  }

  private transferFiles(m: Manifest) {
    return {
      partFile: this.p('transfer', `${m.blob.sha256}.part`),
      stateFile: this.p('transfer', 'current.json'),
      metaKey: 'manifest',
      onPersistError: (err: unknown) => this.log(`saving transfer state: ${(err as Error).message}`),
    };
  }

  private async beginTransfer(m: Manifest): Promise<void> {
    await this.cleanTransferDir();
    const file = await ResumableFile.create<Manifest>({ ...this.transferFiles(m), meta: m, geometry: { size: m.blob.size, pieceSize: m.blob.chunkSize } });
    const t: Transfer = { manifest: m, file, quietTimer: null, retries: 0, finishing: false, passSeen: 0, deferrals: 0 };
    this.transfer = t;
    this.log(`downloading ${m.adapter.id} v${m.adapter.version} (${m.blob.size} bytes, ${m.blob.chunks} chunks) for ${targetKey(m.target)}`);
    this.setState('downloading');
    this.armQuiet(t, this.quietMs);
  }

  /** Resumes a transfer saved by an earlier run, re-checking every chunk it claims to hold. */
  private async loadTransfer(): Promise<void> {
    const stateFile = this.p('transfer', 'current.json');
    const raw = await fs.readFile(stateFile, 'utf8').catch(() => null);
    if (raw === null) return;
    // The part file is named by the blob, so peek at the saved manifest to find it.
    let partFile: string | null = null;
    try {
      const sha = (JSON.parse(raw) as { manifest?: { blob?: { sha256?: unknown } } }).manifest?.blob?.sha256;
      if (typeof sha === 'string' && /^[0-9a-f]{64}$/.test(sha)) partFile = this.p('transfer', `${sha}.part`);
    } catch {
      partFile = null;
    }
    const r = partFile
      ? await ResumableFile.resume<Manifest>({
          partFile,
          stateFile,
          metaKey: 'manifest',
          onPersistError: (err: unknown) => this.log(`saving transfer state: ${(err as Error).message}`),
          parseMeta: (v) => {
            const p = ManifestSchema.safeParse(v);
            return p.success && !checkSignature(p.data, this.opts.trustedKey) && p.data.seq > this.state.appliedSeq ? p.data : null;
          },
          geometryOf: (m) => ({ size: m.blob.size, pieceSize: m.blob.chunkSize }),
          verifyPiece: (m, i, data) => sha256Hex(data) === m.blob.chunkSha256[i],
        })
      : null;
    if (!r) {
      this.log('saved transfer state unusable or outdated; discarded');
      await this.cleanTransferDir();
      return;
    }
    const m = r.file.meta;
    const t: Transfer = { manifest: m, file: r.file, quietTimer: null, retries: 0, finishing: false, passSeen: 0, deferrals: 0 };
    this.transfer = t;
    this.agentState = 'downloading';
    this.log(`resuming ${m.adapter.id} v${m.adapter.version}: ${r.file.have.count()}/${m.blob.chunks} chunks held${r.dropped ? `, ${r.dropped} failed re-verification` : ''}`);
    if (r.file.complete) void this.enqueue(() => this.finishTransfer(t));
  }

  private async cleanTransferDir(): Promise<void> {
    await fs.rm(this.p('transfer'), { recursive: true, force: true });
    await fs.mkdir(this.p('transfer'), { recursive: true });
  }

  private async dropTransfer(): Promise<void> {
    const t = this.transfer;
    if (!t) return;
    this.transfer = null;
    if (t.quietTimer) clearTimeout(t.quietTimer);
    await t.file.discard();
    await this.cleanTransferDir();
  }

  private armQuiet(t: Transfer, ms: number): void {
    if (t.quietTimer) clearTimeout(t.quietTimer);
    if (this.stopped || t.finishing) return;
    // Jitter spreads the requests of many devices that went quiet at the same moment.
    const delay = ms * (1 + 0.2 * Math.random());
    const due = Date.now() + delay;
    t.quietTimer = setTimeout(() => {
      t.quietTimer = null;
      // Not a silence of the hub's if this agent was the slow one: its own queue still held work
      // (the next chunk waits in the socket until the last one is written), or the process was too
      // busy to run the timer on time. Asking now would fetch chunks that are already on their way.
      // (At most 5 times in a row: a device that is always this slow must still ask.)
      if ((this.queued > 0 || Date.now() - due > delay / 2) && t.deferrals < 5) {
        t.deferrals++;
        return this.armQuiet(t, ms);
      }
      t.deferrals = 0;
      this.requestMissing(t);
    }, delay);
  }

  /** `pass`: the pass whose end marker prompted this request (0 after a silence: serve everything). */
  private requestMissing(t: Transfer, pass = 0): void {
    if (this.transfer !== t || t.finishing || this.stopped) return;
    const missing = t.file.have.complement();
    if (missing.count() === 0) return;
    const link = this.link;
    if (link?.connected) {
      this.counters.missingRequests++;
      const msg = { type: 'missing', v: PROTOCOL_VERSION, deviceId: this.deviceId, target: t.manifest.target, sha256: t.manifest.blob.sha256, bitmap: missing.toBase64(), ...(pass > 0 ? { pass } : {}) };
      void link.publish(topics.missing(this.deviceId), encodeJson(msg), { contentType: 'application/json' }).catch(() => undefined);
    }
    t.retries++;
    this.armQuiet(t, Math.min(this.opts.maxRetryMs ?? 30_000, this.quietMs * 2 ** Math.min(t.retries, 10)));
  }

  private async onChunk(sha: string, index: number, count: number, data: Buffer, topic: string): Promise<void> {
    const t = this.transfer;
    if (!t || t.manifest.blob.sha256 !== sha || t.finishing) return; // another (older or other target's) blob
    const m = t.manifest;
    if (index === PASS_END_INDEX && data.length === 4 && count === m.blob.chunks) {
      t.passSeen = Math.max(t.passSeen, data.readUInt32BE(0));
      // The hub finished a pass: whatever is still missing was lost. Ask soon (jitter lets the
      // requests of many devices fall into one coalescing window at the hub).
      t.retries = 0;
      if (t.quietTimer) clearTimeout(t.quietTimer);
      t.quietTimer = setTimeout(() => {
        t.quietTimer = null;
        this.requestMissing(t, t.passSeen);
      }, Math.random() * Math.min(100, this.quietMs));
      return;
    }
    if (count !== m.blob.chunks || index >= m.blob.chunks) return this.refuse(`chunk refused: index ${index}/${count} does not fit the manifest's ${m.blob.chunks} chunks`, topic);
    if (t.file.have.get(index)) {
      this.counters.chunksDuplicate++;
      return;
    }
    if (data.length !== t.file.pieceLength(index) || sha256Hex(data) !== m.blob.chunkSha256[index]) {
      this.counters.chunksCorrupt++;
      this.setError(`chunk ${index} of ${m.adapter.id} v${m.adapter.version} failed its sha256 check; dropped and asked for again`, topic);
      this.armQuiet(t, this.quietMs);
      return;
    }
    await t.file.writePiece(index, data);
    this.counters.chunksReceived++;
    t.retries = 0;
    if (t.file.complete) {
      await this.finishTransfer(t);
      return;
    }
    this.armQuiet(t, this.quietMs);
    void this.publishStatus();
  }

  /** Verifies the whole blob, installs it atomically and activates it. Runs inside the queue. */
  private async finishTransfer(t: Transfer): Promise<void> {
    if (this.transfer !== t || t.finishing) return;
    t.finishing = true;
    if (t.quietTimer) clearTimeout(t.quietTimer);
    const m = t.manifest;
    this.setState('verifying');
    await t.file.persist();
    const sha = await t.file.sha256();
    if (sha !== m.blob.sha256) {
      // Cannot happen with every chunk hash verified, unless the disk changed under us: start over.
      this.setError(`blob of ${m.adapter.id} v${m.adapter.version} hashes to ${sha}, manifest says ${m.blob.sha256}; downloading again`);
      t.file.forget();
      t.finishing = false;
      this.setState('downloading');
      this.armQuiet(t, this.quietMs);
      return;
    }
    const done = async (reason: string | null) => {
      this.state.appliedSeq = Math.max(this.state.appliedSeq, m.seq);
      await this.saveState();
      await this.dropTransfer();
      if (reason) this.refuse(reason, topics.manifest(m.target));
    };
    // A sealed blob is opened chunk by chunk into a plaintext file, whose sha256 must be the one
    // sealed with the content key; only then is it unpacked and installed.
    const opened = this.openManifest(m);
    if (typeof opened === 'string') {
      await done(`adapter ${m.adapter.id} v${m.adapter.version} refused after download: ${opened}; nothing installed`);
      this.setState('idle');
      return;
    }
    let src: { read(o: number, l: number): Promise<Buffer>; stream(o: number, l: number): AsyncGenerator<Buffer> } = t.file;
    let plainSize = m.blob.size;
    let closeSrc = async (): Promise<void> => undefined;
    if (m.enc) {
      const plainFile = this.p('transfer', `${m.blob.sha256}.plain`);
      try {
        await openSealedFile({ read: (o, l) => t.file.read(o, l), size: m.blob.size, chunkSize: m.blob.chunkSize }, opened.contentKey, opened.noncePrefix, opened.plainSha256, plainFile);
      } catch (err) {
        await done(`adapter ${m.adapter.id} v${m.adapter.version} refused after download: ${(err as Error).message}; nothing installed`);
        this.setState('idle');
        return;
      } finally {
        opened.contentKey.fill(0);
      }
      const r = await plainReader(plainFile);
      src = r;
      plainSize = r.size;
      closeSrc = () => r.close();
    }
    const contentSha = opened.plainSha256;
    let entries: PackEntry[];
    try {
      const packed = await readPackInfo((o, l) => src.read(o, l), plainSize);
      entries = packed.entries;
      const info = packed.info;
      // The pack's own binding must agree with what the manifest said (a plain PEFT adapter has none).
      const bound = this.matchBase({ fingerprint: info.baseFingerprint, sourceFingerprint: info.baseSourceFingerprint ?? null }, 'edgelora_adapter.json');
      if (bound.kind === 'refused') throw new EdgeloraError(`edgelora_adapter.json names base model ${info.baseFingerprint}, this device runs ${this.opts.modelFingerprint}: ${bound.reason}`, { hint: bound.hint });
    } catch (err) {
      await closeSrc();
      await done(`adapter ${m.adapter.id} v${m.adapter.version} refused after download: ${(err as Error).message}`);
      this.setState('idle');
      return;
    }
    const dirName = `${m.adapter.id}@${m.adapter.version}-${contentSha.slice(0, 12)}`;
    try {
      await writeDirAtomic(
        this.p('adapters', dirName),
        async (tmp) => {
          for (const e of entries) {
            const out = await fs.open(path.join(tmp, e.name), 'w');
            try {
              let o = 0;
              for await (const piece of src.stream(e.offset, e.size)) {
                await out.write(piece, 0, piece.length, o);
                o += piece.length;
              }
            } finally {
              await out.close();
            }
          }
        },
        { replace: true },
      );
    } finally {
      await closeSrc();
    }
    const inst: Installed = { id: m.adapter.id, version: m.adapter.version, sha256: contentSha, seq: m.seq, dir: dirName, installedAt: this.now().toISOString() };
    this.state.installed = this.state.installed.filter((i) => i.sha256 !== inst.sha256);
    this.state.installed.push(inst);
    await done(null);
    this.log(`installed ${inst.id} v${inst.version} (${plainSize} bytes${m.enc ? ', sealed' : ''}, sha256 ${inst.sha256.slice(0, 12)})`);
    await this.activateInstalled(inst, `manifest seq ${m.seq}`);
    this.setState('idle');
  }

  /**
   * Activates an installed adapter. On failure the last adapter that worked is activated again
   * (or none), the reason goes to lastError, and false is returned.
   */
  private async activateInstalled(inst: Installed, why: string): Promise<boolean> {
    this.setState('activating');
    try {
      await this.activator.activate(this.adapterDir(inst), { adapterId: inst.id, version: inst.version, sha256: inst.sha256 });
    } catch (err) {
      const back = this.installed(this.state.active);
      let restored = 'no adapter';
      try {
        if (back && back.sha256 !== inst.sha256) {
          await this.activator.activate(this.adapterDir(back), { adapterId: back.id, version: back.version, sha256: back.sha256 });
          restored = `${back.id} v${back.version}`;
        } else {
          await this.activator.deactivate();
          this.state.active = null;
        }
      } catch (err2) {
        await this.activator.deactivate().catch(() => undefined);
        this.state.active = null;
        restored = `no adapter (re-activating ${back?.id ?? '?'} also failed: ${(err2 as Error).message})`;
      }
      await this.saveState();
      this.setError(`activation of ${inst.id} v${inst.version} (${why}) failed: ${(err as Error).message}; rolled back to ${restored}`);
      this.emit('activation-failed', inst, err);
      this.setState('idle');
      return false;
    }
    if (this.state.active !== inst.sha256) {
      if (this.state.active !== null) this.state.previous = this.state.active;
      this.state.active = inst.sha256;
    }
    await this.store.prune(this.opts.keepInstalled ?? 3);
    await this.saveState();
    this.log(`activated ${inst.id} v${inst.version} (${why})`);
    this.emit('activated', inst);
    this.setState('idle');
    return true;
  }

  // ---- commands ----

  private async onCommand(cmd: Command): Promise<void> {
    const seen = this.recentCommands.get(cmd.id);
    let running = this.runningCommands.get(cmd.id);
    if (!seen && !running) {
      // An upload runs beside the serial queue: it waits for the hub's acks (up to the uploader's
      // deadline), and downloads, activations and other commands must not wait behind it.
      running = cmd.action === 'upload' ? this.runCommand(cmd) : this.enqueue(() => this.runCommand(cmd));
      this.runningCommands.set(cmd.id, running);
    }
    const result = seen ?? (await (running as Promise<Result>));
    if (!seen) {
      this.runningCommands.delete(cmd.id);
      this.recentCommands.set(cmd.id, result);
      if (this.recentCommands.size > 100) this.recentCommands.delete(this.recentCommands.keys().next().value as string);
    }
    await this.link?.publish(topics.result(this.deviceId), encodeJson(result), { contentType: 'application/json' }).catch(() => undefined);
  }

  private async runCommand(cmd: Command): Promise<Result> {
    const ref = (): AdapterRefMsg | null => {
      const a = this.installed(this.state.active);
      return a ? { id: a.id, version: a.version, sha256: a.sha256 } : null;
    };
    const res = (ok: boolean, error?: string, uploaded?: string): Result => ({
      type: 'result',
      v: PROTOCOL_VERSION,
      commandId: cmd.id,
      deviceId: this.deviceId,
      ok,
      ...(error ? { error } : {}),
      active: ref(),
      ...(uploaded ? { uploaded } : {}),
    });
    const spec = cmd.adapter ? `${cmd.adapter.id}${cmd.adapter.version ? ` v${cmd.adapter.version}` : ''}` : 'the active adapter';
    switch (cmd.action) {
      case 'activate': {
        const inst = this.store.find(cmd.adapter);
        if (!inst || !cmd.adapter) return res(false, `no installed adapter ${spec}`);
        const ok = await this.activateInstalled(inst, `command ${cmd.id}`);
        return res(ok, ok ? undefined : this.lastError?.reason);
      }
      case 'rollback': {
        const prev = this.installed(this.state.previous);
        if (!prev) return res(false, 'no previous adapter to roll back to');
        const ok = await this.activateInstalled(prev, `rollback ${cmd.id}`);
        return res(ok, ok ? undefined : this.lastError?.reason);
      }
      case 'deactivate': {
        await this.activator.deactivate();
        if (this.state.active !== null) this.state.previous = this.state.active;
        this.state.active = null;
        await this.saveState();
        this.setState('idle');
        return res(true);
      }
      case 'upload': {
        const inst = this.store.find(cmd.adapter);
        if (!inst) return res(false, `no installed adapter ${spec}`);
        try {
          const hk = cmd.hubEncKey;
          const sha = await this.uploadDir(this.adapterDir(inst), inst.id, hk ? { raw: Buffer.from(hk.pub, 'base64'), keyId: hk.keyId } : undefined);
          return res(true, undefined, sha);
        } catch (err) {
          return res(false, (err as Error).message);
        }
      }
    }
  }

  // ---- upload ----

  /** Uploads an adapter directory (e.g. one fine-tuned on this device) to the hub; resolves with its sha256. */
  async uploadDir(dir: string, name: string, sealTo: { raw: Buffer; keyId: string } | undefined = this.opts.hubEncKey): Promise<string> {
    const link = this.link;
    if (!link) throw new EdgeloraError('agent not started');
    if (!sealTo && !this.opts.allowPlaintext) {
      throw new EdgeloraError("no hub X25519 key to seal the upload to: it would travel in clear", { where: dir, hint: 'start the hub with its --enc-key (its upload commands then carry the key), give the agent --hub-enc-key, or pass --allow-plaintext' });
    }
    const blob = await packAdapterDir(dir);
    // Uploads run beside downloads and activations: the state says "uploading" only when nothing
    // else is going on, and is not restored over what happened meanwhile.
    if (this.agentState === 'idle') this.setState('uploading');
    try {
      return await uploadBlob(link, blob, checkName('adapter name', name), { segmentSize: this.opts.uploadSegmentSize ?? 256 * 1024, signal: this.stopping.signal, ...(sealTo ? { sealTo } : {}) });
    } finally {
      if (this.agentState === 'uploading') this.setState('idle');
    }
  }
}
