// GGUF v3 constants (ggml/docs/gguf.md): metadata value types, the ggml tensor types edgelora reads or
// writes, and each type's block geometry (elements per block, bytes per block).
export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian uint32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

/** gguf_metadata_value_type */
export const GGUF_VALUE = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;

/** ggml_type ids (ggml.h). Only the ones named here are understood; the rest are refused by name. */
export const GGML_TYPE = {
  F32: 0,
  F16: 1,
  Q4_0: 2,
  Q4_1: 3,
  Q5_0: 6,
  Q5_1: 7,
  Q8_0: 8,
  Q8_1: 9,
  Q2_K: 10,
  Q3_K: 11,
  Q4_K: 12,
  Q5_K: 13,
  Q6_K: 14,
  Q8_K: 15,
  IQ2_XXS: 16,
  IQ2_XS: 17,
  IQ3_XXS: 18,
  IQ1_S: 19,
  IQ4_NL: 20,
  IQ3_S: 21,
  IQ2_S: 22,
  IQ4_XS: 23,
  I8: 24,
  I16: 25,
  I32: 26,
  I64: 27,
  F64: 28,
  IQ1_M: 29,
  BF16: 30,
  TQ1_0: 34,
  TQ2_0: 35,
  MXFP4: 39,
} as const;
export type GgmlTypeName = keyof typeof GGML_TYPE;

const NAME_BY_ID = new Map<number, GgmlTypeName>(Object.entries(GGML_TYPE).map(([k, v]) => [v, k as GgmlTypeName]));
export function ggmlTypeName(id: number): string {
  return NAME_BY_ID.get(id) ?? `type ${id}`;
}

/** The types edgelora converts, with their block geometry (ggml-common.h). */
export const SUPPORTED_TYPES = ['F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q5_0', 'Q4_K', 'Q6_K'] as const;
export type SupportedType = (typeof SUPPORTED_TYPES)[number];

export const BLOCK: Readonly<Record<SupportedType, { elements: number; bytes: number }>> = Object.freeze({
  F32: { elements: 1, bytes: 4 },
  F16: { elements: 1, bytes: 2 },
  BF16: { elements: 1, bytes: 2 },
  Q8_0: { elements: 32, bytes: 34 }, // d f16, qs int8[32]
  Q4_0: { elements: 32, bytes: 18 }, // d f16, qs uint8[16]: element j low nibble of qs[j], j+16 high
  Q4_1: { elements: 32, bytes: 20 }, // d f16, m f16, qs uint8[16] as Q4_0: value q·d + m
  Q5_0: { elements: 32, bytes: 22 }, // d f16, qh uint32 (bit j: element j's fifth bit), qs uint8[16] as Q4_0
  Q4_K: { elements: 256, bytes: 144 }, // d f16, dmin f16, scales uint8[12] (6-bit sc/m × 8), qs uint8[128]
  Q6_K: { elements: 256, bytes: 210 }, // ql uint8[128], qh uint8[64], scales int8[16], d f16
});

export function isSupportedType(name: string): name is SupportedType {
  return (SUPPORTED_TYPES as readonly string[]).includes(name);
}

/** Bytes of a tensor of `numel` elements in a supported type (numel must be whole blocks). */
export function tensorBytes(type: SupportedType, numel: number): number {
  const b = BLOCK[type];
  return (numel / b.elements) * b.bytes;
}
