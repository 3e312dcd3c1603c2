// bitsandbytes-exact 4-bit quantization (NF4 / FP4, blockwise absmax) and its nested ("double") absmax
// quantization: the layout ONNX Runtime's com.microsoft.MatMulBnb4 consumes.
//
// Reproduces bitsandbytes' CUDA kernels (csrc/kernels.cu: kQuantizeBlockwise, dQuantizeNF4, dQuantizeFP4,
// dQuantize<0>) step by step in float32 (Math.fround), so packed codes match byte for byte:
//   scaled = x · fround(1/absmax); code = decision tree over float32 midpoints (a value on a midpoint goes to the
//   lower code); two codes per byte, FIRST element in the HIGH nibble.
// n elements are split in blocks of `blockSize` over the flat row-major [N=out, K=in] weight; the last block
// may be partial. An all-zero block has absmax 0: bitsandbytes then scales by 1/0 = inf, 0·inf = NaN, and its
// decision trees send NaN to code 0 (NF4: -1.0·0, FP4: +0·0), so it dequantizes to zero; we do the same.
import { EdgeloraError } from '../util/errors.js';

export type Bnb4Type = 'nf4' | 'fp4';

export interface Bnb4Options {
  quantType: Bnb4Type;
  /** Elements per absmax block: a power of two, 16–4096 (bitsandbytes' default for 4-bit is 64). */
  blockSize: number;
}

export interface Bnb4Quantized {
  /** ceil(n/2) bytes; element 2i in the high nibble of byte i, element 2i+1 in the low nibble. */
  packed: Uint8Array;
  /** ceil(n/blockSize) per-block absolute maxima. */
  absmax: Float32Array;
}

const f32 = Math.fround;

/** NF4 codebook (bitsandbytes' create_normal_map, as float32), indexed by the 4-bit code. */
export const NF4_CODE: Float32Array = new Float32Array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

/** FP4 (e2m1, bitsandbytes' bit pattern) codebook indexed by the 4-bit code: bit 3 is the sign; values / 12. */
export const FP4_CODE: Float32Array = new Float32Array(
  [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3].map((v) => v / 12),
);

export function codebook(quantType: Bnb4Type): Float32Array {
  return quantType === 'nf4' ? NF4_CODE : FP4_CODE;
}

// dQuantizeNF4's thresholds (float literals in the kernel: compare in float32).
const N0 = f32(0.03979014977812767);
const N1 = f32(0.3893125355243683);
const N11 = f32(0.6427869200706482);
const N111 = f32(0.8614784181118011);
const N110 = f32(0.5016634166240692);
const N10 = f32(0.2035212516784668);
const N101 = f32(0.2920137718319893);
const N100 = f32(0.1202552504837513);
const M0 = f32(-0.33967943489551544);
const M01 = f32(-0.13791173323988914);
const M011 = f32(-0.045525018125772476);
const M010 = f32(-0.23460740596055984);
const M00 = f32(-0.6106329262256622);
const M001 = f32(-0.4599952697753906);
const M000 = f32(-0.8480964004993439);

/** The 4-bit NF4 code of a value already scaled into [-1, 1] (bitsandbytes' dQuantizeNF4, NaN → 0). */
export function quantizeNF4Value(x: number): number {
  if (x > N0) {
    if (x > N1) {
      if (x > N11) return x > N111 ? 0b1111 : 0b1110;
      return x > N110 ? 0b1101 : 0b1100;
    }
    if (x > N10) return x > N101 ? 0b1011 : 0b1010;
    return x > N100 ? 0b1001 : 0b1000;
  }
  if (x > M0) {
    if (x > M01) return x > M011 ? 0b0111 : 0b0110;
    return x > M010 ? 0b0101 : 0b0100;
  }
  if (x > M00) return x > M001 ? 0b0011 : 0b0010;
  return x > M000 ? 0b0001 : 0b0000;
}

const F3 = f32(0.29166667);
const F31 = f32(0.583333);
const F311 = f32(0.8333333);
const F310 = f32(0.4166667);
const F30 = f32(0.0859375);
const F301 = f32(0.20833333);
const F300 = f32(0.00260417);

/** The 4-bit FP4 code of a value already scaled into [-1, 1] (bitsandbytes' dQuantizeFP4, NaN → 0). */
export function quantizeFP4Value(x: number): number {
  const sign = x < 0 ? 0b1000 : 0;
  const a = Math.abs(x);
  if (a > F3) {
    if (a > F31) return (a > F311 ? 0b0011 : 0b0010) + sign;
    return (a > F310 ? 0b0101 : 0b0100) + sign;
  }
  if (a > F30) return (a > F301 ? 0b0111 : 0b0110) + sign;
  return (a > F300 ? 0b0001 : 0b0000) + sign;
}

function checkBlockSize(blockSize: number, where: string, min = 16): void {
  if (!Number.isInteger(blockSize) || blockSize < min || blockSize > 4096 || (blockSize & (blockSize - 1)) !== 0) {
    throw new EdgeloraError(`block size ${blockSize} is not a power of two in ${min}–4096`, {
      where,
      hint: 'use 32, 64 (the bitsandbytes default), 128 or 256',
    });
  }
}

/** Quantizes a flat float32 weight exactly as bitsandbytes' quantize_4bit does (see the file header). */
export function quantizeBnb4(w: Float32Array, opts: Bnb4Options): Bnb4Quantized {
  const { blockSize } = opts;
  checkBlockSize(blockSize, 'quantizeBnb4');
  const n = w.length;
  const nBlocks = Math.ceil(n / blockSize);
  const packed = new Uint8Array(Math.ceil(n / 2));
  const absmax = new Float32Array(nBlocks);
  const q = opts.quantType === 'nf4' ? quantizeNF4Value : quantizeFP4Value;
  for (let b = 0; b < nBlocks; b++) {
    const start = b * blockSize;
    const end = Math.min(start + blockSize, n);
    let m = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(w[i]!);
      if (a > m) m = a;
    }
    absmax[b] = m;
    // float32 reciprocal then float32 product, as the kernel does (x * (1.0f / absmax)); 1/0 = inf.
    const inv = f32(1 / m);
    // Blocks hold an even count (blockSize ≥ 16), so pairs never straddle blocks; the kernel loads the
    // element past an odd n as 0, which is quantized into the final low nibble.
    for (let i = start; i < end; i += 2) {
      const hi = q(f32(w[i]! * inv));
      const lo = q(f32((i + 1 < end ? w[i + 1]! : 0) * inv));
      packed[i >> 1] = (hi << 4) | lo;
    }
  }
  return { packed, absmax };
}

/** Dequantizes: code[q] · absmax[i / blockSize] in float32, as bitsandbytes' dequantize_4bit does. */
export function dequantizeBnb4(
  packed: Uint8Array,
  absmax: Float32Array,
  n: number,
  opts: Bnb4Options,
): Float32Array {
  const { blockSize } = opts;
  checkBlockSize(blockSize, 'dequantizeBnb4');
  if (packed.length < Math.ceil(n / 2) || absmax.length < Math.ceil(n / blockSize)) {
    throw new EdgeloraError(
      `dequantizeBnb4: ${n} elements need ${Math.ceil(n / 2)} packed bytes and ${Math.ceil(n / blockSize)} absmax values, got ${packed.length} and ${absmax.length}`,
    );
  }
  const code = codebook(opts.quantType);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const byte = packed[i >> 1]!;
    const c = (i & 1) === 0 ? byte >> 4 : byte & 0x0f;
    out[i] = code[c]! * absmax[(i / blockSize) | 0]!;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Nested absmax ("double quantization", bitsandbytes' compress_statistics=True)

/** PyTorch's float32 torch.linspace(start, end, steps), scalar path: the first half counts up from start, the
 *  second half down from end. */
function linspaceF32(start: number, end: number, steps: number): Float32Array {
  const s = f32(start);
  const e = f32(end);
  const out = new Float32Array(steps);
  if (steps === 1) {
    out[0] = s;
    return out;
  }
  const step = f32(f32(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let idx = 0; idx < steps; idx++) {
    out[idx] = idx < halfway ? f32(s + f32(step * idx)) : f32(e - f32(step * (steps - idx - 1)));
  }
  return out;
}

/**
 * bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted values in
 * [-1, 1] (127 negative, 0, 127 positive, then 1.0). Computed with the same float32 steps; PyTorch's
 * vectorized linspace may differ from this scalar formula by an ulp in a few entries, which is why readers
 * always use the map stored in a checkpoint (nested_quant_map) rather than this one.
 */
export function createDynamicMap(): Float32Array {
  const data: number[] = [];
  const maxExponentBits = 7;
  const nonSignBits = 7;
  const scales = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1];
  for (let i = 0; i < maxExponentBits; i++) {
    const fractionItems = 2 ** (i + nonSignBits - maxExponentBits) + 1;
    const b = linspaceF32(0.1, 1, fractionItems);
    const s = f32(scales[i]!);
    for (let j = 0; j + 1 < b.length; j++) {
      const mean = f32(f32(b[j]! + b[j + 1]!) / 2);
      data.push(f32(s * mean), f32(-s * mean));
    }
  }
  data.push(0, 1.0);
  data.sort((a, b) => a - b);
  return new Float32Array(data);
}

/** The signed dynamic map, computed once. */
export const DYNAMIC_MAP_SIGNED: Float32Array = createDynamicMap();

/** bitsandbytes' dQuantize<0> (csrc/kernels.cu): a 7-step binary search over the sorted 256-entry map that
 *  keeps the last values below and above x, then picks between the final pivot and the neighbour on x's side
 *  by their float32 midpoint. */
function quantize8Value(code: Float32Array, x: number): number {
  let pivot = 127;
  let upperPivot = 255;
  let lowerPivot = 0;
  let lower = -1.0;
  let upper = 1.0;
  let val = code[pivot]!;
  for (let i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lowerPivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upperPivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot]!;
  }
  if (upperPivot === 255) upper = code[255]!;
  if (lowerPivot === 0) lower = code[0]!;
  if (x > val) return x > f32(f32(upper + val) * 0.5) ? upperPivot : pivot;
  return x < f32(f32(lower + val) * 0.5) ? lowerPivot : pivot;
}

/** bitsandbytes' 8-bit quantize_blockwise with a given 256-value code: per-block absmax, x·(1/absmax). */
export function quantizeBlockwise8(
  values: Float32Array,
  code: Float32Array,
  blockSize: number,
): { q: Uint8Array; absmax: Float32Array } {
  checkBlockSize(blockSize, 'quantizeBlockwise8', 64);
  if (code.length !== 256) throw new EdgeloraError(`an 8-bit code needs 256 values, got ${code.length}`);
  const n = values.length;
  const nBlocks = Math.ceil(n / blockSize);
  const q = new Uint8Array(n);
  const absmax = new Float32Array(nBlocks);
  for (let b = 0; b < nBlocks; b++) {
    const start = b * blockSize;
    const end = Math.min(start + blockSize, n);
    let m = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(values[i]!);
      if (a > m) m = a;
    }
    absmax[b] = m;
    const inv = f32(1 / m);
    for (let i = start; i < end; i++) q[i] = quantize8Value(code, f32(values[i]! * inv));
  }
  return { q, absmax };
}

export interface NestedAbsmax {
  /** One byte per 4-bit block: index into nestedCode. */
  qAbsmax: Uint8Array;
  /** ceil(nBlocks / nestedBlockSize) float32 scales of the 8-bit blocks. */
  nestedAbsmax: Float32Array;
  /** mean(absmax), subtracted before the 8-bit quantization (float32). */
  offset: number;
  /** The 256-value signed dynamic map. */
  nestedCode: Float32Array;
  nestedBlockSize: number;
}

/** Double quantization of the absmax vector, as bitsandbytes' quantize_4bit(compress_statistics=True). */
export function nestAbsmax(absmax: Float32Array, nestedBlockSize = 256): NestedAbsmax {
  let sum = 0;
  for (let i = 0; i < absmax.length; i++) sum += absmax[i]!;
  const offset = absmax.length === 0 ? 0 : f32(sum / absmax.length);
  const centered = new Float32Array(absmax.length);
  for (let i = 0; i < absmax.length; i++) centered[i] = absmax[i]! - offset; // Float32Array store rounds
  const nestedCode = DYNAMIC_MAP_SIGNED;
  const { q, absmax: nested } = quantizeBlockwise8(centered, nestedCode, nestedBlockSize);
  return { qAbsmax: q, nestedAbsmax: nested, offset, nestedCode: new Float32Array(nestedCode), nestedBlockSize };
}

/** De-nests: code[q] · nestedAbsmax[i / nestedBlockSize] + offset, each step in float32. */
export function denestAbsmax(
  q: Uint8Array,
  nestedAbsmax: Float32Array,
  offset: number,
  nestedCode: Float32Array,
  nestedBlockSize = 256,
): Float32Array {
  checkBlockSize(nestedBlockSize, 'denestAbsmax', 64);
  if (nestedCode.length !== 256) throw new EdgeloraError(`the nested code needs 256 values, got ${nestedCode.length}`);
  if (nestedAbsmax.length < Math.ceil(q.length / nestedBlockSize)) {
    throw new EdgeloraError(
      `${q.length} nested absmax codes need ${Math.ceil(q.length / nestedBlockSize)} nested scales, got ${nestedAbsmax.length}`,
    );
  }
  const off = f32(offset);
  const out = new Float32Array(q.length);
  for (let i = 0; i < q.length; i++) {
    out[i] = f32(nestedCode[q[i]!]! * nestedAbsmax[(i / nestedBlockSize) | 0]!) + off;
  }
  return out;
}

/** Storage bytes of a bnb 4-bit weight: packed codes + absmax (float32, or 1 byte each + nested scales). */
export function bnb4Bytes(q: { packed: Uint8Array; absmax: Float32Array; nested?: NestedAbsmax }): number {
  if (q.nested) {
    return q.packed.byteLength + q.nested.qAbsmax.byteLength + q.nested.nestedAbsmax.byteLength + 4 + 256 * 4;
  }
  return q.packed.byteLength + q.absmax.byteLength;
}
