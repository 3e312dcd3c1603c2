// `edgelora import-gguf`, `edgelora export-gguf` and `edgelora adapter export-gguf`: llama.cpp's GGUF
// both ways (thin layers over src/formats/gguf).
import { existsSync } from 'node:fs';
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requirePositional, requireFlag } from '../command.js';
import { importGguf } from '../../formats/gguf/import.js';
import { exportGgufBase, exportGgufAdapter, EXPORT_TYPES, type ExportType } from '../../formats/gguf/export.js';
import { EdgeloraError } from '../../util/errors.js';
import { Progress } from '../../util/progress.js';

function exportType(flag: string, v: string | undefined, dflt: ExportType): ExportType {
  if (v === undefined) return dflt;
  if (!(EXPORT_TYPES as readonly string[]).includes(v)) {
    throw new EdgeloraError(`unknown --${flag} "${v}"`, { where: `--${flag}`, hint: `use one of ${EXPORT_TYPES.join(', ')}` });
  }
  return v as ExportType;
}

function refuseExisting(out: string, force: boolean): void {
  if (!force && existsSync(out)) throw new EdgeloraError('output file already exists', { where: out, hint: 'pass --force to replace it' });
}

const importHelp = `Usage: edgelora import-gguf <model.gguf> <out-dir> [flags]

Converts a llama.cpp GGUF model (architecture llama or qwen2, GGUF v3) into an edgelora model
directory without re-quantizing: Q4_0, Q4_1 and Q4_K linears become 4-bit MatMulNBits (block 32;
Q4_1's and Q4_K's mins become float zero points), Q8_0, Q5_0 and Q6_K 8-bit MatMulNBits (block 32, 32,
16), F16/BF16/F32 float32.
Embedding and output tables are dequantized to float32. llama.cpp's q/k row permutation is undone,
Llama 3 rope scaling is fitted back from the rope_freqs tensor;
tokenizer.json and tokenizer_config.json (chat template included) are rebuilt from tokenizer.ggml.*
(byte-level BPE and SentencePiece vocabularies). manifest.json records the file's name, sha256 and tensor types.

Flags:
  --int4-accuracy 0|4  MatMulNBits accuracy_level: 4 quantizes activations to int8 (fast on CPU,
                       default), 0 keeps them float32
  --force              replace <out-dir> if it exists
  --json               print the manifest as JSON instead of a summary
  -h, --help           this text`;

export const importGgufCommand: Command = {
  name: 'import-gguf',
  summary: 'convert a llama.cpp GGUF model (llama/qwen2; Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, F16, BF16, F32)',
  help: importHelp,
  async run(argv) {
    const { values, positionals, help } = parseFlags('import-gguf', argv, {
      'int4-accuracy': { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    });
    if (help) {
      process.stdout.write(importHelp + '\n');
      return 0;
    }
    const file = requirePositional('import-gguf', 'model.gguf', positionals[0]);
    const out = requirePositional('import-gguf', 'out-dir', positionals[1]);
    let progress: Progress | null = null;
    const res = await importGguf(file, out, {
      accuracyLevel: numberFlag('int4-accuracy', values['int4-accuracy'] as string | undefined, 4, { integer: true, min: 0, max: 4 }),
      force: Boolean(values.force),
      onTensor: (name, i, total) => {
        progress ??= new Progress({ total, label: 'import', silent: Boolean(values.json) });
        progress.update(i, { tensor: name });
      },
    });
    const m = res.manifest;
    if (values.json) process.stdout.write(JSON.stringify({ dir: res.dir, seconds: res.seconds, manifest: m }) + '\n');
    else {
      const types = Object.entries(m.gguf?.types ?? {}).map(([t, n]) => `${n} ${t}`).join(', ');
      process.stdout.write(
        `wrote ${res.dir}: ${m.architecture} from ${m.gguf?.file} (${types}), ${(m.parameters / 1e6).toFixed(2)}M parameters, ` +
          `${((m.bytes.model + m.bytes.data) / 2 ** 20).toFixed(1)} MiB, fingerprint ${m.fingerprint.slice(0, 16)}…, ${res.seconds.toFixed(1)} s\n`,
      );
    }
    return 0;
  },
};

const exportHelp = `Usage: edgelora export-gguf <model-dir> <out.gguf> [flags]

Writes a GGUF file llama.cpp runs from an edgelora model directory. Linears whose codes fit the
asked type are copied as they are: 4-bit with zero point 8 and block 32 → q4_0, 8-bit with zero point
128 and block 32 → q8_0 (exact when every scale is an f16 value). Anything else is dequantized and
re-quantized with ggml's reference quantizer; the summary says how many tensors were.

Flags:
  --type f32|q8_0|q4_0        linear weights (default q4_0)
  --table-type f32|q8_0|q4_0  token embedding / output table (default f32 for --type f32, else q8_0)
  --force                     replace <out.gguf> if it exists
  --json                      print the report as JSON
  -h, --help                  this text`;

export const exportGgufCommand: Command = {
  name: 'export-gguf',
  summary: 'write a llama.cpp GGUF base model (f32, q8_0 or q4_0)',
  help: exportHelp,
  async run(argv) {
    const { values, positionals, help } = parseFlags('export-gguf', argv, {
      type: { type: 'string' },
      'table-type': { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    });
    if (help) {
      process.stdout.write(exportHelp + '\n');
      return 0;
    }
    const dir = requirePositional('export-gguf', 'model-dir', positionals[0]);
    const out = requirePositional('export-gguf', 'out.gguf', positionals[1]);
    refuseExisting(out, Boolean(values.force));
    const type = exportType('type', values.type as string | undefined, 'q4_0');
    const tableType = exportType('table-type', values['table-type'] as string | undefined, type === 'f32' ? 'f32' : 'q8_0');
    const rep = await exportGgufBase(dir, out, { type, tableType });
    if (values.json) process.stdout.write(JSON.stringify(rep) + '\n');
    else {
      process.stdout.write(
        `wrote ${out}: ${type} (table ${tableType}), ${rep.tensors} tensors, ${(rep.bytes / 2 ** 20).toFixed(1)} MiB; ` +
          `${rep.exact} copied exactly, ${rep.scalesRounded} with scales rounded to f16, ${rep.requantized} re-quantized\n`,
      );
    }
    return 0;
  },
};

const adapterHelp = `Usage: edgelora adapter export-gguf <adapter-dir> <out.gguf> --base <model-dir> [flags]

Writes a PEFT LoRA adapter as a llama.cpp LoRA GGUF (llama-cli --lora, llama_adapter_lora_init):
general.type adapter, adapter.type lora, adapter.lora.alpha, tensors blk.N.<proj>.weight.lora_a /
.lora_b in float32, q/k rows permuted to match a GGUF base written by \`edgelora export-gguf\` (or
llama.cpp's own converter) from the same weights. Modules whose PEFT scale is not alpha/r (rsLoRA,
rank or alpha patterns) get the difference folded into lora_b.

Flags:
  --base DIR    the edgelora model directory the adapter was trained on (required)
  --force       replace <out.gguf> if it exists
  --json        print {"file", "bytes", "modules", "alpha"} as JSON
  -h, --help    this text`;

export const adapterExportGgufCommand: Command = {
  name: 'adapter export-gguf',
  summary: 'write a LoRA adapter as a llama.cpp GGUF adapter',
  help: adapterHelp,
  async run(argv) {
    const { values, positionals, help } = parseFlags('adapter export-gguf', argv, {
      base: { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    });
    if (help) {
      process.stdout.write(adapterHelp + '\n');
      return 0;
    }
    const dir = requirePositional('adapter export-gguf', 'adapter-dir', positionals[0]);
    const out = requirePositional('adapter export-gguf', 'out.gguf', positionals[1]);
    const base = requireFlag('adapter export-gguf', 'base', values.base as string | undefined);
    refuseExisting(out, Boolean(values.force));
    const rep = await exportGgufAdapter(dir, out, base);
    if (values.json) process.stdout.write(JSON.stringify(rep) + '\n');
    else process.stdout.write(`wrote ${out}: ${rep.modules} LoRA modules, alpha ${rep.alpha}, ${(rep.bytes / 2 ** 10).toFixed(1)} KiB\n`);
    return 0;
  },
};
