// Every message of the edgelora sync protocol v1: zod schemas for the JSON messages (the source of
// truth that docs/protocol.md describes) and codecs for the two binary frames (distribution chunks
// and upload segments). Anything that fails these is rejected with a reason.
import { z } from 'zod';
import { NAME_RE } from './topics.js';

export const PROTOCOL_VERSION = 1;
export const PACK_FORMAT = 'edgelora-pack/1';

/** Largest JSON message anyone accepts (bytes): a manifest of a 1 GiB blob in 256 KiB chunks is ~280 KB. */
export const MAX_JSON_BYTES = 1024 * 1024;
/** Largest chunk payload a sender may choose (bytes); the default is 256 KiB. */
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;
export const MIN_CHUNK_SIZE = 1024;
export const DEFAULT_CHUNK_SIZE = 256 * 1024;

const hex64 = z.string().regex(/^[0-9a-f]{64}$/, 'expected 64 lowercase hex digits (sha256)');
const name = z.string().regex(NAME_RE, 'expected 1-64 characters A-Z a-z 0-9 . _ - (letter or digit first)');
const count = z.number().int().nonnegative();
const requestId = z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, 'expected 1-64 characters A-Z a-z 0-9 . _ -');
const isoTime = z.iso.datetime();
const base64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/, 'expected base64');

/** Base64 of exactly `bytes` bytes (standard alphabet, padded). */
const b64Bytes = (bytes: number) => z.string().regex(new RegExp(`^[A-Za-z0-9+/]{${4 * Math.floor(bytes / 3)}}${bytes % 3 === 0 ? '' : bytes % 3 === 1 ? '[A-Za-z0-9+/]{2}==' : '[A-Za-z0-9+/]{3}='}$`), `expected base64 of ${bytes} bytes`);
const keyId16 = z.string().regex(/^[0-9a-f]{16}$/, 'expected 16 lowercase hex digits (a key id)');
export const ENC_ALG_V1 = 'x25519-hkdf-sha256-aes256gcm/1';

/** An X25519 public key as announced (device status) or carried (signed command): raw 32 bytes, base64. */
export const EncPublicKeySchema = z.strictObject({ alg: z.literal('x25519'), keyId: keyId16, pub: b64Bytes(32) });
export type EncPublicKey = z.infer<typeof EncPublicKeySchema>;

/** One recipient of a sealed blob: its key id, the ephemeral public key, the sealed content key (80 bytes). */
export const RecipientSchema = z.strictObject({ keyId: keyId16, epk: b64Bytes(32), wrapped: b64Bytes(80) });
export type RecipientMsg = z.infer<typeof RecipientSchema>;

/** How a manifest's blob is sealed (docs/protocol.md, "Encryption"); absent: the blob is in clear. */
export const ManifestEncSchema = z.strictObject({
  alg: z.literal(ENC_ALG_V1),
  /** 8 random bytes: chunk i's nonce is noncePrefix || u32 BE i. */
  noncePrefix: b64Bytes(8),
  recipients: z.array(RecipientSchema).min(1).max(4096),
});
export type ManifestEnc = z.infer<typeof ManifestEncSchema>;

export const TargetSchema = z.strictObject({ kind: z.enum(['fleet', 'group', 'device']), name });

/** An installed adapter as devices report it. */
export const AdapterRefSchema = z.strictObject({ id: name, version: z.number().int().positive(), sha256: hex64 });
export type AdapterRefMsg = z.infer<typeof AdapterRefSchema>;

/** The signed part of a manifest (everything but `signature`). */
const ManifestBodyObject = z.strictObject({
    type: z.literal('manifest'),
    v: z.literal(PROTOCOL_VERSION),
    /** Hub-wide sequence number, strictly increasing with every publication: newest wins. */
    seq: z.number().int().positive(),
    target: TargetSchema,
    adapter: z.strictObject({ id: name, version: z.number().int().positive() }),
    blob: z.strictObject({
      format: z.literal(PACK_FORMAT),
      sha256: hex64,
      size: z.number().int().positive().max(2 ** 40),
      chunkSize: z.number().int().min(MIN_CHUNK_SIZE).max(MAX_CHUNK_SIZE),
      chunks: z.number().int().positive(),
      /** sha256 of every chunk, in order: lets a device drop a corrupt chunk and ask for it again. */
      chunkSha256: z.array(hex64),
    }),
    /** The quantized base the adapter was trained on (its model manifest.json `fingerprint`), or null if unknown. */
    baseFingerprint: z.string().regex(/^[0-9a-f]{16,128}$/).nullable(),
    /**
     * The source model the adapter belongs to (model manifest.json `sourceFingerprint`): a device whose model
     * is another quantization of it accepts the adapter. Absent for adapters from before source binding.
     */
    baseSourceFingerprint: hex64.optional(),
    lora: z.strictObject({ rank: z.number().int().positive(), alpha: z.number().finite(), targets: z.array(z.string().max(256)).max(1024) }),
    createdAt: isoTime,
    /** First 16 hex digits of sha256 over the signer's raw 32-byte Ed25519 public key. */
    keyId: z.string().regex(/^[0-9a-f]{16}$/),
    /** Present when the blob is sealed for recipients: then blob.* describe the ciphertext. */
    enc: ManifestEncSchema.optional(),
});

function refineManifest(m: z.infer<typeof ManifestBodyObject>, ctx: z.core.$RefinementCtx): void {
    const want = Math.ceil(m.blob.size / m.blob.chunkSize);
    if (m.blob.chunks !== want) ctx.addIssue({ code: 'custom', message: `blob.chunks is ${m.blob.chunks}, size/chunkSize needs ${want}`, path: ['blob', 'chunks'] });
    if (m.blob.chunkSha256.length !== m.blob.chunks) {
      ctx.addIssue({ code: 'custom', message: `blob.chunkSha256 has ${m.blob.chunkSha256.length} entries for ${m.blob.chunks} chunks`, path: ['blob', 'chunkSha256'] });
    }
    // A sealed chunk is its plaintext (at least 1 byte) + a 16-byte tag.
    if (m.enc && m.blob.size < m.blob.chunks * 17) ctx.addIssue({ code: 'custom', message: `a sealed blob of ${m.blob.chunks} chunks has at least ${m.blob.chunks * 17} bytes`, path: ['blob', 'size'] });
}

export const ManifestBodySchema = ManifestBodyObject.superRefine(refineManifest);
export type ManifestBody = z.infer<typeof ManifestBodySchema>;
export const ManifestSchema = ManifestBodyObject.extend({ signature: base64.length(88) }).superRefine(refineManifest);
export type Manifest = z.infer<typeof ManifestSchema>;

export function stripSignature<T extends { signature: string }>(m: T): Omit<T, 'signature'> {
  const { signature: _sig, ...body } = m;
  return body;
}

/** device → hub: the chunks of `sha256` this device still lacks (bit i set = chunk i needed). */
export const MissingSchema = z.strictObject({
  type: z.literal('missing'),
  v: z.literal(PROTOCOL_VERSION),
  deviceId: name,
  target: TargetSchema,
  sha256: hex64,
  /** LSB-first bitmap over chunk indices, base64; its length is ceil(chunks / 8) bytes. */
  bitmap: base64.max(2 * 1024 * 1024),
  /** The highest pass whose end marker this device has seen (0 or absent: none). */
  pass: z.number().int().nonnegative().optional(),
});
export type Missing = z.infer<typeof MissingSchema>;

export const CommandAction = z.enum(['activate', 'rollback', 'deactivate', 'upload']);
export type CommandAction = z.infer<typeof CommandAction>;

/** The signed part of a command (hub → one device). */
export const CommandBodySchema = z.strictObject({
  type: z.literal('command'),
  v: z.literal(PROTOCOL_VERSION),
  id: requestId,
  deviceId: name,
  action: CommandAction,
  /** activate/upload: which installed adapter (version omitted = the newest installed). upload: omitted = the active one. */
  adapter: z.strictObject({ id: name, version: z.number().int().positive().optional() }).optional(),
  issuedAt: isoTime,
  keyId: z.string().regex(/^[0-9a-f]{16}$/),
  /** upload: the hub's X25519 key to seal the upload to (signed, so a device can trust it). */
  hubEncKey: EncPublicKeySchema.optional(),
});
export type CommandBody = z.infer<typeof CommandBodySchema>;
export const CommandSchema = z.strictObject({ ...CommandBodySchema.shape, signature: base64.length(88) });
export type Command = z.infer<typeof CommandSchema>;

export const ResultSchema = z.strictObject({
  type: z.literal('result'),
  v: z.literal(PROTOCOL_VERSION),
  commandId: requestId,
  deviceId: name,
  ok: z.boolean(),
  error: z.string().max(2000).optional(),
  active: AdapterRefSchema.nullable(),
  /** upload: the sha256 the hub stored. */
  uploaded: hex64.optional(),
});
export type Result = z.infer<typeof ResultSchema>;

export const AgentState = z.enum(['idle', 'downloading', 'verifying', 'activating', 'uploading', 'offline']);
export type AgentState = z.infer<typeof AgentState>;

export const StatusSchema = z.strictObject({
  type: z.literal('status'),
  v: z.literal(PROTOCOL_VERSION),
  deviceId: name,
  online: z.boolean(),
  state: AgentState,
  /** Optional; null and absent both mean "none" (a device with no group). */
  fleet: name.nullable().optional(),
  group: name.nullable().optional(),
  baseFingerprint: z.string().max(128).nullable().optional(),
  active: AdapterRefSchema.nullable().optional(),
  previous: AdapterRefSchema.nullable().optional(),
  transfer: z
    .strictObject({ adapter: z.strictObject({ id: name, version: z.number().int().positive() }), sha256: hex64, seq: z.number().int().positive(), received: count, total: count })
    .nullable()
    .optional(),
  lastError: z.strictObject({ at: isoTime, reason: z.string().max(2000), topic: z.string().max(512).optional() }).nullable().optional(),
  /** The device's X25519 key: the hub seals to it only once an operator enrolled it. */
  encKey: EncPublicKeySchema.nullable().optional(),
  updatedAt: isoTime.optional(),
});
export type Status = z.infer<typeof StatusSchema>;

/** client → hub: starts (or resumes) an upload; the upload is named by the blob's sha256. */
export const UploadInitSchema = z.strictObject({
  type: z.literal('upload-init'),
  v: z.literal(PROTOCOL_VERSION),
  sha256: hex64,
  size: z.number().int().positive().max(2 ** 40),
  segmentSize: z.number().int().min(MIN_CHUNK_SIZE).max(MAX_CHUNK_SIZE),
  /** A file name for the operator (the adapter id it should be published under by default). */
  name,
  /**
   * Present when the upload is sealed to the hub's X25519 key: then sha256/size/segmentSize
   * describe the ciphertext (segments are sealed chunks), and the hub stores the plaintext.
   */
  enc: z.strictObject({ alg: z.literal(ENC_ALG_V1), noncePrefix: b64Bytes(8), recipient: RecipientSchema }).optional(),
});
export type UploadInit = z.infer<typeof UploadInitSchema>;

export const UploadFinSchema = z.strictObject({ type: z.literal('upload-fin'), v: z.literal(PROTOCOL_VERSION), sha256: hex64, size: z.number().int().positive() });
export type UploadFin = z.infer<typeof UploadFinSchema>;

/** hub → client: acknowledges an init (with the segments it already holds), a segment, or the fin. */
export const UploadAckSchema = z.strictObject({
  type: z.literal('upload-ack'),
  v: z.literal(PROTOCOL_VERSION),
  sha256: hex64,
  stage: z.enum(['init', 'seg', 'fin']),
  ok: z.boolean(),
  /** seg: the segment index acknowledged. */
  index: count.optional(),
  /** init: LSB-first bitmap (base64) of segments the hub already holds. */
  have: base64.optional(),
  error: z.string().max(2000).optional(),
});
export type UploadAck = z.infer<typeof UploadAckSchema>;

/** operator → hub: sign and publish a stored blob to a target. */
export const PublishRequestSchema = z.strictObject({
  type: z.literal('publish'),
  v: z.literal(PROTOCOL_VERSION),
  requestId,
  clientId: name,
  /** The stored blob: its sha256, or a unique prefix of at least 8 hex digits. */
  sha256: z.string().regex(/^[0-9a-f]{8,64}$/, 'expected a sha256 or a prefix of at least 8 lowercase hex digits'),
  target: TargetSchema,
  /** Adapter id to publish under; default: the name the blob was stored with. */
  name: name.optional(),
});
export type PublishRequest = z.infer<typeof PublishRequestSchema>;

/** operator → hub: send a command to a device and relay its result. */
export const CommandRequestSchema = z.strictObject({
  type: z.literal('command-request'),
  v: z.literal(PROTOCOL_VERSION),
  requestId,
  clientId: name,
  deviceId: name,
  action: CommandAction,
  adapter: z.strictObject({ id: name, version: z.number().int().positive().optional() }).optional(),
});
export type CommandRequest = z.infer<typeof CommandRequestSchema>;

/** Just enough of a request to answer it when the rest fails its schema. */
export const ReplyToSchema = z.looseObject({ requestId, clientId: name });

export const ReplySchema = z.strictObject({
  type: z.literal('reply'),
  v: z.literal(PROTOCOL_VERSION),
  requestId,
  ok: z.boolean(),
  error: z.string().max(2000).optional(),
  manifest: z.strictObject({ adapter: z.strictObject({ id: name, version: z.number().int().positive() }), seq: z.number().int().positive(), sha256: hex64, target: TargetSchema }).optional(),
  result: ResultSchema.optional(),
});
export type Reply = z.infer<typeof ReplySchema>;

export const HubStatusSchema = z.strictObject({
  type: z.literal('hub-status'),
  v: z.literal(PROTOCOL_VERSION),
  online: z.boolean(),
  keyId: z.string().regex(/^[0-9a-f]{16}$/).optional(),
  /** Random id of one hub run: tells a running hub's status from a stopped one's will. */
  instance: z.string().regex(/^[0-9a-f]{1,32}$/).optional(),
  /** Inbound messages this hub run refused, and the last one (what, when, on which topic). */
  refused: count.optional(),
  lastRefusal: z.strictObject({ at: isoTime, reason: z.string().max(2000), topic: z.string().max(512) }).nullable().optional(),
  updatedAt: isoTime.optional(),
});
export type HubStatus = z.infer<typeof HubStatusSchema>;

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string };

/** Parses a JSON payload against a schema; the reason names the first failing field. */
export function decodeJson<T>(schema: z.ZodType<T>, payload: Uint8Array, maxBytes = MAX_JSON_BYTES): Decoded<T> {
  if (payload.length > maxBytes) return { ok: false, reason: `oversize message: ${payload.length} bytes > limit ${maxBytes}` };
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.length).toString('utf8'));
  } catch (err) {
    return { ok: false, reason: `malformed JSON: ${(err as Error).message}` };
  }
  const r = schema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0];
    const at = issue && issue.path.length > 0 ? issue.path.join('.') : '(root)';
    return { ok: false, reason: `schema violation at ${at}: ${issue?.message ?? 'invalid'}` };
  }
  return { ok: true, value: r.data };
}

export function encodeJson(msg: unknown): Buffer {
  return Buffer.from(JSON.stringify(msg));
}

// ---- binary frames ----

/** Distribution chunk: "ELC1", blob sha256 (32 bytes), chunk index (u32 BE), chunk count (u32 BE), bytes. */
export const CHUNK_MAGIC = Buffer.from('ELC1', 'ascii');
export const CHUNK_HEADER_BYTES = 44;
/** Upload segment: "ELU1", blob sha256 (32 bytes), segment index (u32 BE), reserved u32 = 0, bytes. */
export const SEGMENT_MAGIC = Buffer.from('ELU1', 'ascii');
export const SEGMENT_HEADER_BYTES = 44;

export interface Frame {
  sha256: string;
  index: number;
  /** chunks: the chunk count; segments: 0. */
  count: number;
  data: Buffer;
}

function encodeFrame(magic: Buffer, sha256: string, index: number, count: number, data: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(CHUNK_HEADER_BYTES + data.length);
  magic.copy(out, 0);
  Buffer.from(sha256, 'hex').copy(out, 4);
  out.writeUInt32BE(index, 36);
  out.writeUInt32BE(count, 40);
  out.set(data, CHUNK_HEADER_BYTES);
  return out;
}

function decodeFrame(magic: Buffer, what: string, payload: Uint8Array): Decoded<Frame> {
  const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.length);
  if (buf.length < CHUNK_HEADER_BYTES) return { ok: false, reason: `${what}: ${buf.length} bytes is shorter than the ${CHUNK_HEADER_BYTES}-byte header` };
  if (!buf.subarray(0, 4).equals(magic)) return { ok: false, reason: `${what}: bad magic (expected "${magic.toString('ascii')}")` };
  return {
    ok: true,
    value: { sha256: buf.subarray(4, 36).toString('hex'), index: buf.readUInt32BE(36), count: buf.readUInt32BE(40), data: buf.subarray(CHUNK_HEADER_BYTES) },
  };
}

/** Chunk index of the end-of-pass marker: an empty frame the hub sends after each (re)broadcast pass. */
export const PASS_END_INDEX = 0xffffffff;

export const encodeChunk = (sha256: string, index: number, count: number, data: Uint8Array) => encodeFrame(CHUNK_MAGIC, sha256, index, count, data);
export const decodeChunk = (payload: Uint8Array) => decodeFrame(CHUNK_MAGIC, 'chunk', payload);
export const encodeSegment = (sha256: string, index: number, data: Uint8Array) => encodeFrame(SEGMENT_MAGIC, sha256, index, 0, data);
export const decodeSegment = (payload: Uint8Array) => decodeFrame(SEGMENT_MAGIC, 'segment', payload);
