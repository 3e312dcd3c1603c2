// The 4-bit formats in the graph: for each format, the op a frozen base weight is emitted as (model/llama.ts
// `linear()` and `lmHead()` call these, nothing else emits them), its in-graph dequantizer, and its gradient
// rule, registered here into autodiff's rule table so graph/autodiff.ts stays format-agnostic.
//   bitsandbytes NF4/FP4 (quant/bnb4.ts)  → com.microsoft.MatMulBnb4, codebooks NF4_CODE / FP4_CODE of bnb4.ts
//   ORT int4 / int8 (quant/int4.ts)       → com.microsoft.MatMulNBits
//
// Frozen bases get no gradient; only dX = dY·W flows through. ORT's CPU MatMulBnb4 ignores transB=0 (wrong
// values, FACTS.md), so by default each weight is dequantized inside the graph (unpack nibbles, codebook or level
// lookup, block scale), used for one MatMul, and freed by ORT's planner. To keep ORT from constant-folding those
// dequantizations into float copies of every weight at session start, the small tables they start from (nibble
// shift/mask, codebooks, levels) are runtime-fed graph inputs (RuleContext.feed).
//
// Dimension letters: N out features, K in features, P packed bytes, kb K-blocks per row.
import { int, type Dim, type Graph, type Value } from '../graph/builder.js';
import { afterGradient, registerRule, type GradRule, type RuleContext } from '../graph/autodiff.js';
import type { BaseWeight } from '../model/llama.js';
import { NF4_CODE, FP4_CODE } from './bnb4.js';

declare module '../graph/autodiff.js' {
  interface AutodiffOptions {
    /**
     * How dX flows through a frozen com.microsoft.MatMulBnb4 weight. 'dequantize' (default): dequantize
     * that weight inside the graph and MatMul (correct on every EP). 'transB0': MatMulBnb4 with transB=0,
     * which the CUDA EP implements (NOT the CPU EP: it silently returns wrong values there). The
     * 'transB0' route is emitted but could not be run on this project's CPU-only test machines.
     */
    readonly bnb4Backward?: 'dequantize' | 'transB0';
  }
}

type Bnb4Weight = Extract<BaseWeight, { kind: 'bnb4' }>;
/** A MatMulNBits weight; `zeroPoints` undefined: the input is left out (a table's lm_head), null: an empty input. */
type NBitsWeight = Omit<Extract<BaseWeight, { kind: 'int4' }>, 'kind' | 'zeroPoints'> & { readonly zeroPoints?: Value | null };

/** Y = x · dequant(W)ᵀ: x [.., K] → [.., N] through MatMulBnb4 (bitsandbytes layout, transB = 1). */
export function matMulBnb4(g: Graph, x: Value, w: Bnb4Weight, spec: { readonly N: number; readonly K: number }, outShape: Dim[]): Value {
  return g.contrib('MatMulBnb4', [x, w.packed, w.absmax], 'float32', outShape, {
    K: int(spec.K),
    N: int(spec.N),
    block_size: int(w.blockSize),
    quant_type: int(w.quantType === 'nf4' ? 1 : 0),
  });
}

/** Y = x · dequant(W)ᵀ: x [.., K] → [.., N] through MatMulNBits (4 or 8 bits). */
export function matMulNBits(g: Graph, x: Value, w: NBitsWeight, spec: { readonly N: number; readonly K: number }, outShape: Dim[]): Value {
  const inputs = w.zeroPoints === undefined ? [x, w.packed, w.scales] : [x, w.packed, w.scales, w.zeroPoints];
  return g.contrib('MatMulNBits', inputs, 'float32', outShape, {
    K: int(spec.K),
    N: int(spec.N),
    bits: int(w.bits),
    block_size: int(w.blockSize),
    accuracy_level: int(w.accuracyLevel),
  });
}

/** The two nibbles of each byte of `packed` (any shape), as uint8 of the same shape. */
function nibbles(c: RuleContext, packed: Value): { hi: Value; lo: Value } {
  const { g } = c;
  const four = c.feed('autodiff.u8_4', 'uint8', [1], Uint8Array.of(4));
  const fifteen = c.feed('autodiff.u8_15', 'uint8', [1], Uint8Array.of(15));
  const shape = [...packed.shape];
  const hi = g.node('BitShift', [packed, four], [{ dtype: 'uint8', shape }], { direction: { kind: 'string', value: 'RIGHT' } })[0]!;
  const lo = g.node('BitwiseAnd', [packed, fifteen], [{ dtype: 'uint8', shape }])[0]!;
  return { hi, lo };
}

/** Dequantizes one bitsandbytes 4-bit weight to float [N, K] inside the graph, once `dy` exists. */
function dequantBnb4(c: RuleContext, dy: Value, stored: Value, absmax: Value, N: number, K: number, blockSize: number, quantType: number): Value {
  const { g } = c;
  const code = quantType === 1 ? c.feed('autodiff.nf4_code', 'float32', [16], Float32Array.from(NF4_CODE)) : c.feed('autodiff.fp4_code', 'float32', [16], Float32Array.from(FP4_CODE));
  const packed = afterGradient(g, stored, dy);
  const P = packed.shape[0] as number;
  const { hi, lo } = nibbles(c, packed); // [P]
  // First element of each pair in the HIGH nibble (FACTS.md).
  const pairs = g.concat([g.unsqueeze(hi, [1]), g.unsqueeze(lo, [1])], 1, 2); // [P, 2]
  let idx = g.reshape(g.cast(pairs, 'int32'), [2 * P]);
  if (2 * P !== N * K) idx = g.slice(idx, 0, 0, N * K, N * K);
  const blocks = Math.ceil((N * K) / blockSize);
  const vals = g.gather(code, idx); // [N·K]
  let w: Value;
  if (blocks * blockSize === N * K) {
    // absmax fenced too: a Reshape of the initializer would be folded into a second copy (see dequantNBits).
    w = g.mul(g.reshape(vals, [blocks, blockSize]), g.reshape(afterGradient(g, absmax, dy), [blocks, 1]));
  } else {
    // Ragged last block: expand absmax per element.
    const per = g.gather(absmax, g.constI64([...Array(N * K).keys()].map((i) => Math.floor(i / blockSize))));
    w = g.mul(vals, per);
  }
  return g.reshape(w, [N, K]);
}

/**
 * Dequantizes one MatMulNBits weight to float [N, K] inside the graph, once `dy` exists: 4 bits (two codes
 * a byte) or 8 bits (GGUF Q8_0 / Q6_K, quantized vocabulary tables), zero points packed uint8 or float32
 * [N·kb] (GGUF Q4_K's mins).
 */
function dequantNBits(c: RuleContext, dy: Value, stored: Value, scales: Value, zp: Value | null, N: number, K: number, blockSize: number, bits: number): Value {
  const { g } = c;
  const packed = afterGradient(g, stored, dy);
  const levels = c.feed('autodiff.u4_levels', 'float32', [16], Float32Array.from([...Array(16).keys()]));
  const kb = packed.shape[1] as number;
  const half = packed.shape[2] as number;
  let vals: Value;
  if (bits === 8) {
    vals = g.cast(packed, 'float32'); // [N, kb, bs]: one code a byte
  } else {
    // First element in the LOW nibble (FACTS.md).
    const { hi, lo } = nibbles(c, packed); // [N, kb, half]
    const q = g.reshape(g.concat([g.unsqueeze(lo, [3]), g.unsqueeze(hi, [3])], 3, 2), [N, kb, 2 * half]);
    vals = g.gather(levels, g.cast(q, 'int32')); // [N, kb, bs] float
  }
  // Scales and zero points are fenced behind dy like the codes: a Reshape (or Cast) of an initializer by a constant
  // shape is constant-folded by ORT into a new in-memory initializer, a second copy of every layer's scales for the
  // whole session (Qwen2.5-0.5B int4: 48 MiB, measured with ORT's optimized-model dump).
  const zpF = zp ? afterGradient(g, zp, dy) : null;
  const scalesF = afterGradient(g, scales, dy);
  let zero: Value;
  if (zpF && zpF.dtype === 'float32') {
    zero = g.reshape(zpF, [N, kb, 1]);
  } else if (zpF && bits === 8) {
    zero = g.reshape(g.cast(zpF, 'float32'), [N, kb, 1]);
  } else if (zpF) {
    // Packed uint8 [N·ceil(kb/2)], low nibble first.
    const zb = Math.ceil(kb / 2);
    const { hi: zhi, lo: zlo } = nibbles(c, g.reshape(zpF, [N, zb])); // [N, zb]
    let zq = g.reshape(g.concat([g.unsqueeze(zlo, [2]), g.unsqueeze(zhi, [2])], 2, 2), [N, 2 * zb]);
    if (2 * zb !== kb) zq = g.slice(zq, 1, 0, kb, kb);
    zero = g.unsqueeze(g.gather(levels, g.cast(zq, 'int32')), [2]); // [N, kb, 1]
  } else {
    zero = g.constF32([bits === 8 ? 128 : 8], [1]);
  }
  vals = g.mul(g.sub(vals, zero), g.reshape(scalesF, [N, kb, 1]));
  let w = g.reshape(vals, [N, kb * blockSize]);
  if (kb * blockSize !== K) w = g.slice(w, 1, 0, K, K);
  return w;
}

/** The forward was Y = A·dequant(B)ᵀ with B [N, K]: dA = dY·dequant(B). B and absmax are frozen. */
export const matMulBnb4Rule: GradRule = (c) => {
  const dy = c.dy(0);
  if (!dy || !c.needs(0)) return [];
  if (c.needs(1) || c.needs(2)) c.g.fail('MatMulBnb4 weights are frozen: no gradient for them');
  if (c.attrInt('transB', 1) !== 1) c.g.fail('MatMulBnb4 gradient: only the forward layout (transB=1) is supported');
  const { g } = c;
  const K = c.attrInt('K', 0);
  const N = c.attrInt('N', 0);
  const bs = c.attrInt('block_size', 64);
  const qt = c.attrInt('quant_type', 1);
  if ((c.opts.bnb4Backward ?? 'dequantize') === 'transB0') {
    // Y = A·dequant(B) with B [N, K]: dY [.., N] → dX [.., K]. CUDA EP only.
    return [g.contrib('MatMulBnb4', [dy, c.x(1), c.x(2)], dy.dtype, [...dy.shape.slice(0, -1), K], { K: int(K), N: int(N), block_size: int(bs), quant_type: int(qt), transB: int(0) })];
  }
  return [g.matmul(dy, dequantBnb4(c, dy, c.x(1), c.x(2), N, K, bs, qt))];
};

/** The forward was Y = A·dequant(B)ᵀ with B [N, K]: dA = dY·dequant(B). B, scales and zero points are frozen. */
export const matMulNBitsRule: GradRule = (c) => {
  const dy = c.dy(0);
  if (!dy || !c.needs(0)) return [];
  if ([1, 2, 3, 4, 5].some((i) => i < c.node.inputs.length && c.node.inputs[i] && c.needs(i))) c.g.fail('MatMulNBits weights are frozen: no gradient for them');
  const K = c.attrInt('K', 0);
  const N = c.attrInt('N', 0);
  const bs = c.attrInt('block_size', 32);
  const bits = c.attrInt('bits', 4);
  if (bits !== 4 && bits !== 8) c.g.fail(`MatMulNBits gradient: bits=${bits} (4 and 8 are supported)`);
  const zp = c.node.inputs[3] ? c.x(3) : null;
  if (zp && zp.dtype !== 'uint8' && zp.dtype !== 'float32') c.g.fail(`MatMulNBits gradient: ${zp.dtype} zero points (uint8 or float32 are supported)`);
  return [c.g.matmul(dy, dequantNBits(c, dy, c.x(1), c.x(2), zp, N, K, bs, bits))];
};

registerRule('MatMulBnb4', matMulBnb4Rule);
registerRule('MatMulNBits', matMulNBitsRule);
