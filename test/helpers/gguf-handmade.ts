// A minimal GGUF v3 writer for tests, written byte by byte from the published spec (ggml/docs/gguf.md)
// and ggml's reference block encoders (quantize_row_*_ref): it shares no code with src/formats/gguf,
// so files it makes are "written by code that is not our exporter". Blocks are built from chosen codes
// and scales, so every element's exact value is known to the test.
import { writeFileSync } from 'node:fs';
import { Rng } from '../../src/util/rng.js';

export type HmValue =
  | { t: 'str'; v: string }
  | { t: 'u32'; v: number }
  | { t: 'f32'; v: number }
  | { t: 'bool'; v: boolean }
  | { t: 'str[]'; v: string[] }
  | { t: 'i32[]'; v: number[] }
  | { t: 'f32[]'; v: number[] };

export interface HmTensor {
  name: string;
  dims: number[]; // ggml order
  type: number; // ggml_type id
  bytes: Uint8Array;
}

/** ggml_type ids from ggml.h, typed again here on purpose. */
export const T = { F32: 0, F16: 1, Q4_0: 2, Q4_1: 3, Q5_0: 6, Q5_1: 7, Q8_0: 8, Q4_K: 12, Q6_K: 14, BF16: 30 } as const;

function le(n: number, bytes: number): number[] {
  const out: number[] = [];
  let v = BigInt(n);
  for (let i = 0; i < bytes; i++) {
    out.push(Number(v & 0xffn));
    v >>= 8n;
  }
  return out;
}
function f32le(x: number): number[] {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setFloat32(0, x, true);
  return [...b];
}
function str(s: string): number[] {
  const b = [...new TextEncoder().encode(s)];
  return [...le(b.length, 8), ...b];
}

/** IEEE half bits of x (x must be exactly representable: tests pick such values). */
export function halfBits(x: number): number {
  if (x === 0) return 0;
  const sign = x < 0 ? 0x8000 : 0;
  let a = Math.abs(x);
  let e = Math.floor(Math.log2(a));
  if (e < -14) return sign | Math.round(a / 2 ** -24); // subnormal
  let m = a / 2 ** e - 1;
  let mant = Math.round(m * 1024);
  if (mant === 1024) {
    mant = 0;
    e++;
  }
  return sign | ((e + 15) << 10) | mant;
}
export function halfValue(bits: number): number {
  const e = (bits >> 10) & 31;
  const m = bits & 1023;
  const s = bits & 0x8000 ? -1 : 1;
  return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15);
}

export function buildGguf(kv: [string, HmValue][], tensors: HmTensor[], align = 32, lieOffset?: { name: string; offset: number }): Uint8Array {
  const out: number[] = [];
  out.push(...[0x47, 0x47, 0x55, 0x46]); // "GGUF"
  out.push(...le(3, 4), ...le(tensors.length, 8), ...le(kv.length, 8));
  for (const [k, val] of kv) {
    out.push(...str(k));
    switch (val.t) {
      case 'str': out.push(...le(8, 4), ...str(val.v)); break;
      case 'u32': out.push(...le(4, 4), ...le(val.v, 4)); break;
      case 'f32': out.push(...le(6, 4), ...f32le(val.v)); break;
      case 'bool': out.push(...le(7, 4), val.v ? 1 : 0); break;
      case 'str[]': out.push(...le(9, 4), ...le(8, 4), ...le(val.v.length, 8)); for (const s of val.v) out.push(...str(s)); break;
      case 'i32[]': out.push(...le(9, 4), ...le(5, 4), ...le(val.v.length, 8)); for (const x of val.v) out.push(...le(x >>> 0, 4)); break;
      case 'f32[]': out.push(...le(9, 4), ...le(6, 4), ...le(val.v.length, 8)); for (const x of val.v) out.push(...f32le(x)); break;
    }
  }
  let off = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    offsets.push(off);
    out.push(...str(t.name), ...le(t.dims.length, 4));
    for (const d of t.dims) out.push(...le(d, 8));
    out.push(...le(t.type, 4), ...le(lieOffset?.name === t.name ? lieOffset.offset : off, 8));
    off = Math.ceil((off + t.bytes.length) / align) * align;
  }
  const dataStart = Math.ceil(out.length / align) * align;
  const file = new Uint8Array(dataStart + off);
  file.set(out);
  tensors.forEach((t, i) => file.set(t.bytes, dataStart + offsets[i]!));
  return file;
}

export function writeGgufFile(file: string, kv: [string, HmValue][], tensors: HmTensor[], lieOffset?: { name: string; offset: number }): void {
  writeFileSync(file, buildGguf(kv, tensors, 32, lieOffset));
}

/** Random tensor bytes of a type with the exact float value of every element (row-major [rows, cols]). */
export function randomTensor(type: number, rows: number, cols: number, rng: Rng, std = 0.05): { bytes: Uint8Array; values: Float64Array } {
  const n = rows * cols;
  const values = new Float64Array(n);
  const halfOf = (x: number) => halfValue(halfBits(x)); // a value f16 holds exactly
  switch (type) {
    case T.F32: {
      const b = new Uint8Array(n * 4);
      const dv = new DataView(b.buffer);
      for (let i = 0; i < n; i++) {
        dv.setFloat32(i * 4, rng.normal() * std, true);
        values[i] = dv.getFloat32(i * 4, true);
      }
      return { bytes: b, values };
    }
    case T.F16:
    case T.BF16: {
      const b = new Uint8Array(n * 2);
      for (let i = 0; i < n; i++) {
        let bits: number;
        if (type === T.F16) {
          bits = halfBits(rng.normal() * std);
          values[i] = halfValue(bits);
        } else {
          const f = new Float32Array([rng.normal() * std]);
          bits = new Uint32Array(f.buffer)[0]! >>> 16; // truncation: the value is then exactly this bf16
          values[i] = new Float32Array(new Uint32Array([bits << 16]).buffer)[0]!;
        }
        b[i * 2] = bits & 0xff;
        b[i * 2 + 1] = bits >> 8;
      }
      return { bytes: b, values };
    }
    case T.Q8_0: {
      const b = new Uint8Array((n / 32) * 34);
      for (let blk = 0; blk < n / 32; blk++) {
        const d = halfOf(std / 40 * (0.5 + rng.next()));
        const h = halfBits(d);
        b[blk * 34] = h & 0xff;
        b[blk * 34 + 1] = h >> 8;
        for (let j = 0; j < 32; j++) {
          const q = Math.max(-127, Math.min(127, Math.round(rng.normal() * 40)));
          b[blk * 34 + 2 + j] = q & 0xff;
          values[blk * 32 + j] = q * d;
        }
      }
      return { bytes: b, values };
    }
    case T.Q4_0: {
      const b = new Uint8Array((n / 32) * 18);
      for (let blk = 0; blk < n / 32; blk++) {
        const d = halfOf(std / 3 * (0.5 + rng.next()));
        const h = halfBits(d);
        b[blk * 18] = h & 0xff;
        b[blk * 18 + 1] = h >> 8;
        const q = Array.from({ length: 32 }, () => rng.int(16));
        for (let j = 0; j < 16; j++) b[blk * 18 + 2 + j] = q[j]! | (q[j + 16]! << 4); // quantize_row_q4_0_ref
        for (let j = 0; j < 32; j++) values[blk * 32 + j] = (q[j]! - 8) * d;
      }
      return { bytes: b, values };
    }
    case T.Q4_1: {
      const b = new Uint8Array((n / 32) * 20);
      for (let blk = 0; blk < n / 32; blk++) {
        const d = halfOf(std / 3 * (0.5 + rng.next()));
        const m = halfOf(-std * 2.5 * (0.5 + rng.next()));
        const dh = halfBits(d), mh = halfBits(m);
        b[blk * 20] = dh & 0xff; b[blk * 20 + 1] = dh >> 8; b[blk * 20 + 2] = mh & 0xff; b[blk * 20 + 3] = mh >> 8;
        const q = Array.from({ length: 32 }, () => rng.int(16));
        for (let j = 0; j < 16; j++) b[blk * 20 + 4 + j] = q[j]! | (q[j + 16]! << 4); // quantize_row_q4_1_ref
        for (let j = 0; j < 32; j++) values[blk * 32 + j] = Math.fround(Math.fround(q[j]! * d) + m);
      }
      return { bytes: b, values };
    }
    case T.Q5_0: {
      const b = new Uint8Array((n / 32) * 22);
      for (let blk = 0; blk < n / 32; blk++) {
        const o = blk * 22;
        const d = halfOf(std / 6 * (0.5 + rng.next()));
        const dh = halfBits(d);
        b[o] = dh & 0xff; b[o + 1] = dh >> 8;
        const q = Array.from({ length: 32 }, () => rng.int(32));
        // quantize_row_q5_0_ref: low nibbles as Q4_0, fifth bits of elements j and j+16 at qh bits j and j+16
        let qh = 0;
        for (let j = 0; j < 16; j++) {
          b[o + 6 + j] = (q[j]! & 0xf) | ((q[j + 16]! & 0xf) << 4);
          qh |= ((q[j]! & 0x10) >> 4) << j;
          qh |= ((q[j + 16]! & 0x10) >> 4) << (j + 16);
        }
        for (let k = 0; k < 4; k++) b[o + 2 + k] = (qh >>> (8 * k)) & 0xff;
        for (let j = 0; j < 32; j++) values[blk * 32 + j] = (q[j]! - 16) * d;
      }
      return { bytes: b, values };
    }
    case T.Q4_K: {
      const b = new Uint8Array((n / 256) * 144);
      for (let s = 0; s < n / 256; s++) {
        const o = s * 144;
        const d = halfOf(std / 300 * (0.5 + rng.next()));
        const dmin = halfOf(std / 60 * (0.5 + rng.next()));
        const dh = halfBits(d), mh = halfBits(dmin);
        b[o] = dh & 0xff; b[o + 1] = dh >> 8; b[o + 2] = mh & 0xff; b[o + 3] = mh >> 8;
        const sc = Array.from({ length: 8 }, () => 20 + rng.int(44));
        const m = Array.from({ length: 8 }, () => 10 + rng.int(40));
        // quantize_row_q4_K_ref's packing of 6-bit scales and mins into 12 bytes
        for (let j = 0; j < 8; j++) {
          if (j < 4) {
            b[o + 4 + j] = sc[j]!;
            b[o + 4 + j + 4] = m[j]!;
          } else {
            b[o + 4 + j + 4] = (sc[j]! & 0xf) | ((m[j]! & 0xf) << 4);
            b[o + 4 + j - 4] = b[o + 4 + j - 4]! | ((sc[j]! >> 4) << 6);
            b[o + 4 + j] = b[o + 4 + j]! | ((m[j]! >> 4) << 6);
          }
        }
        const L = Array.from({ length: 256 }, () => rng.int(16));
        for (let j = 0; j < 256; j += 64) for (let l = 0; l < 32; l++) b[o + 16 + j / 2 + l] = L[j + l]! | (L[j + l + 32]! << 4);
        for (let e = 0; e < 256; e++) {
          const sub = e >> 5;
          values[s * 256 + e] = Math.fround(Math.fround(d * sc[sub]!) * L[e]! - Math.fround(dmin * m[sub]!));
        }
      }
      return { bytes: b, values };
    }
    case T.Q6_K: {
      const b = new Uint8Array((n / 256) * 210);
      for (let s = 0; s < n / 256; s++) {
        const o = s * 210;
        const d = halfOf(std / 1000 * (0.5 + rng.next()));
        const dh = halfBits(d);
        b[o + 208] = dh & 0xff; b[o + 209] = dh >> 8;
        const sc = Array.from({ length: 16 }, () => (rng.int(2) ? 1 : -1) * (10 + rng.int(60)));
        for (let j = 0; j < 16; j++) b[o + 192 + j] = sc[j]! & 0xff;
        const L = Array.from({ length: 256 }, () => rng.int(64));
        // quantize_row_q6_K_ref's packing: low nibbles in ql, high two bits in qh
        for (let j = 0; j < 256; j += 128) {
          const ql = o + j / 2, qh = o + 128 + j / 4;
          for (let l = 0; l < 32; l++) {
            const q1 = L[j + l]! & 0xf, q2 = L[j + l + 32]! & 0xf, q3 = L[j + l + 64]! & 0xf, q4 = L[j + l + 96]! & 0xf;
            b[ql + l] = q1 | (q3 << 4);
            b[ql + l + 32] = q2 | (q4 << 4);
            b[qh + l] = (L[j + l]! >> 4) | ((L[j + l + 32]! >> 4) << 2) | ((L[j + l + 64]! >> 4) << 4) | ((L[j + l + 96]! >> 4) << 6);
          }
        }
        for (let e = 0; e < 256; e++) values[s * 256 + e] = Math.fround(d * sc[e >> 4]!) * (L[e]! - 32);
      }
      return { bytes: b, values };
    }
    default:
      throw new Error(`randomTensor: type ${type} not made here`);
  }
}

export interface SpmVocab {
  tokens: string[];
  scores: number[];
  types: number[];
}

/**
 * A SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens <0xXX>, "▁" and single
 * characters, then every prefix of "▁word" for the given words (so each word is reachable by merges),
 * with distinct random scores.
 */
export function spmVocab(words: string[], rng: Rng): SpmVocab {
  const tokens = ['<unk>', '<s>', '</s>'];
  const types = [2, 3, 3];
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(6);
  }
  const seen = new Set<string>();
  const add = (t: string) => {
    if (seen.has(t)) return;
    seen.add(t);
    tokens.push(t);
    types.push(1);
  };
  add('▁');
  for (const ch of 'abcdefghijklmnopqrstuvwxyzTHW.,!?') add(ch);
  for (const w of words) {
    const chars = [...`▁${w}`];
    for (let i = 2; i <= chars.length; i++) add(chars.slice(0, i).join(''));
    // some inner pieces too, so several merge paths compete
    if (chars.length > 3) add(chars.slice(1, 3).join(''));
  }
  const scores = tokens.map((_, i) => (i < 259 ? 0 : -rng.next() * 100));
  return { tokens, scores, types };
}

/** The demo tokenizer's vocabulary in the form handmadeLlama takes. */
export function demoVocab(tj: { added_tokens: { id: number; content: string }[]; model: { vocab: Record<string, number>; merges: [string, string][] } }) {
  return {
    vocab: tj.model.vocab,
    merges: tj.model.merges.map((m) => m.join(' ')),
    special: new Map(tj.added_tokens.map((a) => [a.id, a.content])),
    bos: tj.added_tokens[0]!.id,
    eos: tj.added_tokens[1]!.id,
  };
}

/**
 * Linear weights' scale: small enough that the random network does not amplify a perturbation from
 * layer to layer (the tolerances against llama.cpp assume rounding errors add up, not grow).
 */
const LINEAR_STD = 0.03;
/** Embedding (tied output) scale: logits of a few units, so the softmax keeps most of the vocabulary above float32's normal range. */
const EMBED_STD = 0.1;

export interface HandmadeModel {
  file: string;
  /** HF-shaped facts the test needs. */
  layers: number;
  vocab: number;
}

/**
 * A small llama-architecture GGUF (2 layers, C 256, F 512, 4 heads, 2 kv heads) whose seven linears
 * are all `linearType`, with the demo tokenizer's vocabulary. C and F are multiples of 256, so the
 * K-quants (super-blocks of 256 along a row) fit. q/k rows are stored as llama.cpp stores them.
 */
export function handmadeLlama(
  file: string,
  linearType: number,
  tokenizer: { vocab: Record<string, number>; merges: string[]; special: Map<number, string>; bos: number; eos: number },
  seed = 7,
  opts: { /** a SentencePiece vocabulary instead of the BPE one */ spm?: SpmVocab; /** Q4_K_M-like: attn_v and ffn_down in this type instead */ mixed?: number; arch?: string; /** one tensor of another type (bytes of zeros), e.g. Q5_0 */ odd?: { name: string; type: number; blockBytes: number }; lieOffset?: { name: string; offset: number } } = {},
): HandmadeModel {
  const rng = new Rng(seed);
  const C = 256, F = 512, H = 4, G = 2, D = 64, L = 2;
  let tokens: string[] = [];
  for (const [t, id] of Object.entries(tokenizer.vocab)) tokens[id] = t;
  for (const [id, t] of tokenizer.special) tokens[id] = t;
  let types: number[] = tokens.map((_, id) => (tokenizer.special.has(id) ? 3 : 1));
  if (opts.spm) {
    tokens = opts.spm.tokens;
    types = opts.spm.types;
  }
  const V = tokens.length;
  const arch = opts.arch ?? 'llama';
  const kv: [string, HmValue][] = [
    ['general.architecture', { t: 'str', v: arch }],
    ['general.name', { t: 'str', v: 'handmade' }],
    [`${arch}.context_length`, { t: 'u32', v: 512 }],
    [`${arch}.embedding_length`, { t: 'u32', v: C }],
    [`${arch}.block_count`, { t: 'u32', v: L }],
    [`${arch}.feed_forward_length`, { t: 'u32', v: F }],
    [`${arch}.attention.head_count`, { t: 'u32', v: H }],
    [`${arch}.attention.head_count_kv`, { t: 'u32', v: G }],
    [`${arch}.attention.layer_norm_rms_epsilon`, { t: 'f32', v: 1e-5 }],
    [`${arch}.rope.freq_base`, { t: 'f32', v: 10000 }],
    [`${arch}.rope.dimension_count`, { t: 'u32', v: D }],
    ...((opts.spm
      ? [
          ['tokenizer.ggml.model', { t: 'str', v: 'llama' }],
          ['tokenizer.ggml.tokens', { t: 'str[]', v: tokens }],
          ['tokenizer.ggml.scores', { t: 'f32[]', v: opts.spm.scores }],
          ['tokenizer.ggml.token_type', { t: 'i32[]', v: types }],
          ['tokenizer.ggml.bos_token_id', { t: 'u32', v: 1 }],
          ['tokenizer.ggml.eos_token_id', { t: 'u32', v: 2 }],
          ['tokenizer.ggml.unknown_token_id', { t: 'u32', v: 0 }],
          ['tokenizer.ggml.add_bos_token', { t: 'bool', v: true }],
        ]
      : [
          ['tokenizer.ggml.model', { t: 'str', v: 'gpt2' }],
          ['tokenizer.ggml.pre', { t: 'str', v: 'gpt-2' }],
          ['tokenizer.ggml.tokens', { t: 'str[]', v: tokens }],
          ['tokenizer.ggml.token_type', { t: 'i32[]', v: types }],
          ['tokenizer.ggml.merges', { t: 'str[]', v: tokenizer.merges }],
          ['tokenizer.ggml.bos_token_id', { t: 'u32', v: tokenizer.bos }],
          ['tokenizer.ggml.eos_token_id', { t: 'u32', v: tokenizer.eos }],
          ['tokenizer.ggml.add_bos_token', { t: 'bool', v: false }],
        ]) as [string, HmValue][]),
  ];
  const tensors: HmTensor[] = [];
  const norm = (name: string) => {
    const b = new Uint8Array(C * 4);
    const dv = new DataView(b.buffer);
    for (let i = 0; i < C; i++) dv.setFloat32(i * 4, 1 + 0.1 * rng.normal(), true);
    tensors.push({ name, dims: [C], type: T.F32, bytes: b });
  };
  tensors.push({ name: 'token_embd.weight', dims: [C, V], type: T.F32, bytes: randomTensor(T.F32, V, C, rng, EMBED_STD).bytes });
  for (let l = 0; l < L; l++) {
    norm(`blk.${l}.attn_norm.weight`);
    const lin = (name: string, N: number, K: number) => {
      const full = `blk.${l}.${name}.weight`;
      if (opts.odd?.name === full) tensors.push({ name: full, dims: [K, N], type: opts.odd.type, bytes: new Uint8Array((N * K / 32) * opts.odd.blockBytes) });
      else {
        const type = opts.mixed !== undefined && (name === 'attn_v' || name === 'ffn_down') ? opts.mixed : linearType;
        tensors.push({ name: full, dims: [K, N], type, bytes: randomTensor(type, N, K, rng, LINEAR_STD).bytes });
      }
      // qwen2 carries q/k/v biases (and uses NEOX rope: its q/k rows are not permuted).
      if (arch === 'qwen2' && ['attn_q', 'attn_k', 'attn_v'].includes(name)) {
        tensors.push({ name: `blk.${l}.${name}.bias`, dims: [N], type: T.F32, bytes: randomTensor(T.F32, 1, N, rng, 0.3).bytes });
      }
    };
    lin('attn_q', H * D, C);
    lin('attn_k', G * D, C);
    lin('attn_v', G * D, C);
    lin('attn_output', C, H * D);
    norm(`blk.${l}.ffn_norm.weight`);
    lin('ffn_gate', F, C);
    lin('ffn_up', F, C);
    lin('ffn_down', C, F);
  }
  norm('output_norm.weight');
  writeGgufFile(file, kv, tensors, opts.lieOffset);
  return { file, layers: L, vocab: V };
}
