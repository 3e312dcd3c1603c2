// Pre-quantized bitsandbytes 4-bit weights as Hugging Face saves them (the `*-bnb-4bit` checkpoints), per weight:
//   <name>                                         uint8 [(n+1)/2, 1]  packed codes (first element high nibble)
//   <name>.absmax                                  float32 [blocks], or uint8 [blocks] when nested
//   <name>.quant_map                               float32 [16]        the 4-bit codebook
//   <name>.nested_absmax                           float32 [ceil(blocks/nested_blocksize)]   (nested only)
//   <name>.nested_quant_map                        float32 [256]       the 8-bit dynamic map (nested only)
//   <name>.quant_state.bitsandbytes__nf4 | __fp4   uint8 [len]          UTF-8 JSON: quant_type, blocksize, dtype,
//                                                                      shape [out, in], nested_blocksize,
//                                                                      nested_dtype, nested_offset
// (bitsandbytes QuantState.as_dict(packed=True).) Reading converts without re-quantizing: the packed bytes are
// passed through and the absmax de-nested to float32 with the map stored in the file. No file IO here: the
// caller hands in a tensor getter (e.g. over SafetensorsReader) and writes the returned entries.
import { z } from 'zod';
import type { StDType } from '../formats/safetensors.js';
import { EdgeloraError } from '../util/errors.js';
import {
  type Bnb4Type,
  type NestedAbsmax,
  codebook,
  denestAbsmax,
  nestAbsmax,
  quantizeBnb4,
} from './bnb4.js';

/** One tensor as raw little-endian bytes; the shape of a safetensors entry. */
export interface RawTensor {
  dtype: StDType;
  shape: number[];
  data: Uint8Array;
}

export interface NamedRawTensor extends RawTensor {
  name: string;
}

export type TensorGetter = (name: string) => Promise<RawTensor | undefined>;

export interface BnbWeight {
  quantType: Bnb4Type;
  blockSize: number;
  /** [N=out, K=in] */
  shape: [number, number];
  /** ceil(N*K/2) bytes, MatMulBnb4's B. */
  packed: Uint8Array;
  /** ceil(N*K/blockSize) float32, de-nested when the file held nested absmax. */
  absmax: Float32Array;
  /** Whether the file stored nested (double-quantized) absmax. */
  nested: boolean;
  /** The original dtype recorded by bitsandbytes ("float16", "bfloat16", "float32"). */
  dtype: string;
}

export interface WriteBnbOptions {
  quantType: Bnb4Type;
  /** Default 64. */
  blockSize?: number;
  /** Nested ("double") absmax quantization, HF's bnb_4bit_use_double_quant. Default false. */
  doubleQuant?: boolean;
  /** Default 256 (bitsandbytes' fixed choice). */
  nestedBlockSize?: number;
  /** The compute dtype to record in the JSON. Default "float32". */
  dtype?: 'float16' | 'bfloat16' | 'float32';
}

/** The suffixes of the quant-state tensor per type. */
export function quantStateName(name: string, quantType: Bnb4Type): string {
  return `${name}.quant_state.bitsandbytes__${quantType}`;
}

function f32Bytes(a: Float32Array): Uint8Array {
  return new Uint8Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength));
}

function bytesToF32(data: Uint8Array): Float32Array {
  const copy = data.slice(); // aligned, owned
  return new Float32Array(copy.buffer, 0, copy.byteLength >> 2);
}

/** Python json.dumps-style text (", " and ": " separators), so files look like bitsandbytes' own. */
function pyJson(obj: Record<string, string | number | number[]>): string {
  const parts = Object.entries(obj).map(([k, v]) => {
    const val = Array.isArray(v) ? `[${v.join(', ')}]` : JSON.stringify(v);
    return `${JSON.stringify(k)}: ${val}`;
  });
  return `{${parts.join(', ')}}`;
}

/**
 * Quantizes one float weight [N, K] the way bitsandbytes does and returns the tensors Hugging Face saves for it
 * (names prefixed by `name`, e.g. "model.layers.0.self_attn.q_proj.weight").
 */
export function writeBnbWeight(
  name: string,
  w: Float32Array,
  shape: [number, number],
  opts: WriteBnbOptions,
): NamedRawTensor[] {
  const [N, K] = shape;
  if (w.length !== N * K) {
    throw new EdgeloraError(`weight has ${w.length} values, shape [${N}, ${K}] needs ${N * K}`, { where: name });
  }
  const blockSize = opts.blockSize ?? 64;
  const { packed, absmax } = quantizeBnb4(w, { quantType: opts.quantType, blockSize });
  const out: NamedRawTensor[] = [
    { name, dtype: 'U8', shape: [packed.length, 1], data: packed },
  ];
  const state: Record<string, string | number | number[]> = {
    quant_type: opts.quantType,
    blocksize: blockSize,
    dtype: opts.dtype ?? 'float32',
    shape: [N, K],
  };
  if (opts.doubleQuant) {
    const nested: NestedAbsmax = nestAbsmax(absmax, opts.nestedBlockSize ?? 256);
    out.push({ name: `${name}.absmax`, dtype: 'U8', shape: [nested.qAbsmax.length], data: nested.qAbsmax });
    out.push({ name: `${name}.quant_map`, dtype: 'F32', shape: [16], data: f32Bytes(codebook(opts.quantType)) });
    out.push({
      name: `${name}.nested_absmax`,
      dtype: 'F32',
      shape: [nested.nestedAbsmax.length],
      data: f32Bytes(nested.nestedAbsmax),
    });
    out.push({ name: `${name}.nested_quant_map`, dtype: 'F32', shape: [256], data: f32Bytes(nested.nestedCode) });
    state.nested_blocksize = nested.nestedBlockSize;
    state.nested_dtype = 'float32';
    state.nested_offset = nested.offset;
  } else {
    out.push({ name: `${name}.absmax`, dtype: 'F32', shape: [absmax.length], data: f32Bytes(absmax) });
    out.push({ name: `${name}.quant_map`, dtype: 'F32', shape: [16], data: f32Bytes(codebook(opts.quantType)) });
  }
  const json = new TextEncoder().encode(pyJson(state));
  out.push({ name: quantStateName(name, opts.quantType), dtype: 'U8', shape: [json.length], data: json });
  return out;
}

const QuantStateJson = z.looseObject({
  quant_type: z.enum(['nf4', 'fp4']),
  blocksize: z.number().int().positive(),
  dtype: z.string().optional(),
  shape: z.array(z.number().int().nonnegative()),
  nested_blocksize: z.number().int().positive().optional(),
  nested_dtype: z.string().optional(),
  nested_offset: z.number().optional(),
});

/** Codebook values in a file may come from a different float path; anything further off is another codebook. */
const QUANT_MAP_TOLERANCE = 1e-6;

async function need(getTensor: TensorGetter, tensor: string, what: string): Promise<RawTensor> {
  const t = await getTensor(tensor);
  if (!t) {
    throw new EdgeloraError(`missing tensor ${tensor} (${what})`, {
      where: tensor,
      hint: 'the bitsandbytes checkpoint is incomplete; re-download or re-save it',
    });
  }
  return t;
}

function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function f32Tensor(t: RawTensor, tensor: string, expected: number): Float32Array {
  if (t.dtype !== 'F32') {
    throw new EdgeloraError(`expected float32 (F32), found ${t.dtype}`, { where: tensor });
  }
  if (numel(t.shape) !== expected || t.data.byteLength !== expected * 4) {
    throw new EdgeloraError(`expected ${expected} float32 values, found shape [${t.shape.join(', ')}] (${t.data.byteLength} bytes)`, {
      where: tensor,
    });
  }
  return bytesToF32(t.data);
}

/** True when `name` has a bitsandbytes 4-bit quant state next to it. */
export async function bnbQuantTypeOf(getTensor: TensorGetter, name: string): Promise<Bnb4Type | undefined> {
  for (const qt of ['nf4', 'fp4'] as const) {
    if (await getTensor(quantStateName(name, qt))) return qt;
  }
  return undefined;
}

/** Reads one bnb 4-bit weight back without re-quantizing (see the file header). */
export async function readBnbWeight(getTensor: TensorGetter, name: string): Promise<BnbWeight> {
  let stateTensor: RawTensor | undefined;
  let suffixType: Bnb4Type | undefined;
  for (const qt of ['nf4', 'fp4'] as const) {
    stateTensor = await getTensor(quantStateName(name, qt));
    if (stateTensor) {
      suffixType = qt;
      break;
    }
  }
  if (!stateTensor || !suffixType) {
    throw new EdgeloraError(`no bitsandbytes quant state for ${name}`, {
      where: `${name}.quant_state.bitsandbytes__nf4`,
      hint: 'expected a pre-quantized bitsandbytes 4-bit checkpoint (nf4 or fp4)',
    });
  }
  const stateName = quantStateName(name, suffixType);
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(stateTensor.data));
  } catch (err) {
    throw new EdgeloraError('quant state is not valid UTF-8 JSON', { where: stateName, cause: err });
  }
  const res = QuantStateJson.safeParse(parsed);
  if (!res.success) {
    throw new EdgeloraError(`quant state JSON does not match bitsandbytes' fields: ${res.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, {
      where: stateName,
    });
  }
  const st = res.data;
  if (st.quant_type !== suffixType) {
    throw new EdgeloraError(`quant state says quant_type "${st.quant_type}" but its name says ${suffixType}`, {
      where: stateName,
    });
  }
  const blockSize = st.blocksize;
  if ((blockSize & (blockSize - 1)) !== 0 || blockSize < 16) {
    throw new EdgeloraError(`blocksize ${blockSize} is not a power of two ≥ 16`, { where: stateName });
  }
  if (st.shape.length !== 2) {
    throw new EdgeloraError(`quant state shape [${st.shape.join(', ')}] is not 2-D [out, in]`, { where: stateName });
  }
  const N = st.shape[0]!;
  const K = st.shape[1]!;
  const n = N * K;
  const nBlocks = Math.ceil(n / blockSize);

  const weight = await need(getTensor, name, 'packed 4-bit codes');
  // HF stores uint8 [(n+1)/2, 1]; with bnb_4bit_quant_storage ≠ uint8 the same bytes sit in a wider dtype.
  if (weight.data.byteLength < Math.ceil(n / 2)) {
    throw new EdgeloraError(
      `packed weight has ${weight.data.byteLength} bytes but shape [${N}, ${K}] needs ${Math.ceil(n / 2)}`,
      { where: name, hint: 'the quant state shape does not match the packed tensor' },
    );
  }
  const packed = weight.data.slice(0, Math.ceil(n / 2));

  const qmapName = `${name}.quant_map`;
  const qmap = f32Tensor(await need(getTensor, qmapName, 'the 4-bit codebook'), qmapName, 16);
  const known = codebook(st.quant_type);
  let maxDiff = 0;
  for (let i = 0; i < 16; i++) maxDiff = Math.max(maxDiff, Math.abs(qmap[i]! - known[i]!));
  if (!(maxDiff <= QUANT_MAP_TOLERANCE)) {
    throw new EdgeloraError(
      `quant_map differs from the ${st.quant_type.toUpperCase()} codebook (max difference ${maxDiff.toExponential(3)})`,
      { where: qmapName, hint: 'MatMulBnb4 only runs the standard bitsandbytes NF4/FP4 codebooks' },
    );
  }

  const absName = `${name}.absmax`;
  const absT = await need(getTensor, absName, 'per-block absmax');
  const nestedAbsName = `${name}.nested_absmax`;
  const nestedT = await getTensor(nestedAbsName);
  const nested = nestedT !== undefined || st.nested_offset !== undefined || absT.dtype === 'U8';
  let absmax: Float32Array;
  if (nested) {
    if (absT.dtype !== 'U8' || numel(absT.shape) !== nBlocks || absT.data.byteLength !== nBlocks) {
      throw new EdgeloraError(
        `nested absmax must be ${nBlocks} uint8 values, found ${absT.dtype} [${absT.shape.join(', ')}]`,
        { where: absName },
      );
    }
    if (st.nested_offset === undefined) {
      throw new EdgeloraError('nested absmax without nested_offset in the quant state', { where: stateName });
    }
    const nbs = st.nested_blocksize ?? 256;
    if ((nbs & (nbs - 1)) !== 0 || nbs < 64) {
      throw new EdgeloraError(`nested_blocksize ${nbs} is not a power of two ≥ 64`, { where: stateName });
    }
    const nestedAbs = f32Tensor(
      nestedT ?? (await need(getTensor, nestedAbsName, 'nested absmax scales')),
      nestedAbsName,
      Math.ceil(nBlocks / nbs),
    );
    const nqName = `${name}.nested_quant_map`;
    const nestedCode = f32Tensor(await need(getTensor, nqName, 'the 8-bit dynamic map'), nqName, 256);
    absmax = denestAbsmax(absT.data.slice(), nestedAbs, st.nested_offset, nestedCode, nbs);
  } else {
    absmax = f32Tensor(absT, absName, nBlocks);
  }
  return {
    quantType: st.quant_type,
    blockSize,
    shape: [N, K],
    packed,
    absmax,
    nested,
    dtype: st.dtype ?? 'float32',
  };
}
