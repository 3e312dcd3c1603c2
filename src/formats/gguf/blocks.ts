// ggml block codecs (ggml-common.h / ggml-quants.c) for the types edgelora converts. Decoders turn a
// GGUF tensor [N rows, K] into ONNX Runtime's MatMulNBits layout without re-quantizing (the codes are
// moved, the scales widened to float32); `dequantizeGguf` is the plain float reference (ggml's
// dequantize_row_*), and the q8_0/q4_0 encoders are ggml's quantize_row_*_ref, for export.
import { f16BitsToF32, f32ToF16Bits, bf16BitsToF32 } from '../safetensors.js';
import { EdgeloraError } from '../../util/errors.js';
import { BLOCK, type SupportedType } from './spec.js';

/**
 * A weight in MatMulNBits layout (the same layout as src/quant/int4.ts, with bits):
 *   packed     [N, kBlocks, blockSize·bits/8] uint8 (4 bits: first element in the LOW nibble)
 *   scales     [N, kBlocks] float32
 *   zeroPoints absent (4 bits: 8, 8 bits: 128) or float32 [N, kBlocks] (Q4_K's mins)
 */
export interface NBitsWeight {
  N: number;
  K: number;
  bits: 4 | 8;
  blockSize: number;
  kBlocks: number;
  packed: Uint8Array;
  scales: Float32Array;
  zeroPoints?: Float32Array;
}

const f32 = Math.fround;
const f16 = (raw: Uint8Array, o: number): number => f16BitsToF32(raw[o]! | (raw[o + 1]! << 8));
const i8 = (b: number): number => (b << 24) >> 24;

function checkLength(type: SupportedType, raw: Uint8Array, numel: number, what: string): void {
  const b = BLOCK[type];
  const want = (numel / b.elements) * b.bytes;
  if (numel % b.elements !== 0 || raw.length !== want) {
    throw new EdgeloraError(`${what}: ${type} data of ${raw.length} bytes does not hold ${numel} elements (${want} bytes expected)`);
  }
}

/** Q4_K's 6-bit scale and min of sub-block j (ggml-quants.c get_scale_min_k4). */
export function scaleMinK4(j: number, s: Uint8Array, o: number): { sc: number; m: number } {
  if (j < 4) return { sc: s[o + j]! & 63, m: s[o + j + 4]! & 63 };
  return {
    sc: (s[o + j + 4]! & 0xf) | ((s[o + j - 4]! >> 6) << 4),
    m: (s[o + j + 4]! >> 4) | ((s[o + j]! >> 6) << 4),
  };
}

/** The ggml reference dequantization (dequantize_row_*) of a whole tensor to float32. */
export function dequantizeGguf(type: SupportedType, raw: Uint8Array, numel: number, what = 'tensor'): Float32Array {
  checkLength(type, raw, numel, what);
  const y = new Float32Array(numel);
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  switch (type) {
    case 'F32':
      for (let i = 0; i < numel; i++) y[i] = dv.getFloat32(i * 4, true);
      return y;
    case 'F16':
      for (let i = 0; i < numel; i++) y[i] = f16(raw, i * 2);
      return y;
    case 'BF16':
      for (let i = 0; i < numel; i++) y[i] = bf16BitsToF32(dv.getUint16(i * 2, true));
      return y;
    case 'Q8_0':
      for (let b = 0; b < numel / 32; b++) {
        const o = b * 34;
        const d = f16(raw, o);
        for (let j = 0; j < 32; j++) y[b * 32 + j] = f32(i8(raw[o + 2 + j]!) * d);
      }
      return y;
    case 'Q4_0':
      for (let b = 0; b < numel / 32; b++) {
        const o = b * 18;
        const d = f16(raw, o);
        for (let j = 0; j < 16; j++) {
          const q = raw[o + 2 + j]!;
          y[b * 32 + j] = f32(((q & 0xf) - 8) * d);
          y[b * 32 + j + 16] = f32(((q >> 4) - 8) * d);
        }
      }
      return y;
    case 'Q4_1':
      for (let b = 0; b < numel / 32; b++) {
        const o = b * 20;
        const d = f16(raw, o);
        const m = f16(raw, o + 2);
        for (let j = 0; j < 16; j++) {
          const q = raw[o + 4 + j]!;
          y[b * 32 + j] = f32(f32((q & 0xf) * d) + m);
          y[b * 32 + j + 16] = f32(f32((q >> 4) * d) + m);
        }
      }
      return y;
    case 'Q5_0':
      for (let b = 0; b < numel / 32; b++) {
        const o = b * 22;
        const d = f16(raw, o);
        for (let j = 0; j < 32; j++) y[b * 32 + j] = f32((q5Code(raw, o, j) - 16) * d);
      }
      return y;
    case 'Q4_K':
      for (let b = 0; b < numel / 256; b++) {
        const o = b * 144;
        const d = f16(raw, o);
        const dmin = f16(raw, o + 2);
        for (let c = 0; c < 4; c++) {
          const s0 = scaleMinK4(2 * c, raw, o + 4);
          const s1 = scaleMinK4(2 * c + 1, raw, o + 4);
          const d1 = f32(d * s0.sc), m1 = f32(dmin * s0.m);
          const d2 = f32(d * s1.sc), m2 = f32(dmin * s1.m);
          for (let l = 0; l < 32; l++) {
            const q = raw[o + 16 + c * 32 + l]!;
            y[b * 256 + c * 64 + l] = f32(f32(d1 * (q & 0xf)) - m1);
            y[b * 256 + c * 64 + 32 + l] = f32(f32(d2 * (q >> 4)) - m2);
          }
        }
      }
      return y;
    case 'Q6_K':
      for (let b = 0; b < numel / 256; b++) {
        const o = b * 210;
        const d = f16(raw, o + 208);
        for (let e = 0; e < 256; e++) y[b * 256 + e] = f32(f32(d * i8(raw[o + 192 + q6Sub(e)]!)) * (q6Code(raw, o, e) - 32));
      }
      return y;
  }
}

/** Q5_0's unsigned 5-bit code (0..31) of element j of the block at byte o: nibble as Q4_0, fifth bit in qh. */
function q5Code(raw: Uint8Array, o: number, j: number): number {
  const qh = (raw[o + 2]! | (raw[o + 3]! << 8) | (raw[o + 4]! << 16) | (raw[o + 5]! << 24)) >>> 0;
  const nib = j < 16 ? raw[o + 6 + j]! & 0xf : raw[o + 6 + j - 16]! >> 4;
  return nib | (((qh >>> j) & 1) << 4);
}

/** Index (0..15) of the 16-element sub-block of Q6_K element e, which is also its scale's index. */
function q6Sub(e: number): number {
  return e >> 4;
}

/** Q6_K's unsigned 6-bit code (0..63) of element e of the super-block at byte o. */
function q6Code(raw: Uint8Array, o: number, e: number): number {
  const half = e >> 7; // 128-element halves: ql advances 64 bytes, qh 32
  const r = e & 127;
  const quarter = r >> 5; // which of the four 32-element runs
  const l = r & 31;
  const ql = raw[o + half * 64 + (quarter & 1) * 32 + l]!;
  const lo = quarter < 2 ? ql & 0xf : ql >> 4;
  const hi = (raw[o + 128 + half * 32 + l]! >> (2 * quarter)) & 3;
  return lo | (hi << 4);
}

/**
 * A GGUF linear weight [N, K] (ggml dims [K, N]) → MatMulNBits, codes unchanged:
 *   Q4_0 → 4 bits, block 32, zero point 8 (absent), scale d
 *   Q8_0 → 8 bits, block 32, zero point 128 (absent), codes q + 128, scale d
 *   Q4_K → 4 bits, block 32, scale d·sc, float zero point dmin·m / (d·sc): (q − zp)·scale = d·sc·q − dmin·m
 *   Q6_K → 8 bits, block 16, zero point 128 (absent), codes q + 96 (q − 32 + 128), scale d·sc (exact)
 *   Q5_0 → 8 bits, block 32, zero point 128 (absent), codes q + 112 (q − 16 + 128), scale d (exact)
 *   Q4_1 → 4 bits, block 32, scale d, float zero point −m/d: (q − zp)·d = q·d + m
 * Float types have no NBits form (null): the caller keeps them float32.
 */
export function toNBits(type: SupportedType, raw: Uint8Array, N: number, K: number, what = 'tensor'): NBitsWeight | null {
  checkLength(type, raw, N * K, what);
  switch (type) {
    case 'F32':
    case 'F16':
    case 'BF16':
      return null;
    case 'Q4_0': {
      const kb = K / 32;
      const packed = new Uint8Array(N * kb * 16);
      const scales = new Float32Array(N * kb);
      for (let b = 0; b < N * kb; b++) {
        const o = b * 18;
        scales[b] = f16(raw, o);
        // ggml: element j in the low nibble of qs[j], j+16 in the high; MatMulNBits: 2i low, 2i+1 high.
        for (let i = 0; i < 16; i++) {
          const e0 = 2 * i, e1 = 2 * i + 1;
          const c0 = e0 < 16 ? raw[o + 2 + e0]! & 0xf : raw[o + 2 + e0 - 16]! >> 4;
          const c1 = e1 < 16 ? raw[o + 2 + e1]! & 0xf : raw[o + 2 + e1 - 16]! >> 4;
          packed[b * 16 + i] = c0 | (c1 << 4);
        }
      }
      return { N, K, bits: 4, blockSize: 32, kBlocks: kb, packed, scales };
    }
    case 'Q5_0': {
      const kb = K / 32;
      const packed = new Uint8Array(N * K);
      const scales = new Float32Array(N * kb);
      for (let b = 0; b < N * kb; b++) {
        scales[b] = f16(raw, b * 22);
        for (let j = 0; j < 32; j++) packed[b * 32 + j] = q5Code(raw, b * 22, j) + 112;
      }
      return { N, K, bits: 8, blockSize: 32, kBlocks: kb, packed, scales };
    }
    case 'Q4_1': {
      const kb = K / 32;
      const packed = new Uint8Array(N * kb * 16);
      const scales = new Float32Array(N * kb);
      const zeroPoints = new Float32Array(N * kb);
      for (let b = 0; b < N * kb; b++) {
        const o = b * 20;
        const d = f16(raw, o);
        const m = f16(raw, o + 2);
        if (d === 0) {
          // Every element is m: codes 0 with zero point −1 and scale m give (0 + 1)·m.
          scales[b] = m;
          zeroPoints[b] = m === 0 ? 0 : -1;
          continue;
        }
        scales[b] = d;
        zeroPoints[b] = f32(-m / d);
        for (let i = 0; i < 16; i++) {
          const c = (e: number) => (e < 16 ? raw[o + 4 + e]! & 0xf : raw[o + 4 + e - 16]! >> 4);
          packed[b * 16 + i] = c(2 * i) | (c(2 * i + 1) << 4);
        }
      }
      return { N, K, bits: 4, blockSize: 32, kBlocks: kb, packed, scales, zeroPoints };
    }
    case 'Q8_0': {
      const kb = K / 32;
      const packed = new Uint8Array(N * kb * 32);
      const scales = new Float32Array(N * kb);
      for (let b = 0; b < N * kb; b++) {
        const o = b * 34;
        scales[b] = f16(raw, o);
        for (let j = 0; j < 32; j++) packed[b * 32 + j] = raw[o + 2 + j]! ^ 0x80; // int8 q → q + 128
      }
      return { N, K, bits: 8, blockSize: 32, kBlocks: kb, packed, scales };
    }
    case 'Q4_K': {
      const kb = K / 32;
      const packed = new Uint8Array(N * kb * 16);
      const scales = new Float32Array(N * kb);
      const zeroPoints = new Float32Array(N * kb);
      for (let s = 0; s < (N * K) / 256; s++) {
        const o = s * 144;
        const d = f16(raw, o);
        const dmin = f16(raw, o + 2);
        for (let j = 0; j < 8; j++) {
          const { sc, m } = scaleMinK4(j, raw, o + 4);
          const b = s * 8 + j; // 32-element blocks run along the row, so super-block s holds blocks 8s..8s+7
          const scale = f32(d * sc);
          const min = f32(dmin * m);
          const c = j >> 1;
          const high = (j & 1) === 1;
          if (scale === 0) {
            // Every element is −min: codes 0 with zero point 1 and scale min give (0 − 1)·min.
            scales[b] = min;
            zeroPoints[b] = min === 0 ? 0 : 1;
            continue; // packed stays 0
          }
          scales[b] = scale;
          zeroPoints[b] = f32(min / scale);
          for (let i = 0; i < 16; i++) {
            const q0 = raw[o + 16 + c * 32 + 2 * i]!;
            const q1 = raw[o + 16 + c * 32 + 2 * i + 1]!;
            packed[b * 16 + i] = high ? (q0 >> 4) | (q1 & 0xf0) : (q0 & 0xf) | ((q1 & 0xf) << 4);
          }
        }
      }
      return { N, K, bits: 4, blockSize: 32, kBlocks: kb, packed, scales, zeroPoints };
    }
    case 'Q6_K': {
      const kb = K / 16;
      const packed = new Uint8Array(N * K);
      const scales = new Float32Array(N * kb);
      for (let s = 0; s < (N * K) / 256; s++) {
        const o = s * 210;
        const d = f16(raw, o + 208);
        for (let j = 0; j < 16; j++) scales[s * 16 + j] = f32(d * i8(raw[o + 192 + j]!));
        for (let e = 0; e < 256; e++) packed[s * 256 + e] = q6Code(raw, o, e) + 96;
      }
      return { N, K, bits: 8, blockSize: 16, kBlocks: kb, packed, scales };
    }
  }
}

/** MatMulNBits codes and scales back to float32 [N·K] (the reference for NBitsWeight). */
export function dequantizeNBits(w: NBitsWeight): Float32Array {
  const { N, K, bits, blockSize, kBlocks, packed, scales, zeroPoints } = w;
  const out = new Float32Array(N * K);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      const b = n * kBlocks + Math.floor(k / blockSize);
      const e = n * K + k;
      const q = bits === 8 ? packed[e]! : (e & 1) === 0 ? packed[e >> 1]! & 0xf : packed[e >> 1]! >> 4;
      const zp = zeroPoints ? zeroPoints[b]! : bits === 8 ? 128 : 8;
      out[e] = f32((q - zp) * scales[b]!);
    }
  }
  return out;
}

/** ggml quantize_row_q8_0_ref: d = amax/127, q = round(x/d), d stored as f16. */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  if (x.length % 32 !== 0) throw new EdgeloraError(`q8_0: ${x.length} elements are not whole blocks of 32`);
  const out = new Uint8Array((x.length / 32) * 34);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]!));
    const d = f32(amax / 127);
    const id = d ? f32(1 / d) : 0;
    const h = f32ToF16Bits(d);
    out[b * 34] = h & 0xff;
    out[b * 34 + 1] = h >> 8;
    for (let j = 0; j < 32; j++) {
      const v = f32(x[b * 32 + j]! * id);
      out[b * 34 + 2 + j] = (v < 0 ? -Math.round(-v) : Math.round(v)) & 0xff; // roundf
    }
  }
  return out;
}

/** ggml quantize_row_q4_0_ref: d = (signed extreme)/−8, q = min(15, trunc(x/d + 8.5)). */
export function quantizeQ4_0(x: Float32Array): Uint8Array {
  if (x.length % 32 !== 0) throw new EdgeloraError(`q4_0: ${x.length} elements are not whole blocks of 32`);
  const out = new Uint8Array((x.length / 32) * 18);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = x[b * 32 + j]!;
      if (Math.abs(v) > amax) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = f32(max / -8);
    const id = d ? f32(1 / d) : 0;
    const h = f32ToF16Bits(d);
    out[b * 18] = h & 0xff;
    out[b * 18 + 1] = h >> 8;
    for (let j = 0; j < 16; j++) {
      const x0 = f32(x[b * 32 + j]! * id);
      const x1 = f32(x[b * 32 + 16 + j]! * id);
      const q0 = Math.min(15, Math.trunc(f32(x0 + 8.5)));
      const q1 = Math.min(15, Math.trunc(f32(x1 + 8.5)));
      out[b * 18 + 2 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

/**
 * MatMulNBits 4-bit codes with zero point 8 and block 32 → Q4_0 blocks: the codes move as they are,
 * the scale becomes f16. Exact when every scale is an f16 value; returns how many were not.
 */
export function nbits4ToQ4_0(w: { N: number; K: number; packed: Uint8Array; scales: Float32Array }): { raw: Uint8Array; roundedScales: number } {
  const blocks = (w.N * w.K) / 32;
  const out = new Uint8Array(blocks * 18);
  let rounded = 0;
  for (let b = 0; b < blocks; b++) {
    const s = w.scales[b]!;
    const h = f32ToF16Bits(s);
    if (f16BitsToF32(h) !== s) rounded++;
    out[b * 18] = h & 0xff;
    out[b * 18 + 1] = h >> 8;
    for (let j = 0; j < 16; j++) {
      const c = (e: number) => ((e & 1) === 0 ? w.packed[b * 16 + (e >> 1)]! & 0xf : w.packed[b * 16 + (e >> 1)]! >> 4);
      out[b * 18 + 2 + j] = c(j) | (c(j + 16) << 4);
    }
  }
  return { raw: out, roundedScales: rounded };
}

export function f32Bytes(x: Float32Array): Uint8Array {
  const out = new Uint8Array(x.length * 4);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < x.length; i++) dv.setFloat32(i * 4, x[i]!, true);
  return out;
}
