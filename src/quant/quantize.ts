// One entry point for quantizing a linear layer's weight [N=out, K=in] into what the graph builder emits:
// nf4/fp4 → com.microsoft.MatMulBnb4 (B, absmax), int4 → com.microsoft.MatMulNBits (B, scales, zero_points).
import { EdgeloraError } from '../util/errors.js';
import { type NestedAbsmax, bnb4Bytes, denestAbsmax, dequantizeBnb4, nestAbsmax, quantizeBnb4 } from './bnb4.js';
import { type Int4Quantized, dequantizeInt4, int4Bytes, quantizeInt4 } from './int4.js';

export type QuantFormat = 'nf4' | 'fp4' | 'int4';

export interface QuantizeLinearOptions {
  /** Elements per block. Default 64 for nf4/fp4 (bitsandbytes), 32 for int4 (MatMulNBits). */
  blockSize?: number;
  /** nf4/fp4 only: nest the absmax as bitsandbytes' double quantization does. Default false. */
  doubleQuant?: boolean;
  /** int4 only: symmetric (no zero points). Default false (min/max with zero points, like ORT's quantizer). */
  symmetric?: boolean;
}

export interface Bnb4Linear {
  format: 'nf4' | 'fp4';
  N: number;
  K: number;
  blockSize: number;
  /** [ceil(N*K/2)] MatMulBnb4's B: flat row-major [N, K], first element in the high nibble. */
  packed: Uint8Array;
  /** [ceil(N*K/blockSize)] float32: what MatMulBnb4 consumes (de-nested when doubleQuant). */
  absmax: Float32Array;
  /** The stored form of absmax when doubleQuant. */
  nested?: NestedAbsmax;
}

export interface Int4Linear extends Int4Quantized {
  format: 'int4';
}

export type QuantizedLinear = Bnb4Linear | Int4Linear;

export function quantizeLinear(
  w: Float32Array,
  N: number,
  K: number,
  format: QuantFormat,
  opts: QuantizeLinearOptions = {},
): QuantizedLinear {
  if (w.length !== N * K) {
    throw new EdgeloraError(`weight has ${w.length} values, [${N}, ${K}] needs ${N * K}`, { where: 'quantizeLinear' });
  }
  if (format === 'int4') {
    const q = quantizeInt4(w, N, K, { blockSize: opts.blockSize ?? 32, symmetric: opts.symmetric ?? false });
    return { format: 'int4', ...q };
  }
  if (format !== 'nf4' && format !== 'fp4') {
    throw new EdgeloraError(`unknown quantization format "${String(format)}"`, { hint: 'use nf4, fp4 or int4' });
  }
  const blockSize = opts.blockSize ?? 64;
  const { packed, absmax } = quantizeBnb4(w, { quantType: format, blockSize });
  if (!opts.doubleQuant) return { format, N, K, blockSize, packed, absmax };
  const nested = nestAbsmax(absmax);
  const denested = denestAbsmax(nested.qAbsmax, nested.nestedAbsmax, nested.offset, nested.nestedCode, nested.nestedBlockSize);
  return { format, N, K, blockSize, packed, absmax: denested, nested };
}

/** The float32 weight [N*K] a quantized linear layer stands for (what the kernels multiply by). */
export function dequantizeLinear(q: QuantizedLinear): Float32Array {
  if (q.format === 'int4') return dequantizeInt4(q);
  return dequantizeBnb4(q.packed, q.absmax, q.N * q.K, { quantType: q.format, blockSize: q.blockSize });
}

/** Bytes this layer's weight takes in storage (codes + scales/absmax + zero points / nested state). */
export function quantizedBytes(q: QuantizedLinear): number {
  return q.format === 'int4' ? int4Bytes(q) : bnb4Bytes(q);
}
