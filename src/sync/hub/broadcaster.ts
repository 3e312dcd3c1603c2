// The hub's distribution: one Sender per (target, blob) broadcasts a publication's chunks once in
// passes with end markers, and repairs what devices report missing: a chunk most of the target's
// online devices lack is broadcast once, others go to each asking device's own chunk topic (see
// docs/protocol.md, "Repair"). Requests for one blob within the coalescing window form one pass.
import { Bitmap } from '../protocol/bitmap.js';
import { CHUNK_HEADER_BYTES, decodeJson, encodeChunk, MissingSchema, PASS_END_INDEX, type Manifest, type Status } from '../protocol/messages.js';
import { targetKey, topics, type Target } from '../protocol/topics.js';
import type { Link } from '../transport/mqtt.js';
import type { HubOptions, HubStats } from './hub.js';

export interface BroadcastContext {
  link(): Link | null;
  stats: HubStats;
  opts: Pick<HubOptions, 'window' | 'rateBytesPerSec' | 'chunkExpirySec' | 'coalesceMs' | 'repairBroadcastShare' | 'passGraceMs'>;
  /** The last status of every device (for the repair rule's online count). */
  devices: ReadonlyMap<string, Status>;
  /** A target's current manifest. */
  current(targetKey: string): Manifest | undefined;
  readBlob(sha: string): Promise<Buffer>;
  refuse(reason: string, topic: string): void;
  log(line: string): void;
  /** A pass has gone out. */
  sent(m: Manifest): void;
}

/**
 * Sends one blob to one target: broadcast chunks go to the target's chunk topic, repairs for a few
 * devices to each device's own chunk topic, in index order with a PUBACK window.
 */
class Sender {
  /** Chunks to broadcast on the target's topic. */
  readonly pending: Bitmap;
  /** Chunks to send to one device on its own chunk topic (device id → chunks). */
  readonly unicast = new Map<string, Bitmap>();
  /** Requests gathered in the coalescing window, by device. */
  requested: Map<string, Bitmap> | null = null;
  coalesceTimer: NodeJS.Timeout | null = null;
  inflight = 0;
  generation = 0;
  lastActive = 0;
  /** Current pass: 1 is the first broadcast, each resend of a union is the next. */
  pass = 1;
  /** The pass in which each chunk was last broadcast (0: never). */
  readonly sentInPass: Uint32Array;
  /** The last pass in which chunks went to a device's own topic, and which. */
  readonly sentTo = new Map<string, { pass: number; chunks: Bitmap }>();
  /** When the last pass ended (ms since the epoch; 0: none yet). */
  passEndedAt = 0;
  /** Devices sent to on their own topic in the current pass: they get the pass's end marker there. */
  readonly passDevices = new Set<string>();
  constructor(
    readonly manifest: Manifest,
    readonly blob: Buffer,
  ) {
    this.pending = new Bitmap(manifest.blob.chunks);
    this.sentInPass = new Uint32Array(manifest.blob.chunks);
  }
  chunk(i: number): Buffer {
    const cs = this.manifest.blob.chunkSize;
    return encodeChunk(this.manifest.blob.sha256, i, this.manifest.blob.chunks, this.blob.subarray(i * cs, Math.min(this.blob.length, (i + 1) * cs)));
  }
  /** The next chunk to send: broadcasts first, then each device's repairs; null when none. */
  take(): { index: number; device: string | null } | null {
    const b = this.pending.next();
    if (b >= 0) {
      this.pending.set(b, false);
      return { index: b, device: null };
    }
    for (const [device, bm] of this.unicast) {
      const i = bm.next();
      if (i < 0) {
        this.unicast.delete(device);
        continue;
      }
      bm.set(i, false);
      return { index: i, device };
    }
    return null;
  }
  /** Puts a chunk whose publish failed back in line. */
  giveBack(index: number, device: string | null): void {
    if (device === null) this.pending.set(index);
    else {
      let bm = this.unicast.get(device);
      if (!bm) this.unicast.set(device, (bm = new Bitmap(this.manifest.blob.chunks)));
      bm.set(index);
    }
  }
  hasPending(): boolean {
    if (this.pending.next() >= 0) return true;
    for (const bm of this.unicast.values()) if (bm.next() >= 0) return true;
    return false;
  }
}

export class Broadcaster {
  private readonly senders = new Map<string, Sender>();
  private nextSendAt = 0;
  private rateTimer: NodeJS.Timeout | null = null;
  constructor(private readonly ctx: BroadcastContext) {}

  /** Starts pass 1 of a new publication; the target's older blobs are dropped (devices no longer ask for them). */
  broadcast(manifest: Manifest, blob: Buffer): void {
    const key = targetKey(manifest.target);
    for (const [k, s] of this.senders) {
      if (targetKey(s.manifest.target) === key) {
        if (s.coalesceTimer) clearTimeout(s.coalesceTimer);
        this.senders.delete(k);
      }
    }
    const sender = new Sender(manifest, blob);
    this.senders.set(`${key}|${manifest.blob.sha256}`, sender);
    for (let i = 0; i < manifest.blob.chunks; i++) sender.pending.set(i);
    this.pump(sender);
  }

  /** A new connection: what was in flight on the old one is forgotten (its failures put it back in line). */
  onReconnect(): void {
    for (const s of this.senders.values()) {
      s.generation++;
      s.inflight = 0;
    }
  }

  pumpAll(): void {
    for (const s of this.senders.values()) this.pump(s);
  }

  stop(): void {
    if (this.rateTimer) clearTimeout(this.rateTimer);
    for (const s of this.senders.values()) if (s.coalesceTimer) clearTimeout(s.coalesceTimer);
  }

  /** Sends pending chunks while fewer than `window` await their PUBACK. */
  private pump(s: Sender, resend = false): void {
    const link = this.ctx.link();
    if (!link) return;
    const window = this.ctx.opts.window ?? 16;
    const gen = s.generation;
    while (s.inflight < window && link.connected) {
      const rate = this.ctx.opts.rateBytesPerSec;
      if (rate !== undefined && s.hasPending()) {
        const wait = this.nextSendAt - Date.now();
        if (wait > 0) {
          this.rateTimer ??= setTimeout(() => {
            this.rateTimer = null;
            for (const x of this.senders.values()) this.pump(x, resend);
          }, wait);
          break;
        }
      }
      const job = s.take();
      if (!job) break;
      if (rate !== undefined) this.nextSendAt = Math.max(this.nextSendAt, Date.now()) + (1000 * (s.manifest.blob.chunkSize + CHUNK_HEADER_BYTES)) / rate;
      const { index: idx, device } = job;
      if (device === null) s.sentInPass[idx] = s.pass;
      else {
        s.passDevices.add(device);
        const last = s.sentTo.get(device);
        if (last && last.pass === s.pass) last.chunks.set(idx);
        else {
          const chunks = new Bitmap(s.manifest.blob.chunks);
          chunks.set(idx);
          s.sentTo.set(device, { pass: s.pass, chunks });
        }
        this.ctx.stats.chunksUnicast++;
      }
      const frame = s.chunk(idx);
      s.inflight++;
      s.lastActive = Date.now();
      this.ctx.stats.bytesOut += frame.length;
      this.ctx.stats.chunkBytesOut += frame.length;
      this.ctx.stats.chunksSent++;
      if (resend) this.ctx.stats.chunksResent++;
      const topic = device === null ? topics.chunk(s.manifest.target) : topics.chunk({ kind: 'device', name: device });
      link
        .publish(topic, frame, { expirySec: this.ctx.opts.chunkExpirySec ?? 600, user: { sha256: s.manifest.blob.sha256, index: String(idx) } })
        .then(
          () => undefined,
          () => {
            if (gen === s.generation) s.giveBack(idx, device);
          },
        )
        .finally(() => {
          if (gen !== s.generation) return;
          s.inflight--;
          this.pump(s, resend);
          if (s.inflight === 0 && !s.hasPending()) this.endPass(s);
        });
    }
  }

  /**
   * After a pass (the first broadcast or a repair), an empty marker frame follows the chunks on
   * every topic the pass used: the target's, and the own topic of each device repaired. MQTT keeps
   * one publisher's QoS 1 messages in order on a topic, so a device that sees the marker knows every
   * chunk of the pass that will reach it has, and asks for the rest at once.
   */
  private endPass(s: Sender): void {
    s.passEndedAt = Date.now();
    this.ctx.sent(s.manifest);
    const passNo = Buffer.alloc(4);
    passNo.writeUInt32BE(s.pass);
    const frame = encodeChunk(s.manifest.blob.sha256, PASS_END_INDEX, s.manifest.blob.chunks, passNo);
    const to = [topics.chunk(s.manifest.target), ...[...s.passDevices].map((d) => topics.chunk({ kind: 'device', name: d }))];
    s.passDevices.clear();
    for (const topic of new Set(to)) {
      this.ctx.stats.bytesOut += frame.length;
      this.ctx.link()?.publish(topic, frame, { expirySec: this.ctx.opts.chunkExpirySec ?? 600 }).catch(() => undefined);
    }
  }

  private passInProgress(s: Sender): boolean {
    return s.inflight > 0 || s.hasPending();
  }

  /** Devices that last said they are online and follow `target` (from their retained status). */
  private onlineIn(target: Target): number {
    let n = 0;
    for (const d of this.ctx.devices.values()) {
      if (!d.online) continue;
      if (target.kind === 'fleet' ? d.fleet === target.name : target.kind === 'group' ? d.group === target.name : d.deviceId === target.name) n++;
    }
    return n;
  }

  /**
   * Turns the requests gathered in one coalescing window into one repair pass. A chunk goes to
   * the target's topic when at least half of the target's online devices asked for it, else to the
   * own topic of each device that asked. Rationale: a broadcast moves the chunk once into the
   * broker and once out to each of the `online` subscribers (1 + online), unicasts move it in and
   * out once per requester (2 × requesters); the broadcast is cheaper from requesters > online / 2.
   * So a late joiner costs its own bytes, and a lossy broadcast that many missed costs one resend.
   */
  private planRepair(s: Sender, req: Map<string, Bitmap>): void {
    const n = s.manifest.blob.chunks;
    const target = s.manifest.target;
    const online = Math.max(this.onlineIn(target), req.size);
    const share = this.ctx.opts.repairBroadcastShare ?? 0.5;
    const askers = new Uint32Array(n);
    for (const bm of req.values()) for (let i = bm.next(); i >= 0; i = bm.next(i + 1)) askers[i] = (askers[i] ?? 0) + 1;
    for (let i = 0; i < n; i++) {
      const r = askers[i] ?? 0;
      if (r > 0 && (target.kind === 'device' || r > share * online)) s.pending.set(i);
    }
    const broadcast = s.pending.count();
    let unicast = 0;
    for (const [device, bm] of req) {
      let mine: Bitmap | null = null;
      for (let i = bm.next(); i >= 0; i = bm.next(i + 1)) {
        if (s.pending.get(i)) continue;
        mine ??= s.unicast.get(device) ?? new Bitmap(n);
        mine.set(i);
        unicast++;
      }
      if (mine) s.unicast.set(device, mine);
    }
    this.ctx.log(`hub: repair pass ${s.pass} of ${targetKey(target)} for ${req.size} device(s) (${online} online): ${broadcast} chunk(s) to the target, ${unicast} to devices' own topics`);
  }

  onMissing(deviceId: string, payload: Buffer): void {
    const topic = topics.missing(deviceId);
    const d = decodeJson(MissingSchema, payload);
    if (!d.ok) return this.ctx.refuse(`missing request refused: ${d.reason}`, topic);
    const m = d.value;
    if (m.deviceId !== deviceId) return this.ctx.refuse(`missing request refused: it names device ${m.deviceId}, the topic ${deviceId}`, topic);
    const key = targetKey(m.target);
    const current = this.ctx.current(key);
    if (!current) return this.ctx.refuse(`missing request refused: no adapter is published to ${key}`, topic);
    if (current.blob.sha256 !== m.sha256) return this.ctx.refuse(`missing request refused: ${m.sha256.slice(0, 12)} is not ${key}'s current blob (${current.blob.sha256.slice(0, 12)})`, topic);
    const want = Bitmap.fromBase64(current.blob.chunks, m.bitmap);
    if (!want) return this.ctx.refuse(`missing request refused: the bitmap is not ceil(${current.blob.chunks} / 8) bytes with no bit set past chunk ${current.blob.chunks - 1}`, topic);
    this.ctx.stats.missingRequests++;
    void this.senderFor(current).then((s) => {
      // While a pass is going out, the pass answers the request: its end marker makes the device
      // ask again, for just what the pass did not bring. Served now, a request sent before the
      // device got the pass's chunks would send them again (on a loaded fleet, to every device).
      if (this.passInProgress(s)) {
        this.ctx.stats.missingDeferred++;
        return;
      }
      // The same for a request after a silence (no `pass`) just after a pass ended: the broker may
      // still be delivering that pass to a slow device, whose own end marker will follow.
      if (m.pass === undefined && Date.now() - s.passEndedAt < (this.ctx.opts.passGraceMs ?? 2000)) {
        this.ctx.stats.missingDeferred++;
        return;
      }
      if (!s.requested) {
        s.requested = new Map();
        // Requests for the same blob within the window become one repair pass, so a hundred
        // devices that lost the same chunk cost one resend, not a hundred.
        const flush = () => {
          // A pass started meanwhile (e.g. resends after a reconnect): wait for its end.
          if (this.passInProgress(s)) {
            s.coalesceTimer = setTimeout(flush, this.ctx.opts.coalesceMs ?? 250);
            return;
          }
          const req = s.requested;
          s.requested = null;
          s.coalesceTimer = null;
          if (req && req.size > 0) {
            s.pass++;
            this.planRepair(s, req);
            this.pump(s, true);
          }
        };
        s.coalesceTimer = setTimeout(flush, this.ctx.opts.coalesceMs ?? 250);
      }
      // Chunks sent in a pass this device has not seen the end of are on their way to it.
      // (A request without `pass`, e.g. after a silence, is served in full.)
      const seen = m.pass ?? 0;
      const own = s.sentTo.get(deviceId);
      let bm = s.requested.get(deviceId);
      for (const i of want.indices()) {
        const onTheWay = seen > 0 && ((s.sentInPass[i] ?? 0) > seen || (own !== undefined && own.pass > seen && own.chunks.get(i)));
        if (onTheWay) continue;
        if (!bm) s.requested.set(deviceId, (bm = new Bitmap(current.blob.chunks)));
        bm.set(i);
      }
    });
  }

  private async senderFor(m: Manifest): Promise<Sender> {
    const k = `${targetKey(m.target)}|${m.blob.sha256}`;
    let s = this.senders.get(k);
    if (!s) {
      s = new Sender(m, await this.ctx.readBlob(m.blob.sha256));
      this.senders.set(k, s);
    }
    return s;
  }
}
