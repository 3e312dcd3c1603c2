// Weight providers for the model definition. `CheckpointWeights` reads a Hugging Face float (or
// bnb-4bit) checkpoint one tensor at a time, quantizes it and hashes it into the base-model
// fingerprint; `QuantizedWeights` re-reads a quantized model directory (its model.onnx initializer
// table) so other graphs (training, references) point at the same external data without copies.
import { createHash, type Hash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import onnxproto from 'onnx-proto';
import { Graph, type DType, type Value, type TypedData, type ExternalDataSink, ONNX_DTYPE } from '../graph/builder.js';
import { STORED_TENSORS_KEY, type StoredTensorEntry } from '../graph/onnx.js';
import { rawToF32, type SafetensorsReader } from '../formats/safetensors.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { EdgeloraError } from '../util/errors.js';
import { canonicalJson } from '../util/canonical-json.js';
import { quantizeBnb4, dequantizeBnb4, nestAbsmax, denestAbsmax } from '../quant/bnb4.js';
import { quantizeInt4, dequantizeInt4, int4Layout } from '../quant/int4.js';
import { readBnbWeight } from '../quant/bnb-checkpoint.js';
import { linearWeightName, type BaseWeight, type LinearSpec, type TableWeight, type WeightProvider, linearShape, type Proj } from './llama.js';
import { DATA_FILE, type Manifest } from './manifest.js';
import type { SourceHasher } from './source-fingerprint.js';

export type QuantFormat = 'fp32' | 'nf4' | 'fp4' | 'int4';
export const QUANT_FORMATS: readonly QuantFormat[] = ['fp32', 'nf4', 'fp4', 'int4'];
/** How the vocabulary table(s) are stored: float32 (bitsandbytes-exact), or symmetric 8/4-bit blocks along C. */
export type EmbeddingFormat = 'float' | 'int8' | 'int4';
export const EMBEDDING_FORMATS: readonly EmbeddingFormat[] = ['float', 'int8', 'int4'];
/** Elements of C per table scale (llama.cpp's Q8_0/Q4_0 use 32 too). */
export const DEFAULT_EMBEDDING_BLOCK_SIZE = 32;

export interface QuantOptions {
  readonly format: QuantFormat;
  /** Elements per quantization block (nf4/fp4 default 64, int4 default 32). */
  readonly blockSize: number;
  /** bitsandbytes nested quantization of absmax (nf4/fp4 only). */
  readonly doubleQuant: boolean;
  /** MatMulNBits accuracy_level for int4: 4 = int8 activations (fast CPU path, default), 0 = float. */
  readonly int4AccuracyLevel?: number;
  /** The vocabulary table(s): default 'float'. */
  readonly embeddings?: EmbeddingFormat;
  /** Elements of C per table scale (quantized tables only), a power of two ≥ 16 dividing C; default 32. */
  readonly embeddingBlockSize?: number;
}

/** Initializer names of a projection's base weight in the graph (suffixes on the HF weight name). */
export const WEIGHT_SUFFIX = {
  fp32T: '.T', // float32 [K, N]
  bnb4: '.bnb4', // uint8 [(N·K+1)/2]
  absmax: '.absmax', // float32 [ceil(N·K/bs)]
  int4: '.int4', // uint8 [N, K/bs, bs/2]
  scales: '.scales', // float32 [N·K/bs]
  zeroPoints: '.zero_points', // uint8 [N·ceil((K/bs)/2)]
  table: '.qtable', // uint8 [V, C/bs, bs·bits/8]: a quantized vocabulary table (MatMulNBits layout, symmetric)
  tableScales: '.qscales', // float32 [V, C/bs]
};

/**
 * The order a projection group's tensors are stored in (WeightProvider.storageRank): codes, then scales / absmax,
 * then zero points, then the rest (biases), so each kind is one span of the data file.
 */
export function storedGroupRank(name: string): number {
  const order = [[WEIGHT_SUFFIX.int4, WEIGHT_SUFFIX.bnb4], [WEIGHT_SUFFIX.scales, WEIGHT_SUFFIX.absmax], [WEIGHT_SUFFIX.zeroPoints]];
  const rank = order.findIndex((suffixes) => suffixes.some((x) => name.endsWith(x)));
  return rank < 0 ? order.length : rank;
}

/** Adds an initializer and folds it into the fingerprint hash (name, dtype, shape, bytes). */
export function addHashed(g: Graph, hash: Hash | null, name: string, dtype: DType, shape: number[], data: TypedData): Value {
  if (hash) {
    hash.update(`${name}|${dtype}|${shape.join(',')}|`);
    hash.update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
  return g.initializer(name, dtype, shape, data);
}

function transpose(w: Float32Array, N: number, K: number): Float32Array {
  const t = new Float32Array(N * K);
  for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) t[k * N + n] = w[n * K + k]!;
  return t;
}

/** Reads a float checkpoint (or a pre-quantized bnb-4bit one) and quantizes as the graph is built. */
export class CheckpointWeights implements WeightProvider {
  /** Which source each linear came from, for the manifest. */
  readonly sources = new Map<string, 'float' | 'bnb-4bit'>();
  /** The blocksizes found in a pre-quantized bnb-4bit checkpoint (its own, not --block-size). */
  readonly bnbBlockSizes = new Set<number>();
  constructor(
    private readonly reader: SafetensorsReader,
    private readonly opts: QuantOptions,
    private readonly hash: Hash | null,
    private readonly onTensor?: (name: string) => void,
    /** Also hashes every tensor read into the source fingerprint (the same for every quantization). */
    private readonly source?: SourceHasher,
  ) {}

  private async readFloat(name: string, shape: number[]): Promise<Float32Array> {
    if (!this.reader.has(name)) {
      throw new EdgeloraError(`missing tensor ${name}`, { where: this.reader.source, hint: 'is this a complete Llama-family checkpoint?' });
    }
    const info = this.reader.info(name);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new EdgeloraError(`tensor ${name} has shape [${info.shape}] but config.json implies [${shape}]`, {
        where: info.file,
        hint: 'does config.json belong to this checkpoint?',
      });
    }
    const values = await this.reader.readF32(name);
    this.source?.addFloat(name, info.shape, values);
    return values;
  }

  async linear(g: Graph, spec: LinearSpec): Promise<BaseWeight> {
    const name = linearWeightName(spec.layer, spec.proj);
    const { N, K } = spec;
    this.onTensor?.(name);
    const stateName = ['nf4', 'fp4'].map((t) => `${name}.quant_state.bitsandbytes__${t}`).find((n) => this.reader.has(n));
    if (stateName) {
      // Pre-quantized bitsandbytes checkpoint: take the codes as they are (no re-quantization).
      const q = await readBnbWeight(async (n) => (this.reader.has(n) ? { dtype: this.reader.info(n).dtype, shape: this.reader.info(n).shape, data: await this.reader.readRaw(n) } : undefined), name);
      if (q.shape[0] !== N || q.shape[1] !== K) {
        throw new EdgeloraError(`bnb tensor ${name} has shape [${q.shape}] but config.json implies [${N}, ${K}]`, { where: this.reader.source, hint: 'does config.json belong to this checkpoint?' });
      }
      if (this.opts.format !== q.quantType) {
        throw new EdgeloraError(`checkpoint is pre-quantized as ${q.quantType} but --format ${this.opts.format} was asked`, {
          where: `${this.reader.source} (${name})`,
          hint: `use --format ${q.quantType}; a bnb-4bit checkpoint is converted without re-quantizing`,
        });
      }
      this.source?.addBnb(name, q);
      this.sources.set(name, 'bnb-4bit');
      this.bnbBlockSizes.add(q.blockSize);
      return {
        kind: 'bnb4',
        quantType: q.quantType,
        blockSize: q.blockSize,
        packed: addHashed(g, this.hash, name + WEIGHT_SUFFIX.bnb4, 'uint8', [q.packed.length], q.packed),
        absmax: addHashed(g, this.hash, name + WEIGHT_SUFFIX.absmax, 'float32', [q.absmax.length], q.absmax),
      };
    }
    const w = await this.readFloat(name, [N, K]);
    this.sources.set(name, 'float');
    switch (this.opts.format) {
      case 'fp32':
        return { kind: 'fp32', wT: addHashed(g, this.hash, name + WEIGHT_SUFFIX.fp32T, 'float32', [K, N], transpose(w, N, K)) };
      case 'nf4':
      case 'fp4': {
        const q = quantizeBnb4(w, { quantType: this.opts.format, blockSize: this.opts.blockSize });
        let absmax = q.absmax;
        if (this.opts.doubleQuant) {
          // Stored the bitsandbytes way, then de-nested to float32 for the graph (MatMulBnb4 takes float absmax).
          const nested = nestAbsmax(absmax);
          absmax = denestAbsmax(nested.qAbsmax, nested.nestedAbsmax, nested.offset, nested.nestedCode);
        }
        return {
          kind: 'bnb4',
          quantType: this.opts.format,
          blockSize: this.opts.blockSize,
          packed: addHashed(g, this.hash, name + WEIGHT_SUFFIX.bnb4, 'uint8', [q.packed.length], q.packed),
          absmax: addHashed(g, this.hash, name + WEIGHT_SUFFIX.absmax, 'float32', [absmax.length], absmax),
        };
      }
      case 'int4': {
        const bs = this.opts.blockSize;
        const q = quantizeInt4(w, N, K, { blockSize: bs });
        const kb = q.kBlocks;
        return {
          kind: 'int4',
          bits: 4,
          blockSize: bs,
          packed: addHashed(g, this.hash, name + WEIGHT_SUFFIX.int4, 'uint8', [N, kb, int4Layout(4, bs, kb).blob], q.packed),
          scales: addHashed(g, this.hash, name + WEIGHT_SUFFIX.scales, 'float32', [N * kb], q.scales),
          zeroPoints: q.zeroPoints ? addHashed(g, this.hash, name + WEIGHT_SUFFIX.zeroPoints, 'uint8', [q.zeroPoints.length], q.zeroPoints) : null,
          accuracyLevel: this.opts.int4AccuracyLevel ?? 4,
        };
      }
    }
  }

  readonly storageRank = storedGroupRank;

  async float(g: Graph, name: string, shape: number[]): Promise<Value> {
    if (g.values.has(name)) return g.value(name);
    this.onTensor?.(name);
    return addHashed(g, this.hash, name, 'float32', shape, await this.readFloat(name, shape));
  }

  async table(g: Graph, name: string, shape: [number, number]): Promise<TableWeight> {
    const fmt = this.opts.embeddings ?? 'float';
    if (fmt === 'float') return { kind: 'float', w: await this.float(g, name, shape) };
    const [V, C] = shape;
    const bs = this.opts.embeddingBlockSize ?? DEFAULT_EMBEDDING_BLOCK_SIZE;
    if (bs < 16 || (bs & (bs - 1)) !== 0 || C % bs !== 0) {
      // GatherBlockQuantized returns whole blocks: a padded last block would not reshape to [.., C].
      throw new EdgeloraError(`embedding block size ${bs} does not divide hidden size ${C} (or is not a power of two ≥ 16)`, {
        where: name,
        hint: `pick a power of two that divides ${C}, or --embeddings float`,
      });
    }
    this.onTensor?.(name);
    const bits = fmt === 'int8' ? 8 : 4;
    // Symmetric: GatherBlockQuantized and MatMulNBits then agree on the implicit zero point 2^(bits−1) (checked
    // against ORT in test/quant/ort-kernels.test.ts), and no zero-point tensor needs sharing.
    const q = quantizeInt4(await this.readFloat(name, shape), V, C, { blockSize: bs, bits, symmetric: true });
    return {
      kind: 'quantized',
      bits,
      blockSize: bs,
      packed: addHashed(g, this.hash, name + WEIGHT_SUFFIX.table, 'uint8', [V, q.kBlocks, int4Layout(bits, bs, q.kBlocks).blob], q.packed),
      scales: addHashed(g, this.hash, name + WEIGHT_SUFFIX.tableScales, 'float32', [V, q.kBlocks], q.scales),
      accuracyLevel: TABLE_ACCURACY_LEVEL,
    };
  }
}

/**
 * MatMulNBits accuracy_level of a quantized lm_head: 4 (int8 activations). At 0 the CPU kernel has no 8-bit
 * path and dequantizes the whole table per call (measured ~1 s per token for a 151,936 × 896 table).
 */
const TABLE_ACCURACY_LEVEL = 4;

/** Starts the fingerprint hash with the canonical (sorted-key) config. */
export function startFingerprint(rawConfig: Record<string, unknown>, quant: QuantOptions): Hash {
  const h = createHash('sha256');
  h.update(canonicalJson({ config: rawConfig, quant }));
  return h;
}

// ---------------------------------------------------------------------------------------------

const { onnx } = onnxproto;
const DTYPE_BY_CODE = new Map<number, DType>(Object.entries(ONNX_DTYPE).map(([k, v]) => [v, k as DType]));

export interface StoredTensor {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: number[];
  /** Embedded bytes (small tensors) or a location in the external data file. */
  readonly raw?: Uint8Array;
  readonly external?: { offset: number; length: number };
}

/**
 * A quantized model directory's weights, read from model.onnx's initializer table. Tensors are read
 * from model.onnx.data one at a time; graphs built from it reference the same data file.
 */
export class QuantizedWeights implements WeightProvider {
  private constructor(
    readonly dir: string,
    readonly manifest: Manifest,
    readonly tensors: Map<string, StoredTensor>,
    readonly dataFile: string | null,
  ) {}

  static async open(dir: string, manifest: Manifest): Promise<QuantizedWeights> {
    const file = path.join(dir, 'model.onnx');
    let bytes: Uint8Array;
    try {
      bytes = await fs.readFile(file);
    } catch (err) {
      throw new EdgeloraError(`cannot read ${file}: ${(err as Error).message}`, { where: dir, hint: 'is this a directory written by `edgelora quantize`?' });
    }
    const model = onnx.ModelProto.decode(bytes);
    const tensors = new Map<string, StoredTensor>();
    let dataFile: string | null = null;
    for (const t of model.graph?.initializer ?? []) {
      const dtype = DTYPE_BY_CODE.get(t.dataType ?? 0);
      if (!dtype || !t.name) continue;
      const shape = (t.dims ?? []).map(Number);
      if (t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL) {
        const kv = new Map((t.externalData ?? []).map((e) => [e.key ?? '', e.value ?? '']));
        dataFile = kv.get('location') ?? null;
        tensors.set(t.name, { name: t.name, dtype, shape, external: { offset: Number(kv.get('offset') ?? 0), length: Number(kv.get('length') ?? 0) } });
      } else {
        tensors.set(t.name, { name: t.name, dtype, shape, raw: t.rawData ?? new Uint8Array(0) });
      }
    }
    // Tensors stored in the data file that the decoder graph reads only through a group's span (src/graph/onnx.ts).
    const stored = model.metadataProps?.find((p) => p.key === STORED_TENSORS_KEY)?.value;
    if (stored) {
      for (const [name, dtype, shape, offset, length] of JSON.parse(stored) as StoredTensorEntry[]) {
        tensors.set(name, { name, dtype: dtype as DType, shape, external: { offset, length } });
      }
      dataFile ??= DATA_FILE;
    }
    return new QuantizedWeights(dir, manifest, tensors, dataFile);
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /**
   * A sink for graphs derived from this model: every large tensor is already in the model's data file,
   * so the sink only names the file, and a graph that tried to write a new external tensor is a bug.
   */
  referencingSink(what: string): ExternalDataSink {
    return {
      minBytes: Number.POSITIVE_INFINITY,
      location: this.dataFile ?? DATA_FILE,
      append: () => {
        throw new EdgeloraError(`${what} tried to write a new external tensor`, { where: this.dir });
      },
    };
  }

  /** Raw bytes of one stored tensor. */
  async readRaw(name: string): Promise<Uint8Array> {
    const t = this.tensors.get(name);
    if (!t) throw new EdgeloraError(`no tensor ${name} in the quantized model`, { where: this.dir });
    if (t.raw) return t.raw;
    const fh = await fs.open(path.join(this.dir, this.dataFile ?? ''), 'r');
    try {
      const buf = new Uint8Array(t.external!.length);
      await fh.read(buf, 0, buf.length, t.external!.offset);
      return buf;
    } finally {
      await fh.close();
    }
  }

  async readF32(name: string): Promise<Float32Array> {
    return rawToF32(await this.readRaw(name), 'F32');
  }

  /** The base weight of a projection, dequantized to float32 [N, K] (references and merging). */
  async dequantizedLinear(cfg: ModelConfig, layer: number, proj: Proj): Promise<Float32Array> {
    const name = linearWeightName(layer, proj);
    const { N, K } = linearShape(cfg, proj);
    if (this.has(name + WEIGHT_SUFFIX.fp32T)) {
      const t = await this.readF32(name + WEIGHT_SUFFIX.fp32T);
      return transpose(t, K, N);
    }
    if (this.has(name + WEIGHT_SUFFIX.bnb4)) {
      const packed = await this.readRaw(name + WEIGHT_SUFFIX.bnb4);
      const absmax = await this.readF32(name + WEIGHT_SUFFIX.absmax);
      return dequantizeBnb4(packed, absmax, N * K, { quantType: this.bnbType(), blockSize: this.bnbBlockSize(name, N * K) });
    }
    if (this.has(name + WEIGHT_SUFFIX.int4)) {
      const { bits, blockSize: bs } = this.nbitsLayout(name, K);
      const packed = await this.readRaw(name + WEIGHT_SUFFIX.int4);
      const scales = await this.readF32(name + WEIGHT_SUFFIX.scales);
      const zpInfo = this.tensors.get(name + WEIGHT_SUFFIX.zeroPoints);
      const zpRaw = zpInfo ? await this.readRaw(name + WEIGHT_SUFFIX.zeroPoints) : undefined;
      const zp = zpRaw && zpInfo?.dtype === 'float32' ? rawToF32(zpRaw, 'F32') : zpRaw;
      const kBlocks = Math.ceil(K / bs);
      return dequantizeInt4(zp ? { N, K, bits, blockSize: bs, kBlocks, packed, scales, zeroPoints: zp } : { N, K, bits, blockSize: bs, kBlocks, packed, scales });
    }
    throw new EdgeloraError(`no base weight for ${name}`, { where: this.dir });
  }

  private ref(g: Graph, name: string): Value {
    if (g.values.has(name)) return g.value(name);
    const t = this.tensors.get(name);
    if (!t) throw new EdgeloraError(`no tensor ${name} in the quantized model`, { where: this.dir, hint: 'was the model written by another edgelora version?' });
    if (t.external) return g.externalInitializer(name, t.dtype, t.shape, t.external);
    return g.initializer(name, t.dtype, t.shape, t.raw!);
  }

  async linear(g: Graph, spec: LinearSpec): Promise<BaseWeight> {
    const name = linearWeightName(spec.layer, spec.proj);
    if (this.has(name + WEIGHT_SUFFIX.fp32T)) return { kind: 'fp32', wT: this.ref(g, name + WEIGHT_SUFFIX.fp32T) };
    if (this.has(name + WEIGHT_SUFFIX.bnb4)) {
      return {
        kind: 'bnb4',
        quantType: this.bnbType(),
        blockSize: this.bnbBlockSize(name, spec.N * spec.K),
        packed: this.ref(g, name + WEIGHT_SUFFIX.bnb4),
        absmax: this.ref(g, name + WEIGHT_SUFFIX.absmax),
      };
    }
    const packed = this.ref(g, name + WEIGHT_SUFFIX.int4);
    const { bits, blockSize } = this.nbitsLayout(name, spec.K);
    return {
      kind: 'int4',
      bits,
      blockSize,
      packed,
      scales: this.ref(g, name + WEIGHT_SUFFIX.scales),
      zeroPoints: this.has(name + WEIGHT_SUFFIX.zeroPoints) ? this.ref(g, name + WEIGHT_SUFFIX.zeroPoints) : null,
      accuracyLevel: this.manifest.quant.int4AccuracyLevel ?? 4,
    };
  }

  /**
   * Bits and block size of a MatMulNBits weight from its packed shape [N, kBlocks, blockSize·bits/8]:
   * the bits are the ones for which kBlocks blocks cover K (a GGUF import mixes 4- and 8-bit weights).
   */
  private nbitsLayout(name: string, K: number, suffix: string = WEIGHT_SUFFIX.int4): { bits: 4 | 8; blockSize: number } {
    const shape = this.tensors.get(name + suffix)?.shape ?? [];
    const [kBlocks, blob] = [shape[1] ?? 0, shape[2] ?? 0];
    for (const bits of [4, 8] as const) {
      const blockSize = (blob * 8) / bits;
      if (blockSize >= 16 && Math.ceil(K / blockSize) === kBlocks) return { bits, blockSize };
    }
    throw new EdgeloraError(`${name}${suffix}: packed shape [${shape}] fits neither 4 nor 8 bits for K=${K}`, { where: this.dir, hint: 're-run `edgelora quantize`' });
  }

  /**
   * A 4-bit weight's block size, from its absmax length: a converted bnb-4bit checkpoint keeps each
   * tensor's own blocksize, which need not be the manifest's --block-size.
   */
  private bnbBlockSize(name: string, numel: number): number {
    const blocks = this.tensors.get(name + WEIGHT_SUFFIX.absmax)?.shape[0] ?? 0;
    for (let bs = 16; bs <= 4096; bs *= 2) if (Math.ceil(numel / bs) === blocks) return bs;
    throw new EdgeloraError(`${name}: ${blocks} absmax blocks fit no block size for ${numel} weights`, { where: this.dir, hint: 're-run `edgelora quantize`' });
  }

  private bnbType(): 'nf4' | 'fp4' {
    return this.manifest.quant.format === 'fp4' ? 'fp4' : 'nf4';
  }

  async float(g: Graph, name: string, _shape: number[]): Promise<Value> {
    return this.ref(g, name);
  }

  /** Bits and block size of a stored quantized table, from its shape [V, C/bs, bs·bits/8]; null for a float one. */
  tableLayout(name: string, C: number): { bits: 4 | 8; blockSize: number } | null {
    if (!this.has(name + WEIGHT_SUFFIX.table)) return null;
    // The table has a MatMulNBits weight's layout; GatherBlockQuantized also needs whole blocks.
    const layout = this.nbitsLayout(name, C, WEIGHT_SUFFIX.table);
    if (C % layout.blockSize !== 0) {
      const shape = this.tensors.get(name + WEIGHT_SUFFIX.table)!.shape;
      throw new EdgeloraError(`${name}${WEIGHT_SUFFIX.table} has shape [${shape}], which is no 4- or 8-bit table for C=${C}`, { where: this.dir, hint: 're-run `edgelora quantize`' });
    }
    return layout;
  }

  async table(g: Graph, name: string, shape: [number, number]): Promise<TableWeight> {
    const layout = this.tableLayout(name, shape[1]);
    if (!layout) return { kind: 'float', w: this.ref(g, name) };
    return {
      kind: 'quantized',
      ...layout,
      packed: this.ref(g, name + WEIGHT_SUFFIX.table),
      scales: this.ref(g, name + WEIGHT_SUFFIX.tableScales),
      accuracyLevel: TABLE_ACCURACY_LEVEL,
    };
  }

  /** A vocabulary table [V, C] as float32, dequantized when stored quantized (references, quality reports). */
  async dequantizedTable(name: string, V: number, C: number): Promise<Float32Array> {
    const layout = this.tableLayout(name, C);
    if (!layout) return this.readF32(name);
    const packed = await this.readRaw(name + WEIGHT_SUFFIX.table);
    const scales = await this.readF32(name + WEIGHT_SUFFIX.tableScales);
    return dequantizeInt4({ N: V, K: C, blockSize: layout.blockSize, kBlocks: C / layout.blockSize, bits: layout.bits, packed, scales });
  }
}


