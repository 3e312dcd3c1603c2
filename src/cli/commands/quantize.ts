// `edgelora quantize`: a Hugging Face checkpoint to a quantized ONNX model directory.
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requirePositional, choiceFlag, checkOutputPath } from '../command.js';
import { quantizeModel, DEFAULT_BLOCK_SIZE } from '../../model/quantize.js';
import { DEFAULT_EMBEDDING_BLOCK_SIZE, EMBEDDING_FORMATS, QUANT_FORMATS, type EmbeddingFormat, type QuantFormat } from '../../model/weights.js';
import { EdgeloraError } from '../../util/errors.js';
import { Progress } from '../../util/progress.js';
import { expectDir } from '../../formats/dir-kind.js';

const help = `Usage: edgelora quantize <hf-dir> <out-dir> [flags]

Quantizes the seven projections of every layer (q, k, v, o, gate, up, down) of a Llama-family
Hugging Face checkpoint (or converts a pre-quantized bitsandbytes *-bnb-4bit checkpoint without
re-quantizing) and writes model.onnx (+ model.onnx.data) and manifest.json to <out-dir>.
Norms and biases stay float32. The vocabulary table (the embedding and, tied or not, the lm_head) is
stored as --embeddings says: int8/int4 keep ONE block-quantized copy that the lm_head (MatMulNBits)
reads and the token lookup reads row by row; float keeps today's float32 table (the
bitsandbytes-exact configuration). ORT holds a prepacked 4- or 8-bit weight as its codes plus three
copies' worth of its scales, so larger blocks cost less memory (int4 at block 128: 0.59 bytes a
weight in memory, at 32: 0.875) and some accuracy (npm run bench:table-quality).

Flags:
  --format nf4|fp4|int4|fp32  nf4/fp4: bitsandbytes layout, run by MatMulBnb4; int4: MatMulNBits
                              (fastest on CPU); fp32: plain MatMul baseline. Default nf4.
  --block-size N              elements per quantization block (default 64 for nf4/fp4, 32 for int4)
  --double-quant              store absmax with bitsandbytes' nested 8-bit quantization (nf4/fp4)
  --embeddings int8|int4|float
                              the vocabulary table(s): symmetric 8- or 4-bit blocks of 32 along the
                              hidden size, or float32. Default int8 for nf4/fp4/int4, float for fp32
  --embedding-block-size N    elements per scale of a quantized table (a power of two ≥ 16 dividing
                              the hidden size; default 32)
  --int4-accuracy 0|4         MatMulNBits accuracy_level: 4 quantizes activations to int8 (fast on
                              CPU, default), 0 keeps them float32
  --force                     replace <out-dir> if it exists
  --json                      print the manifest as JSON instead of a summary
  -h, --help                  this text`;

export const quantizeCommand: Command = {
  name: 'quantize',
  summary: 'quantize a Hugging Face checkpoint to NF4/FP4/INT4 (or fp32) ONNX',
  help,
  async run(argv) {
    const { values, positionals, help: h } = parseFlags('quantize', argv, {
      format: { type: 'string' },
      'block-size': { type: 'string' },
      'double-quant': { type: 'boolean' },
      force: { type: 'boolean' },
      'int4-accuracy': { type: 'string' },
      embeddings: { type: 'string' },
      'embedding-block-size': { type: 'string' },
      json: { type: 'boolean' },
    }, { positionals: ['hf-dir', 'out-dir'] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const hfDir = requirePositional('quantize', 'hf-dir', positionals[0]);
    if (hfDir.toLowerCase().endsWith('.gguf')) {
      throw new EdgeloraError('a GGUF file is imported, not quantized', { where: hfDir, hint: `run \`edgelora import-gguf ${hfDir} <out-dir>\`` });
    }
    const outDir = requirePositional('quantize', 'out-dir', positionals[1]);
    const format: QuantFormat = choiceFlag('format', values.format, QUANT_FORMATS) ?? 'nf4';
    const blockSize = numberFlag('block-size', values['block-size'], DEFAULT_BLOCK_SIZE[format], { integer: true, min: 16 });
    if ((blockSize & (blockSize - 1)) !== 0) throw new EdgeloraError(`must be a power of two (16, 32, 64, …), not ${blockSize}`, { where: '--block-size' });
    const int4AccuracyLevel = numberFlag('int4-accuracy', values['int4-accuracy'], 4, { integer: true, min: 0, max: 4 });
    const embeddings: EmbeddingFormat = choiceFlag('embeddings', values.embeddings, EMBEDDING_FORMATS) ?? (format === 'fp32' ? 'float' : 'int8');
    const embeddingBlockSize = numberFlag('embedding-block-size', values['embedding-block-size'], DEFAULT_EMBEDDING_BLOCK_SIZE, { integer: true, min: 16 });
    if ((embeddingBlockSize & (embeddingBlockSize - 1)) !== 0) throw new EdgeloraError(`must be a power of two (16, 32, 64, …), not ${embeddingBlockSize}`, { where: '--embedding-block-size' });
    if (values['embedding-block-size'] !== undefined && embeddings === 'float') {
      throw new EdgeloraError('applies to a quantized table, not --embeddings float', { where: '--embedding-block-size', hint: 'drop it, or pass --embeddings int8' });
    }
    if (values['double-quant'] && !(format === 'nf4' || format === 'fp4')) {
      throw new EdgeloraError(`applies to nf4/fp4, not ${format}`, { where: '--double-quant', hint: 'drop --double-quant, or pass --format nf4' });
    }
    // Everything that can be refused is refused before the first tensor is read.
    await expectDir(hfDir, 'hf-checkpoint');
    await checkOutputPath(outDir, { force: Boolean(values.force), what: 'the output directory' });
    let progress: Progress | null = null;
    const res = await quantizeModel(hfDir, outDir, {
      format,
      blockSize,
      doubleQuant: Boolean(values['double-quant']),
      embeddings,
      ...(embeddings === 'float' ? {} : { embeddingBlockSize }),
      int4AccuracyLevel,
      force: Boolean(values.force),
      onTensor: (name, i, total) => {
        progress ??= new Progress({ total, label: 'quantize', silent: Boolean(values.json) });
        progress.update(i, { tensor: name.replace(/^model\./, '') });
      },
    });
    if (values.json) {
      process.stdout.write(JSON.stringify({ dir: res.dir, seconds: res.seconds, manifest: res.manifest }) + '\n');
    } else {
      const m = res.manifest;
      process.stdout.write(
        `wrote ${res.dir}: ${m.quant.format} (block ${m.quant.blockSize}${m.quant.doubleQuant ? ', double-quant' : ''}, from ${m.quant.source}), ${m.quant.embeddings ?? 'float'} embeddings, ` +
          `${(m.parameters / 1e6).toFixed(2)}M parameters, ${((m.bytes.model + m.bytes.data) / 2 ** 20).toFixed(1)} MiB, ` +
          `fingerprint ${m.fingerprint.slice(0, 16)}… (source model ${m.sourceFingerprint?.slice(0, 16) ?? '?'}…: adapters bind to it), ${res.seconds.toFixed(1)} s\n`,
      );
    }
    return 0;
  },
};
