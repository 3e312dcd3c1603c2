// 4- and 8-bit integer blockwise quantization in ONNX Runtime's com.microsoft.MatMulNBits layout (bits 4 or 8).
//
// The weight is the PyTorch Linear weight [N=out, K=in]; each row n is cut along K into kBlocks = ceil(K/blockSize)
// blocks (K padded with zeros to kBlocks·blockSize). Layouts, bits 4 (FIRST element of each pair in the LOW nibble):
//   packed     [N, kBlocks, blockSize/2]   uint8
//   scales     [N, kBlocks]                float32
//   zeroPoints [N, ceil(kBlocks/2)]        uint8, block 2j in the low nibble, 2j+1 in the high (pad nibble 8)
// bits 8 (one byte per element, the same layout com.microsoft.GatherBlockQuantized reads, so one initializer serves
// a tied table's lookup and its lm_head):
//   packed     [N, kBlocks, blockSize]     uint8
//   scales     [N, kBlocks]                float32
//   zeroPoints [N, kBlocks]                uint8
// Dequantized = (q − zp) · scale, zp = 2^(bits−1) (8 or 128) when zero points are absent (symmetric).
// The arithmetic follows MLAS' BlockwiseQuantizer (range2scalezp / range2scale / quantizeAndTranspose), which is
// what ORT's own MatMul4BitsQuantizer runs; asymmetric (min/max with zero points) is its default.
import { EdgeloraError } from '../util/errors.js';

export interface Int4Options {
  /** Elements of K per scale: a power of two ≥ 16. Default 32. */
  blockSize?: number;
  /** Symmetric (scale only, zero point fixed at 2^(bits−1)) instead of min/max with zero points. Default false. */
  symmetric?: boolean;
  /** Bits per element: 4 (default) or 8. */
  bits?: 4 | 8;
}

export interface Int4Quantized {
  N: number;
  K: number;
  blockSize: number;
  kBlocks: number;
  /** Bits per element; absent means 4 (values written before 8-bit existed). */
  bits?: 4 | 8;
  /** [N, kBlocks, blockSize·bits/8] */
  packed: Uint8Array;
  /** [N, kBlocks] */
  scales: Float32Array;
  /**
   * uint8: bits 4 [N, ceil(kBlocks/2)], bits 8 [N, kBlocks]; absent for symmetric quantization (the kernel
   * then uses 2^(bits−1)). Float zero points [N, kBlocks] (MatMulNBits takes the type of A) hold GGUF
   * Q4_K's/Q4_1's mins.
   */
  zeroPoints?: Uint8Array | Float32Array;
}

/**
 * Bytes of packed codes per block, and zero points per row, for a bit width: the one place this arithmetic
 * lives. Float zero points (`floatZeroPoints`) are one per block whatever the bits; uint8 ones pack two
 * 4-bit points a byte.
 */
export function int4Layout(bits: 4 | 8, blockSize: number, kBlocks: number, floatZeroPoints = false): { blob: number; zpRow: number } {
  const blob = bits === 8 ? blockSize : blockSize / 2;
  return { blob, zpRow: bits === 8 || floatZeroPoints ? kBlocks : Math.ceil(kBlocks / 2) };
}

const f32 = Math.fround;

/** C's roundf: halves away from zero. */
function roundf(x: number): number {
  return x < 0 ? -Math.round(-x) : Math.round(x);
}

function checkShape(w: Float32Array, N: number, K: number, blockSize: number): void {
  if (!Number.isInteger(N) || !Number.isInteger(K) || N <= 0 || K <= 0 || w.length !== N * K) {
    throw new EdgeloraError(`int4: weight of ${w.length} values does not match N=${N} × K=${K}`);
  }
  if (!Number.isInteger(blockSize) || blockSize < 16 || (blockSize & (blockSize - 1)) !== 0) {
    throw new EdgeloraError(`int4: block size ${blockSize} is not a power of two ≥ 16`, {
      hint: 'MatMulNBits takes 16, 32 (default), 64, 128, 256, …',
    });
  }
}

export function quantizeInt4(w: Float32Array, N: number, K: number, opts: Int4Options = {}): Int4Quantized & { zeroPoints?: Uint8Array } {
  const blockSize = opts.blockSize ?? 32;
  const symmetric = opts.symmetric ?? false;
  const bits = opts.bits ?? 4;
  if (bits !== 4 && bits !== 8) throw new EdgeloraError(`int4: bits ${String(bits)} is not 4 or 8`);
  checkShape(w, N, K, blockSize);
  const kBlocks = Math.ceil(K / blockSize);
  const { blob, zpRow } = int4Layout(bits, blockSize, kBlocks);
  const qMax = (1 << bits) - 1; // 15 or 255
  const mid = 1 << (bits - 1); // 8 or 128: the symmetric zero point
  const packed = new Uint8Array(N * kBlocks * blob);
  const scales = new Float32Array(N * kBlocks);
  // Pad nibbles of an odd kBlocks stay 8, as MLAS leaves them.
  const zeroPoints = symmetric ? undefined : new Uint8Array(N * zpRow).fill(bits === 8 ? mid : 0x88);
  for (let n = 0; n < N; n++) {
    const row = n * K;
    for (let b = 0; b < kBlocks; b++) {
      const k0 = b * blockSize;
      const k1 = Math.min(k0 + blockSize, K);
      let min = Infinity;
      let max = -Infinity;
      for (let k = k0; k < k1; k++) {
        const v = w[row + k]!;
        if (v < min) min = v;
        if (v > max) max = v;
      }
      if (k1 - k0 < blockSize) {
        // the zero padding takes part in the range
        if (min > 0) min = 0;
        if (max < 0) max = 0;
      }
      let scale: number;
      let zp: number;
      if (symmetric) {
        // range2scale: the signed extreme of larger magnitude maps to −2^(bits−1) (scale may be negative).
        const m = Math.abs(max) > Math.abs(min) ? max : min;
        scale = f32(m / -mid);
        zp = mid;
      } else {
        // range2scalezp: the range always contains 0, so 0 is exactly representable.
        const lo = Math.min(min, 0);
        const hi = Math.max(max, 0);
        scale = f32(f32(hi - lo) / qMax);
        const zpf = scale !== 0 ? f32(0 - f32(lo / scale)) : lo;
        zp = zpf < 0 ? 0 : zpf > qMax ? qMax : roundf(zpf);
        if (bits === 8) zeroPoints![n * zpRow + b] = zp;
        else {
          const zi = n * zpRow + (b >> 1);
          zeroPoints![zi] = (b & 1) === 0 ? (zeroPoints![zi]! & 0xf0) | zp : (zeroPoints![zi]! & 0x0f) | (zp << 4);
        }
      }
      scales[n * kBlocks + b] = scale;
      const rs = scale !== 0 ? f32(1 / scale) : 0;
      const base = (n * kBlocks + b) * blob;
      if (bits === 8) {
        for (let j = 0; j < blockSize; j++) {
          const k = k0 + j;
          const v = k < K ? w[row + k]! : 0;
          packed[base + j] = Math.min(qMax, Math.max(0, roundf(f32(f32(v * rs) + zp))));
        }
        continue;
      }
      for (let j = 0; j < blockSize; j += 2) {
        const k = k0 + j;
        const v0 = k < K ? w[row + k]! : 0;
        const v1 = k + 1 < K ? w[row + k + 1]! : 0;
        const q0 = Math.min(15, Math.max(0, roundf(f32(f32(v0 * rs) + zp))));
        const q1 = Math.min(15, Math.max(0, roundf(f32(f32(v1 * rs) + zp))));
        packed[base + (j >> 1)] = q0 | (q1 << 4);
      }
    }
  }
  return zeroPoints
    ? { N, K, blockSize, kBlocks, bits, packed, scales, zeroPoints }
    : { N, K, blockSize, kBlocks, bits, packed, scales };
}

/** (q − zp) · scale in float32 → [N*K] row-major (the padding past K dropped). */
export function dequantizeInt4(q: Int4Quantized): Float32Array {
  const { N, K, blockSize, packed, scales, zeroPoints } = q;
  const bits = q.bits ?? 4;
  const kBlocks = Math.ceil(K / blockSize);
  const floatZp = zeroPoints instanceof Float32Array;
  const { blob, zpRow } = int4Layout(bits, blockSize, kBlocks, floatZp);
  const mid = 1 << (bits - 1);
  if (packed.length !== N * kBlocks * blob || scales.length !== N * kBlocks) {
    throw new EdgeloraError(
      `int${bits}: N=${N} K=${K} block ${blockSize} needs ${N * kBlocks * blob} packed bytes and ${N * kBlocks} scales, got ${packed.length} and ${scales.length}`,
    );
  }
  if (zeroPoints && zeroPoints.length !== N * zpRow) {
    throw new EdgeloraError(`int${bits}: expected ${N * zpRow} zero points, got ${zeroPoints.length}`);
  }
  const out = new Float32Array(N * K);
  for (let n = 0; n < N; n++) {
    for (let b = 0; b < kBlocks; b++) {
      const scale = scales[n * kBlocks + b]!;
      let zp = mid;
      if (zeroPoints && (floatZp || bits === 8)) zp = zeroPoints[n * zpRow + b]!;
      else if (zeroPoints) {
        const byte = zeroPoints[n * zpRow + (b >> 1)]!;
        zp = (b & 1) === 0 ? byte & 0x0f : byte >> 4;
      }
      const base = (n * kBlocks + b) * blob;
      const k0 = b * blockSize;
      const k1 = Math.min(k0 + blockSize, K);
      for (let k = k0; k < k1; k++) {
        const j = k - k0;
        let c: number;
        if (bits === 8) c = packed[base + j]!;
        else {
          const byte = packed[base + (j >> 1)]!;
          c = (j & 1) === 0 ? byte & 0x0f : byte >> 4;
        }
        out[n * K + k] = Math.fround((c - zp) * scale);
      }
    }
  }
  return out;
}

/** Storage bytes of an int4/int8 weight: packed codes + float32 scales + packed zero points. */
export function int4Bytes(q: Int4Quantized): number {
  return q.packed.byteLength + q.scales.byteLength + (q.zeroPoints?.byteLength ?? 0);
}
