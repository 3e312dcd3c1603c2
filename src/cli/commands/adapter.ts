// `edgelora adapter inspect` and `edgelora adapter merge`.
import path from 'node:path';
import { promises as fs } from 'node:fs';
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requirePositional, checkOutputPath } from '../command.js';
import { expectDir } from '../../formats/dir-kind.js';
import { readPeftConfig, moduleRankAlpha, ADAPTER_WEIGHTS, ADAPTER_BINDING, bindingSchema, isTargeted, loraScale, LORA_TENSOR_KEY } from '../../adapters/peft.js';
import { mergeAdapter } from '../../adapters/merge.js';
import { SafetensorsReader } from '../../formats/safetensors.js';
import { LINEAR_PROJS, type Proj } from '../../model/llama.js';

const inspectHelp = `Usage: edgelora adapter inspect <adapter-dir> [--json]

Shows a PEFT LoRA adapter: rank, alpha, scaling, targets, parameter count, bytes on disk, the source
model it is bound to (it applies to any quantization of it) and the quantized base it was trained on
(none for adapters made elsewhere).

Flags:
  --json      one JSON object
  -h, --help  this text`;

export const adapterInspectCommand: Command = {
  name: 'adapter inspect',
  summary: 'rank, alpha, scaling, targets, size and base fingerprint of an adapter',
  help: inspectHelp,
  async run(argv) {
    const { values, positionals, help } = parseFlags('adapter inspect', argv, { json: { type: 'boolean' } }, { positionals: ['adapter-dir'] });
    if (help) {
      process.stdout.write(inspectHelp + '\n');
      return 0;
    }
    const dir = requirePositional('adapter inspect', 'adapter-dir', positionals[0]);
    const config = await readPeftConfig(dir);
    const reader = await SafetensorsReader.open(path.join(dir, ADAPTER_WEIGHTS));
    let parameters = 0;
    const layers = new Set<number>();
    const dtypes = new Set<string>();
    const targets = new Set<string>();
    for (const n of reader.names()) {
      const info = reader.info(n);
      parameters += info.shape.reduce((a, b) => a * b, 1);
      dtypes.add(info.dtype);
      const m = LORA_TENSOR_KEY.exec(n);
      if (m) {
        layers.add(Number(m[1]));
        targets.add(m[3]!);
      }
    }
    await reader.close();
    const bytes = (await fs.stat(path.join(dir, ADAPTER_WEIGHTS))).size;
    let fingerprint: string | null = null;
    let sourceFingerprint: string | null = null;
    let trainedOn: string | null = null;
    try {
      const b = bindingSchema.safeParse(JSON.parse(await fs.readFile(path.join(dir, ADAPTER_BINDING), 'utf8')));
      if (b.success) {
        fingerprint = b.data.base_fingerprint;
        sourceFingerprint = b.data.source_fingerprint ?? null;
        trainedOn = b.data.quantization ?? null;
      }
    } catch {
      fingerprint = null;
    }
    const firstLayer = Math.min(...layers);
    const perTarget = [...targets].map((t) => {
      const proj = t as Proj;
      const ra = LINEAR_PROJS.includes(proj) && isTargeted(config, firstLayer, proj) ? moduleRankAlpha(config, firstLayer, proj) : null;
      return { module: t, r: ra?.r ?? config.r, alpha: ra?.alpha ?? config.lora_alpha, scaling: ra?.scale ?? loraScale(config.lora_alpha, config.r, config.use_rslora) };
    });
    const info = {
      dir,
      r: config.r,
      lora_alpha: config.lora_alpha,
      scaling: loraScale(config.lora_alpha, config.r, config.use_rslora),
      use_rslora: config.use_rslora,
      target_modules: config.target_modules,
      targets: perTarget,
      layers: [...layers].sort((a, b) => a - b),
      rank_pattern: config.rank_pattern,
      alpha_pattern: config.alpha_pattern,
      parameters,
      bytes,
      dtypes: [...dtypes],
      base_model_name_or_path: config.base_model_name_or_path ?? null,
      base_fingerprint: fingerprint,
      source_fingerprint: sourceFingerprint,
      trained_on: trainedOn,
    };
    if (values.json) {
      process.stdout.write(JSON.stringify(info) + '\n');
      return 0;
    }
    const lines = [
      `adapter      ${dir}`,
      `rank         ${info.r}${Object.keys(info.rank_pattern).length ? ` (rank_pattern ${JSON.stringify(info.rank_pattern)})` : ''}`,
      `alpha        ${info.lora_alpha}${Object.keys(info.alpha_pattern).length ? ` (alpha_pattern ${JSON.stringify(info.alpha_pattern)})` : ''}`,
      `scaling      ${info.scaling.toPrecision(4)}${info.use_rslora ? ' (rsLoRA: alpha/√r)' : ' (alpha/r)'}`,
      `targets      ${perTarget.map((t) => `${t.module}(r${t.r})`).join(', ')} in ${layers.size} layers`,
      `parameters   ${parameters.toLocaleString('en-US')} (${[...dtypes].join(', ')})`,
      `bytes        ${bytes.toLocaleString('en-US')}`,
      `source model ${sourceFingerprint ?? (fingerprint ? 'not recorded (adapter from before source binding: applies to its base quantization only)' : 'not bound (adapter made elsewhere)')}`,
      `trained on   ${fingerprint ? `${trainedOn ?? 'quantization not recorded'} (${fingerprint})` : 'not bound'}`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    return 0;
  },
};

const mergeHelp = `Usage: edgelora adapter merge <hf-base-dir> <adapter-dir> <out-dir> [flags]

Writes a float Hugging Face checkpoint with the adapter merged in (W + scaling·B·A), for runtimes
that only take merged weights. <hf-base-dir> is the float checkpoint the adapter's base was made from:
an adapter bound to another source model is refused and nothing is written (adapters made elsewhere,
or before edgelora bound adapters to their source model, are checked by shape only).

Flags:
  --scale S   multiply the adapter's own scaling by S (default 1)
  --force     replace <out-dir> if it exists
  --json      print {"out", "merged"} as JSON
  -h, --help  this text`;

export const adapterMergeCommand: Command = {
  name: 'adapter merge',
  summary: 'merge an adapter into a float Hugging Face checkpoint',
  help: mergeHelp,
  async run(argv) {
    const { values, positionals, help } = parseFlags('adapter merge', argv, {
      scale: { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    }, { positionals: ['hf-base-dir', 'adapter-dir', 'out-dir'] });
    if (help) {
      process.stdout.write(mergeHelp + '\n');
      return 0;
    }
    const base = requirePositional('adapter merge', 'hf-base-dir', positionals[0]);
    const adapter = requirePositional('adapter merge', 'adapter-dir', positionals[1]);
    const out = requirePositional('adapter merge', 'out-dir', positionals[2]);
    const scale = numberFlag('scale', values.scale, 1);
    await expectDir(base, 'hf-checkpoint');
    await expectDir(adapter, 'adapter');
    await checkOutputPath(out, { force: Boolean(values.force), what: 'the output directory' });
    const res = await mergeAdapter(base, adapter, out, { scale, force: Boolean(values.force) });
    if (res.note) process.stderr.write(`edgelora: note: ${res.note}\n`);
    if (values.json) process.stdout.write(JSON.stringify({ out, merged: res.merged }) + '\n');
    else process.stdout.write(`wrote ${out}: ${res.merged} weights merged\n`);
    return 0;
  },
};
