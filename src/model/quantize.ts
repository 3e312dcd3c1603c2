// `edgelora quantize`: Hugging Face checkpoint → quantized ONNX model directory. One tensor is
// read, quantized and appended to model.onnx.data at a time (peak memory ≈ one float tensor plus
// the small tensors), and the directory is built in a temporary sibling and renamed at the end, so a
// failure never leaves a half-written model.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Graph } from '../graph/builder.js';
import { toOnnxBytes, FileDataSink } from '../graph/onnx.js';
import { SafetensorsReader } from '../formats/safetensors.js';
import { loadHfConfig, checkWeightShapes, expectedWeightShapes } from '../formats/hf-config.js';
import { EdgeloraError } from '../util/errors.js';
import { writeDirAtomic } from '../util/atomic.js';
import { buildLlama } from './llama.js';
import { CheckpointWeights, DEFAULT_EMBEDDING_BLOCK_SIZE, startFingerprint, type QuantOptions } from './weights.js';
import { SourceHasher, addMissingTensors } from './source-fingerprint.js';
import { DATA_FILE, MANIFEST_FILE, MODEL_FILE, MODEL_FORMAT, type Manifest } from './manifest.js';

/** Files copied verbatim from the source checkpoint when present. */
const COPIED = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json'];

export const DEFAULT_BLOCK_SIZE: Record<QuantOptions['format'], number> = { fp32: 64, nf4: 64, fp4: 64, int4: 32 };

export interface QuantizeResult {
  dir: string;
  manifest: Manifest;
  seconds: number;
}

export async function quantizeModel(
  hfDir: string,
  outDir: string,
  opts: QuantOptions & { force?: boolean; onTensor?: (name: string, index: number, total: number) => void },
): Promise<QuantizeResult> {
  const t0 = performance.now();
  if (opts.doubleQuant && !(opts.format === 'nf4' || opts.format === 'fp4')) {
    throw new EdgeloraError(`--double-quant applies to nf4/fp4, not ${opts.format}`, { where: '--double-quant' });
  }
  const { config: cfg, raw } = await loadHfConfig(hfDir);
  const reader = await SafetensorsReader.open(hfDir);
  try {
    // Check every float tensor's shape against config.json before writing anything (bnb-4bit
    // linears are stored packed; their shapes are checked from their quant_state on conversion).
    const expected = expectedWeightShapes(cfg);
    checkWeightShapes(
      cfg,
      (name) => {
        if (!reader.has(name)) return undefined;
        if (['nf4', 'fp4'].some((t) => reader.has(`${name}.quant_state.bitsandbytes__${t}`))) return expected.get(name);
        return reader.info(name).shape;
      },
      reader.source,
    );
    const total = expected.size; // one onTensor call per checkpoint tensor the model reads
    let index = 0;
    const manifest = await writeDirAtomic(
      outDir,
      async (tmp) => {
        const sink = new FileDataSink(path.join(tmp, DATA_FILE), DATA_FILE, 1024);
        const embeddings = opts.embeddings ?? 'float';
        const embeddingBlockSize = embeddings === 'float' ? undefined : (opts.embeddingBlockSize ?? DEFAULT_EMBEDDING_BLOCK_SIZE);
        // The table's format is part of the fingerprint; a float table leaves it as it was before tables could be quantized.
        const hash = startFingerprint(raw, {
          format: opts.format,
          blockSize: opts.blockSize,
          doubleQuant: opts.doubleQuant,
          ...(embeddings === 'float' ? {} : { embeddings, embeddingBlockSize }),
        });
        const int4AccuracyLevel = opts.format === 'int4' ? (opts.int4AccuracyLevel ?? 4) : undefined;
        const source = new SourceHasher();
        const weights = new CheckpointWeights(reader, opts, hash, (name) => opts.onTensor?.(name, ++index, total), source);
        const g = new Graph({ external: sink });
        try {
          await buildLlama(g, cfg, weights, { mode: 'infer', inferLora: false });
        } finally {
          sink.close();
        }
        // Every tensor of the source counts, whether or not this format read it (none is skipped today).
        await addMissingTensors(source, reader, expected);
        const modelBytes = toOnnxBytes(g, { name: `edgelora ${cfg.architecture} ${opts.format}` });
        await fs.writeFile(path.join(tmp, MODEL_FILE), modelBytes);
        for (const f of COPIED) {
          await fs.copyFile(path.join(hfDir, f), path.join(tmp, f)).catch((err: NodeJS.ErrnoException) => {
            if (err.code !== 'ENOENT') throw err;
          });
        }
        // Parameters of the source model (a 4-bit weight's packed bytes hold two parameters each).
        let params = 0;
        for (const shape of expected.values()) params += shape.reduce((a, b) => a * b, 1);
        const sources = new Set(weights.sources.values());
        const m: Manifest = {
          format: MODEL_FORMAT,
          architecture: cfg.architecture,
          quant: {
            format: opts.format,
            // A converted bnb-4bit checkpoint keeps its own blocksize (when it has one throughout).
            blockSize: weights.bnbBlockSizes.size === 1 ? [...weights.bnbBlockSizes][0]! : opts.blockSize,
            doubleQuant: opts.doubleQuant,
            source: sources.has('bnb-4bit') ? 'bnb-4bit' : 'float',
            ...(int4AccuracyLevel === undefined ? {} : { int4AccuracyLevel }),
            embeddings,
            ...(embeddingBlockSize === undefined ? {} : { embeddingBlockSize }),
          },
          fingerprint: hash.digest('hex'),
          sourceFingerprint: source.digest(raw),
          sourceConfig: raw,
          parameters: params,
          bytes: { model: modelBytes.byteLength, data: sink.size },
          createdAt: new Date().toISOString(),
          tool: 'edgelora 0.1.0',
        };
        await fs.writeFile(path.join(tmp, MANIFEST_FILE), JSON.stringify(m, null, 2) + '\n');
        return m;
      },
      { replace: opts.force ?? false },
    );
    return { dir: outDir, manifest, seconds: (performance.now() - t0) / 1000 };
  } finally {
    await reader.close();
  }
}
