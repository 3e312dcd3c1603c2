// `edgelora import-gguf`: a llama.cpp GGUF model (llama or qwen2) → an edgelora model directory.
// Quantized linears keep their codes (Q4_0/Q4_K → 4-bit MatMulNBits, Q8_0/Q6_K → 8-bit; see
// blocks.ts), float tensors become float32, llama.cpp's q/k row permutation is undone, and the
// tokenizer is rebuilt from tokenizer.ggml.*. Everything is checked before anything is written, and
// the directory is built in a temporary sibling, so a bad file leaves no output.
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Graph, type Value } from '../../graph/builder.js';
import { toOnnxBytes, FileDataSink } from '../../graph/onnx.js';
import { parseHfConfig, expectedWeightShapes, type ModelConfig } from '../hf-config.js';
import { EdgeloraError } from '../../util/errors.js';
import { writeDirAtomic } from '../../util/atomic.js';
import { buildLlama, linearWeightName, type BaseWeight, type LinearSpec, type TableWeight, type WeightProvider } from '../../model/llama.js';
import { addHashed, startFingerprint, storedGroupRank, WEIGHT_SUFFIX } from '../../model/weights.js';
import { sourceFingerprintOfGguf } from '../../model/source-fingerprint.js';
import { int4Layout } from '../../quant/int4.js';
import { DATA_FILE, MANIFEST_FILE, MODEL_FILE, MODEL_FORMAT, type Manifest } from '../../model/manifest.js';
import { GgufReader } from './reader.js';
import { BLOCK, type SupportedType } from './spec.js';
import { dequantizeGguf, toNBits } from './blocks.js';
import { ggufLinearName, ggufName, permuteRows, permutedHeads } from './names.js';
import { hfConfigFromGguf, type GgufArch } from './config.js';
import { tokenizerFromGguf } from './tokenizer.js';

export interface ImportGgufOptions {
  /** MatMulNBits accuracy_level: 4 = int8 activations (fast CPU path, default), 0 = float activations. */
  readonly accuracyLevel?: number;
  /** Replace an existing output directory. Default false. */
  readonly force?: boolean;
  readonly onTensor?: (name: string, index: number, total: number) => void;
}

export interface ImportGgufResult {
  dir: string;
  manifest: Manifest;
  seconds: number;
}

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Weights straight from a GGUF file, converted and hashed as the graph asks for them. */
class GgufWeights implements WeightProvider {
  readonly types = new Map<string, number>();
  readonly storageRank = storedGroupRank;
  constructor(
    private readonly reader: GgufReader,
    private readonly cfg: ModelConfig,
    private readonly arch: GgufArch,
    private readonly hash: Hash,
    private readonly accuracyLevel: number,
    private readonly onTensor: (name: string) => void,
  ) {}

  /** A tensor's bytes in Hugging Face row order (q/k rows un-permuted for llama). */
  private rows(ggName: string, hfShape: readonly number[], permuteHeads: number | null): { type: SupportedType; raw: Uint8Array } {
    const info = this.reader.info(ggName);
    const want = [...hfShape].reverse();
    if (info.dims.length !== want.length || info.dims.some((d, i) => d !== want[i])) {
      throw new EdgeloraError(`tensor ${ggName} has ggml dims [${info.dims}] but the metadata implies [${want}]`, {
        where: this.reader.file,
        hint: 'the tensor table does not match the architecture metadata; the file may be corrupt',
      });
    }
    const type = this.reader.supportedType(ggName);
    this.types.set(type, (this.types.get(type) ?? 0) + 1);
    let raw = this.reader.readRaw(ggName);
    if (permuteHeads !== null) {
      const rowBytes = (info.dims[0]! / BLOCK[type].elements) * BLOCK[type].bytes;
      raw = permuteRows(raw, permuteHeads, rowBytes, 'from-gguf');
    }
    return { type, raw };
  }

  async linear(g: Graph, spec: LinearSpec): Promise<BaseWeight> {
    const name = linearWeightName(spec.layer, spec.proj);
    const { N, K } = spec;
    const ggName = ggufLinearName(spec.layer, spec.proj);
    this.onTensor(ggName);
    const heads = permutedHeads(this.arch, spec.proj, this.cfg.numHeads, this.cfg.numKvHeads);
    const { type, raw } = this.rows(ggName, [N, K], heads);
    const nb = toNBits(type, raw, N, K, `${this.reader.file} (${ggName})`);
    if (!nb) {
      const w = dequantizeGguf(type, raw, N * K, ggName);
      const t = new Float32Array(N * K);
      for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) t[k * N + n] = w[n * K + k]!;
      return { kind: 'fp32', wT: addHashed(g, this.hash, name + WEIGHT_SUFFIX.fp32T, 'float32', [K, N], t) };
    }
    const { blob } = int4Layout(nb.bits, nb.blockSize, nb.kBlocks);
    return {
      kind: 'int4',
      bits: nb.bits,
      blockSize: nb.blockSize,
      packed: addHashed(g, this.hash, name + WEIGHT_SUFFIX.int4, 'uint8', [N, nb.kBlocks, blob], nb.packed),
      scales: addHashed(g, this.hash, name + WEIGHT_SUFFIX.scales, 'float32', [N * nb.kBlocks], nb.scales),
      zeroPoints: nb.zeroPoints ? addHashed(g, this.hash, name + WEIGHT_SUFFIX.zeroPoints, 'float32', [N * nb.kBlocks], nb.zeroPoints) : null,
      accuracyLevel: this.accuracyLevel,
    };
  }

  async float(g: Graph, name: string, shape: number[]): Promise<Value> {
    if (g.values.has(name)) return g.value(name);
    const ggName = ggufName(name);
    if (!ggName) throw new EdgeloraError(`no GGUF name for ${name}`, { where: this.reader.file });
    this.onTensor(ggName);
    // A q/k bias is permuted like its weight's rows (one element per row).
    const bias = /\.(q|k)_proj\.bias$/.exec(name);
    const heads = bias ? permutedHeads(this.arch, bias[1] === 'q' ? 'q_proj' : 'k_proj', this.cfg.numHeads, this.cfg.numKvHeads) : null;
    const { type, raw } = this.rows(ggName, shape, heads);
    return addHashed(g, this.hash, name, 'float32', shape, dequantizeGguf(type, raw, shape.reduce((a, b) => a * b, 1), ggName));
  }

  /** The vocabulary table stays float32 (dequantized from its GGUF type), as the import always kept it. */
  async table(g: Graph, name: string, shape: [number, number]): Promise<TableWeight> {
    return { kind: 'float', w: await this.float(g, name, shape) };
  }
}

/** The GGUF tensor names a model with this config reads (all checked before anything is converted). */
function requiredTensors(cfg: ModelConfig): string[] {
  const names: string[] = [];
  for (const hf of expectedWeightShapes(cfg).keys()) {
    const gg = ggufName(hf);
    if (gg) names.push(gg);
  }
  return names;
}

export async function importGguf(file: string, outDir: string, opts: ImportGgufOptions = {}): Promise<ImportGgufResult> {
  const t0 = performance.now();
  const reader = GgufReader.open(file);
  try {
    const embd = reader.info('token_embd.weight');
    const { arch, raw } = hfConfigFromGguf(
      reader.metadata,
      {
        vocabSize: embd.dims[1] ?? 0,
        tied: !reader.has('output.weight'),
        attentionBias: reader.has('blk.0.attn_q.bias'),
        ropeFreqs: reader.has('rope_freqs.weight') ? dequantizeGguf(reader.supportedType('rope_freqs.weight'), reader.readRaw('rope_freqs.weight'), reader.info('rope_freqs.weight').numel, 'rope_freqs.weight') : null,
      },
      file,
    );
    const cfg = parseHfConfig(raw, `${file} (metadata)`);
    const tok = tokenizerFromGguf(reader.metadata, file);
    const needed = requiredTensors(cfg);
    for (const n of needed) reader.supportedType(n); // refuses missing tensors and unsupported types by name
    const total = needed.length;
    let index = 0;
    const sha256 = await sha256File(file);
    const accuracyLevel = opts.accuracyLevel ?? 4;
    const manifest = await writeDirAtomic(
      outDir,
      async (tmp) => {
        const sink = new FileDataSink(path.join(tmp, DATA_FILE), DATA_FILE, 1024);
        const hash = startFingerprint(raw, { format: 'int4', blockSize: 32, doubleQuant: false });
        hash.update(`gguf|${sha256}|`);
        const weights = new GgufWeights(reader, cfg, arch, hash, accuracyLevel, (n) => opts.onTensor?.(n, ++index, total));
        const g = new Graph({ external: sink });
        try {
          await buildLlama(g, cfg, weights, { mode: 'infer', inferLora: false });
        } finally {
          sink.close();
        }
        const modelBytes = toOnnxBytes(g, { name: `edgelora ${cfg.architecture} from ${path.basename(file)}` });
        await fs.writeFile(path.join(tmp, MODEL_FILE), modelBytes);
        const json = (v: unknown) => JSON.stringify(v, null, 2) + '\n';
        await fs.writeFile(path.join(tmp, 'config.json'), json(raw));
        await fs.writeFile(path.join(tmp, 'tokenizer.json'), json(tok.tokenizerJson));
        await fs.writeFile(path.join(tmp, 'tokenizer_config.json'), json(tok.tokenizerConfig));
        let params = 0;
        for (const shape of expectedWeightShapes(cfg).values()) params += shape.reduce((a, b) => a * b, 1);
        const quantized = [...weights.types.keys()].some((t) => t.startsWith('Q'));
        const m: Manifest = {
          format: MODEL_FORMAT,
          architecture: cfg.architecture,
          quant: {
            format: quantized ? 'int4' : 'fp32',
            blockSize: 32,
            doubleQuant: false,
            source: 'gguf',
            ...(quantized ? { int4AccuracyLevel: accuracyLevel } : {}),
          },
          gguf: { file: path.basename(file), sha256, types: Object.fromEntries([...weights.types].sort()) },
          fingerprint: hash.digest('hex'),
          sourceFingerprint: sourceFingerprintOfGguf(raw, sha256),
          sourceConfig: raw,
          parameters: params,
          bytes: { model: modelBytes.byteLength, data: sink.size },
          createdAt: new Date().toISOString(),
          tool: 'edgelora 0.1.0',
        };
        await fs.writeFile(path.join(tmp, MANIFEST_FILE), json(m));
        return m;
      },
      { replace: opts.force ?? false },
    );
    return { dir: outDir, manifest, seconds: (performance.now() - t0) / 1000 };
  } finally {
    reader.close();
  }
}

