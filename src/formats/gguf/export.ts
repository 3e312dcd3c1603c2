// GGUF export for llama.cpp: `edgelora export-gguf` writes a base model (f32, q8_0 or q4_0 linears)
// and `edgelora adapter export-gguf` a LoRA adapter (general.type "adapter", adapter.type "lora",
// adapter.lora.alpha; blk.N.attn_q.weight.lora_a [K, r] / .lora_b [r, N] in ggml order, which is
// PEFT's A [r, K] and B [N, r] row-major). Both apply llama.cpp's q/k row permutation for llama.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { readManifest } from '../../model/manifest.js';
import { QuantizedWeights, WEIGHT_SUFFIX } from '../../model/weights.js';
import { parseHfConfig, type ModelConfig } from '../hf-config.js';
import { LINEAR_PROJS, compareSites, linearShape, linearWeightName, type Proj } from '../../model/llama.js';
import { baseOf, loadAdapter } from '../../adapters/peft.js';
import { rawToF32, f32ToF16Bits, f16BitsToF32 } from '../safetensors.js';
import { EdgeloraError } from '../../util/errors.js';
import { BLOCK, type SupportedType } from './spec.js';
import { writeGguf, type GgufTensorOut, type GgufMeta } from './writer.js';
import { f32Bytes, nbits4ToQ4_0, quantizeQ4_0, quantizeQ8_0 } from './blocks.js';
import { ggufLinearName, permuteRows, permutedHeads } from './names.js';
import { ggufMetaFromConfig } from './config.js';
import { ggufTokenizerMeta } from './tokenizer.js';
import { llama3RopeFactors } from './rope.js';

export const EXPORT_TYPES = ['f32', 'q8_0', 'q4_0'] as const;
export type ExportType = (typeof EXPORT_TYPES)[number];
const GGML_OF: Readonly<Record<ExportType, SupportedType>> = { f32: 'F32', q8_0: 'Q8_0', q4_0: 'Q4_0' };
/** general.file_type (llama_ftype) of an all-f32 / mostly-q8_0 / mostly-q4_0 file. */
const FILE_TYPE: Readonly<Record<ExportType, number>> = { f32: 0, q8_0: 7, q4_0: 2 };

export interface ExportBaseOptions {
  /** Linear weights' type (default q4_0). */
  readonly type?: ExportType;
  /** Embedding / output table type (default: f32 for f32, q8_0 otherwise). */
  readonly tableType?: ExportType;
}

/** How each tensor got its GGUF bytes: codes copied, codes copied with scales rounded to f16, or re-quantized. */
export interface ExportReport {
  file: string;
  bytes: number;
  tensors: number;
  exact: number;
  /** Tensors whose codes were copied but some float32 scales had to be rounded to f16. */
  scalesRounded: number;
  /** Tensors dequantized and quantized again (a different block format, or zero points ≠ 8). */
  requantized: number;
}

async function readJsonFile(file: string): Promise<unknown> {
  try {
    return JSON.parse(await fs.readFile(file, 'utf8')) as unknown;
  } catch (err) {
    throw new EdgeloraError(`cannot read: ${(err as Error).message}`, { where: file, hint: 'a model directory holds tokenizer.json and tokenizer_config.json' });
  }
}

/** f32 values → `type` blocks. */
function encode(type: ExportType, x: Float32Array): Uint8Array {
  return type === 'f32' ? f32Bytes(x) : type === 'q8_0' ? quantizeQ8_0(x) : quantizeQ4_0(x);
}

/** MatMulNBits 8-bit codes (zero point 128, block 32) → Q8_0 blocks; exact when the scales are f16. */
function nbits8ToQ8_0(packed: Uint8Array, scales: Float32Array): { raw: Uint8Array; roundedScales: number } {
  const out = new Uint8Array(scales.length * 34);
  let rounded = 0;
  for (let b = 0; b < scales.length; b++) {
    const h = f32ToF16Bits(scales[b]!);
    if (f16BitsToF32(h) !== scales[b]) rounded++;
    out[b * 34] = h & 0xff;
    out[b * 34 + 1] = h >> 8;
    for (let j = 0; j < 32; j++) out[b * 34 + 2 + j] = packed[b * 32 + j]! ^ 0x80;
  }
  return { raw: out, roundedScales: rounded };
}

/** One linear weight [N, K] as GGUF bytes of `type` (HF row order), and whether its codes were kept. */
async function linearBytes(qw: QuantizedWeights, cfg: ModelConfig, layer: number, proj: Proj, type: ExportType): Promise<{ raw: Uint8Array; how: 'exact' | 'scales' | 'requantized' }> {
  const name = linearWeightName(layer, proj);
  const { N, K } = linearShape(cfg, proj);
  const packedInfo = qw.tensors.get(name + WEIGHT_SUFFIX.int4);
  const zp = qw.tensors.get(name + WEIGHT_SUFFIX.zeroPoints);
  if (packedInfo && !zp && K % 32 === 0) {
    const [, kBlocks, blob] = packedInfo.shape as [number, number, number];
    const bits = blob * 2 === 32 && kBlocks * 32 === K ? 4 : blob === 32 && kBlocks * 32 === K ? 8 : null;
    if ((type === 'q4_0' && bits === 4) || (type === 'q8_0' && bits === 8)) {
      const packed = await qw.readRaw(name + WEIGHT_SUFFIX.int4);
      const scales = await qw.readF32(name + WEIGHT_SUFFIX.scales);
      const r = bits === 4 ? nbits4ToQ4_0({ N, K, packed, scales }) : nbits8ToQ8_0(packed, scales);
      return { raw: r.raw, how: r.roundedScales === 0 ? 'exact' : 'scales' };
    }
  }
  if (qw.has(name + WEIGHT_SUFFIX.int4) && zp && type === 'q4_0') {
    // Zero points that are all 8 are the symmetric layout: the codes still copy.
    const z = await qw.readRaw(name + WEIGHT_SUFFIX.zeroPoints);
    const info = qw.tensors.get(name + WEIGHT_SUFFIX.int4)!;
    if (zp.dtype === 'uint8' && info.shape[2] === 16 && info.shape[1]! * 32 === K && z.every((b) => b === 0x88)) {
      const r = nbits4ToQ4_0({ N, K, packed: await qw.readRaw(name + WEIGHT_SUFFIX.int4), scales: await qw.readF32(name + WEIGHT_SUFFIX.scales) });
      return { raw: r.raw, how: r.roundedScales === 0 ? 'exact' : 'scales' };
    }
  }
  const w = await qw.dequantizedLinear(cfg, layer, proj);
  if (type !== 'f32' && K % 32 !== 0) {
    throw new EdgeloraError(`${name}: K=${K} is not a multiple of 32, which ${type} needs`, { where: qw.dir, hint: 'export with --type f32' });
  }
  // f32 holds every dequantized value exactly; a block format re-quantizes.
  return { raw: encode(type, w), how: type === 'f32' ? 'exact' : 'requantized' };
}

/** Writes a llama.cpp base model GGUF from an edgelora model directory. */
export async function exportGgufBase(modelDir: string, outFile: string, opts: ExportBaseOptions = {}): Promise<ExportReport> {
  const type = opts.type ?? 'q4_0';
  const tableType = opts.tableType ?? (type === 'f32' ? 'f32' : 'q8_0');
  const manifest = await readManifest(modelDir);
  const cfg = parseHfConfig(manifest.sourceConfig, path.join(modelDir, 'manifest.json'));
  const qw = await QuantizedWeights.open(modelDir, manifest);
  const { arch, meta } = ggufMetaFromConfig(cfg, path.basename(path.resolve(modelDir)));
  const tokMeta = ggufTokenizerMeta(
    await readJsonFile(path.join(modelDir, 'tokenizer.json')),
    await readJsonFile(path.join(modelDir, 'tokenizer_config.json')).catch(() => ({})),
    cfg.vocabSize,
    path.join(modelDir, 'tokenizer.json'),
  );
  const metadata: [string, GgufMeta][] = [...meta, ['general.file_type', { type: 'u32', value: FILE_TYPE[type] }], ...tokMeta];
  const C = cfg.hiddenSize;
  const V = cfg.vocabSize;
  const counts = { exact: 0, scales: 0, requantized: 0 };
  const tensors: GgufTensorOut[] = [];
  const floatTensor = (ggName: string, hfName: string, dims: number[], t: ExportType = 'f32', heads: number | null = null): GgufTensorOut => ({
    name: ggName,
    dims,
    type: GGML_OF[t],
    data: async () => {
      let raw = encode(t, rawToF32(await qw.readRaw(hfName), 'F32'));
      if (heads !== null) raw = permuteRows(raw, heads, (dims[0]! / BLOCK[GGML_OF[t]].elements) * BLOCK[GGML_OF[t]].bytes, 'to-gguf');
      counts[t === 'f32' ? 'exact' : 'requantized']++;
      return raw;
    },
  });
  if (tableType !== 'f32' && C % 32 !== 0) throw new EdgeloraError(`hidden size ${C} is not a multiple of 32, which a ${tableType} table needs`, { hint: 'use --table-type f32' });
  // A vocabulary table stored block-quantized (`quantize --embeddings int8|int4`) has no float tensor: its
  // dequantized values are written (f32 holds them exactly; a block type re-quantizes them).
  const tableTensor = (ggName: string, hfName: string): GgufTensorOut => {
    if (!qw.tableLayout(hfName, C)) return floatTensor(ggName, hfName, [C, V], tableType);
    return {
      name: ggName,
      dims: [C, V],
      type: GGML_OF[tableType],
      data: async () => {
        const raw = encode(tableType, await qw.dequantizedTable(hfName, V, C));
        counts[tableType === 'f32' ? 'exact' : 'requantized']++;
        return raw;
      },
    };
  };
  tensors.push(tableTensor('token_embd.weight', 'model.embed_tokens.weight'));
  for (let l = 0; l < cfg.numLayers; l++) {
    tensors.push(floatTensor(`blk.${l}.attn_norm.weight`, `model.layers.${l}.input_layernorm.weight`, [C]));
    for (const proj of LINEAR_PROJS) {
      const { N, K } = linearShape(cfg, proj);
      const heads = permutedHeads(arch, proj, cfg.numHeads, cfg.numKvHeads);
      tensors.push({
        name: ggufLinearName(l, proj),
        dims: [K, N],
        type: GGML_OF[type],
        data: async () => {
          const { raw, how } = await linearBytes(qw, cfg, l, proj, type);
          counts[how]++;
          return heads === null ? raw : permuteRows(raw, heads, (K / BLOCK[GGML_OF[type]].elements) * BLOCK[GGML_OF[type]].bytes, 'to-gguf');
        },
      });
      const hasBias = proj === 'q_proj' || proj === 'k_proj' || proj === 'v_proj' ? cfg.qkvBias : proj === 'o_proj' ? cfg.oBias : false;
      if (hasBias) tensors.push(floatTensor(ggufLinearName(l, proj, 'bias'), linearWeightName(l, proj).replace(/weight$/, 'bias'), [N], 'f32', heads));
      if (proj === 'o_proj') tensors.push(floatTensor(`blk.${l}.ffn_norm.weight`, `model.layers.${l}.post_attention_layernorm.weight`, [C]));
    }
  }
  tensors.push(floatTensor('output_norm.weight', 'model.norm.weight', [C]));
  if (cfg.ropeScaling) {
    const factors = llama3RopeFactors(cfg.ropeScaling, cfg.ropeTheta, cfg.headDim);
    tensors.push({
      name: 'rope_freqs.weight',
      dims: [factors.length],
      type: 'F32',
      data: () => {
        counts.exact++;
        return f32Bytes(factors);
      },
    });
  }
  if (!cfg.tieWordEmbeddings) tensors.push(tableTensor('output.weight', 'lm_head.weight'));
  const bytes = await writeGguf(outFile, metadata, tensors);
  return { file: outFile, bytes, tensors: tensors.length, exact: counts.exact, scalesRounded: counts.scales, requantized: counts.requantized };
}

/** Writes a llama.cpp LoRA adapter GGUF for a PEFT adapter directory made for `baseDir`. */
export async function exportGgufAdapter(adapterDir: string, outFile: string, baseDir: string): Promise<{ file: string; bytes: number; modules: number; alpha: number }> {
  const manifest = await readManifest(baseDir);
  const cfg = parseHfConfig(manifest.sourceConfig, path.join(baseDir, 'manifest.json'));
  // Another quantization of the same source is fine here: the export takes the adapter's float A and B.
  const adapter = await loadAdapter(adapterDir, { cfg, ...baseOf(manifest) });
  const { arch } = ggufMetaFromConfig(cfg, '');
  // llama.cpp scales every module by alpha / r with ONE alpha; a module whose PEFT scale differs
  // (rsLoRA, rank/alpha patterns) gets the difference folded into its B.
  const alpha = adapter.config.lora_alpha;
  const metadata: [string, GgufMeta][] = [
    ['general.architecture', { type: 'string', value: arch }],
    ['general.type', { type: 'string', value: 'adapter' }],
    ['general.name', { type: 'string', value: path.basename(path.resolve(adapterDir)) }],
    ['adapter.type', { type: 'string', value: 'lora' }],
    ['adapter.lora.alpha', { type: 'f32', value: alpha }],
  ];
  const tensors: GgufTensorOut[] = [];
  const modules = [...adapter.modules.values()].sort(compareSites);
  for (const m of modules) {
    const { N, K } = linearShape(cfg, m.proj);
    const heads = permutedHeads(arch, m.proj, cfg.numHeads, cfg.numKvHeads);
    const llamaScale = alpha !== 0 ? alpha / m.r : 1;
    const fold = m.scale / llamaScale;
    const base = ggufLinearName(m.layer, m.proj);
    tensors.push({ name: `${base}.lora_a`, dims: [K, m.r], type: 'F32', data: () => f32Bytes(m.a) });
    tensors.push({
      name: `${base}.lora_b`,
      dims: [m.r, N],
      type: 'F32',
      data: () => {
        const b = Math.abs(fold - 1) < 1e-7 ? m.b : m.b.map((v) => v * fold);
        const raw = f32Bytes(b);
        return heads === null ? raw : permuteRows(raw, heads, m.r * 4, 'to-gguf'); // B's rows are the base weight's rows
      },
    });
  }
  const bytes = await writeGguf(outFile, metadata, tensors);
  return { file: outFile, bytes, modules: modules.length, alpha };
}
