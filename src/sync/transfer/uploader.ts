// Client side of an upload (device or operator → hub), after EMQX's file transfer: `init` (name,
// size, sha256) answered with the segments the hub already holds, `seg` frames each acknowledged,
// `fin` (size + sha256) answered once the hub verified and stored the blob. Unacknowledged steps are
// resent after a timeout and after every reconnect, so an upload resumes where it stopped.
import { EdgeloraError } from '../../util/errors.js';
import { Bitmap } from '../protocol/bitmap.js';
import { decodeJson, encodeJson, encodeSegment, ENC_ALG_V1, PROTOCOL_VERSION, UploadAckSchema, type UploadAck, type UploadInit } from '../protocol/messages.js';
import { sealBlob, TAG_BYTES, type Recipient } from '../protocol/envelope.js';
import type { Link } from '../transport/mqtt.js';
import { sha256Hex } from './pack.js';
import { topics } from '../protocol/topics.js';

export interface UploadOptions {
  /** Segment size in bytes; default 256 KiB. */
  segmentSize?: number;
  /** Segments in flight before waiting for acks; default 4. */
  window?: number;
  /** Milliseconds to wait for an ack before resending; default 5000. */
  ackTimeoutMs?: number;
  /** Give up after this many milliseconds in all; default 10 minutes. */
  deadlineMs?: number;
  /** Give up when one step (init, a segment, fin) goes unacknowledged this long; default: only the deadline. */
  stepTimeoutMs?: number;
  /** Aborts the upload (e.g. the agent stops): the promise rejects and no timer is left behind. */
  signal?: AbortSignal;
  onProgress?: (acked: number, total: number) => void;
  /**
   * Seal the upload to this X25519 key (the hub's): a fresh content key, segments are sealed
   * chunks of segmentSize − 16 plaintext bytes. Absent: the upload goes in clear.
   */
  sealTo?: { raw: Buffer; keyId: string };
}

class RestartUpload extends Error {}

/**
 * Uploads `blob` under `name` through `link` (whose client id names the upload topics). Resolves
 * with the sha256 of the plaintext blob (what the hub stores) once the hub acknowledged `fin`; rejects if the hub refuses or the deadline passes.
 */
export async function uploadBlob(link: Link, plainBlob: Buffer, name: string, o: UploadOptions = {}): Promise<string> {
  const id = link.clientId;
  const plainSha = sha256Hex(plainBlob);
  let blob = plainBlob;
  let segSize = o.segmentSize ?? 256 * 1024;
  let enc: UploadInit['enc'];
  if (o.sealTo) {
    const s = sealBlob(plainBlob, segSize - TAG_BYTES, [o.sealTo.raw]);
    const r = s.recipients[0] as Recipient;
    blob = s.data;
    segSize = s.chunkSize;
    enc = { alg: ENC_ALG_V1, noncePrefix: s.noncePrefix.toString('base64'), recipient: { keyId: r.keyId, epk: r.epk.toString('base64'), wrapped: r.wrapped.toString('base64') } };
  }
  const sha = sha256Hex(blob);
  const n = Math.ceil(blob.length / segSize);
  const window = o.window ?? 4;
  const ackMs = o.ackTimeoutMs ?? 5000;
  const deadline = Date.now() + (o.deadlineMs ?? 600_000);

  const waiters = new Map<string, (ack: UploadAck) => void>();
  const onMsg = (topic: string, payload: Buffer) => {
    if (topic !== topics.uploadAck(id)) return;
    const d = decodeJson(UploadAckSchema, payload);
    if (!d.ok || d.value.sha256 !== sha) return;
    const key = d.value.stage === 'seg' ? `seg:${d.value.index ?? -1}` : d.value.stage;
    const w = waiters.get(key);
    if (w) {
      waiters.delete(key);
      w(d.value);
    }
  };
  const off = link.onMessage(onMsg);
  await link.subscribe([topics.uploadAck(id)]);

  // Sends `send()` and waits for the ack under `key`, resending on timeout and on reconnect.
  const request = (key: string, send: () => Promise<void>): Promise<UploadAck> =>
    new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const started = Date.now();
      const resend = () => {
        if (o.signal?.aborted) {
          cleanup();
          reject(new EdgeloraError(`upload of ${name} aborted`, { where: link.url }));
          return;
        }
        const now = Date.now();
        if (now > deadline || (o.stepTimeoutMs !== undefined && now - started >= o.stepTimeoutMs)) {
          cleanup();
          reject(new EdgeloraError(`upload of ${name}: the hub did not acknowledge ${key} within ${now - started} ms (on ${topics.uploadInit(id).replace(/init$/, '')}…)`, { where: link.url, hint: 'is `edgelora hub` running on this broker, and may it read this client\'s upload topics?' }));
          return;
        }
        if (link.connected) send().catch(() => undefined);
        clearTimeout(timer);
        timer = setTimeout(resend, o.stepTimeoutMs === undefined ? ackMs : Math.min(ackMs, Math.max(1, started + o.stepTimeoutMs - Date.now())));
      };
      const onConnect = () => resend();
      const cleanup = () => {
        clearTimeout(timer);
        link.client.off('connect', onConnect);
        o.signal?.removeEventListener('abort', resend);
        waiters.delete(key);
      };
      o.signal?.addEventListener('abort', resend);
      waiters.set(key, (ack) => {
        cleanup();
        resolve(ack);
      });
      link.client.on('connect', onConnect);
      resend();
    });

  let lastError = '';
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      const initAck = await request('init', () =>
        link.publish(topics.uploadInit(id), encodeJson({ type: 'upload-init', v: PROTOCOL_VERSION, sha256: sha, size: blob.length, segmentSize: segSize, name, ...(enc ? { enc } : {}) }), { contentType: 'application/json' }),
      );
      if (!initAck.ok) throw new EdgeloraError(`hub refused the upload: ${initAck.error ?? 'no reason given'}`, { where: topics.uploadInit(id) });
      const have = (initAck.have !== undefined ? Bitmap.fromBase64(n, initAck.have) : null) ?? new Bitmap(n);
      const todo = have.complement().indices();
      let acked = n - todo.length;
      o.onProgress?.(acked, n);
      let next = 0;
      const worker = async () => {
        while (next < todo.length) {
          const i = todo[next++] as number;
          const data = blob.subarray(i * segSize, Math.min(blob.length, (i + 1) * segSize));
          const ack = await request(`seg:${i}`, () => link.publish(topics.uploadSegment(id), encodeSegment(sha, i, data)));
          // A refused segment (e.g. the hub restarted and forgot the upload) restarts from init.
          if (!ack.ok) throw new RestartUpload(ack.error ?? `segment ${i} refused`);
          o.onProgress?.(++acked, n);
        }
      };
      try {
        await Promise.all(Array.from({ length: Math.min(window, Math.max(1, todo.length)) }, worker));
      } catch (err) {
        if (err instanceof RestartUpload) {
          lastError = err.message;
          continue;
        }
        throw err;
      }
      const finAck = await request('fin', () =>
        link.publish(topics.uploadFin(id), encodeJson({ type: 'upload-fin', v: PROTOCOL_VERSION, sha256: sha, size: blob.length }), { contentType: 'application/json' }),
      );
      if (finAck.ok) return plainSha;
      // The hub lost or rejected segments (e.g. it restarted without them): start over from init.
      lastError = finAck.error ?? 'no reason given';
      if (!/missing segments|checksum|unknown upload/.test(lastError)) {
        throw new EdgeloraError(`hub refused the upload: ${lastError}`, { where: topics.uploadFin(id) });
      }
    }
    throw new EdgeloraError(`upload of ${name} failed 5 times (last: ${lastError})`, { where: topics.uploadFin(id) });
  } finally {
    waiters.clear();
    off();
  }
}
