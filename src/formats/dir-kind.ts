// What a directory a user pointed at holds (a Hugging Face checkpoint, a quantized model, a PEFT
// adapter, …), so that "wrong kind of directory" errors say what it is and which command fits.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { EdgeloraError } from '../util/errors.js';

export type DirKind = 'missing' | 'file' | 'quantized-model' | 'hf-checkpoint' | 'adapter' | 'other';

const has = (dir: string, name: string) => fs.stat(path.join(dir, name)).then(() => true, () => false);

/** Decided by the files each kind always has: manifest.json, adapter_config.json, config.json. */
export async function dirKind(dir: string): Promise<DirKind> {
  const st = await fs.stat(dir).catch(() => null);
  if (st === null) return 'missing';
  if (!st.isDirectory()) return 'file';
  if (await has(dir, 'manifest.json')) return 'quantized-model';
  if (await has(dir, 'adapter_config.json')) return 'adapter';
  if (await has(dir, 'config.json')) return 'hf-checkpoint';
  return 'other';
}

const WHAT: Record<DirKind, string> = {
  missing: 'does not exist',
  file: 'is a file, not a directory',
  'quantized-model': 'is a quantized model directory',
  'hf-checkpoint': 'is a Hugging Face checkpoint',
  adapter: 'is a LoRA adapter directory',
  other: 'holds none of the files edgelora knows',
};

/** What to do when `dir` is of `kind` but `want` was needed. */
const HINT: Record<'quantized-model' | 'adapter' | 'hf-checkpoint', Partial<Record<DirKind, string>> & { default: string }> = {
  'quantized-model': {
    'hf-checkpoint': 'quantize it first: `edgelora quantize DIR OUT-DIR`, then pass OUT-DIR',
    adapter: 'pass the adapter with --adapter, and --model the quantized base it was trained on',
    default: 'pass a directory written by `edgelora quantize` (it holds manifest.json)',
  },
  adapter: {
    'quantized-model': 'pass an adapter directory (adapter_config.json), e.g. one written by `edgelora finetune --out`',
    'hf-checkpoint': 'pass an adapter directory (adapter_config.json), e.g. one written by `edgelora finetune --out`',
    default: 'pass a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)',
  },
  'hf-checkpoint': {
    'quantized-model': 'this one is already quantized: pass it to --model, or quantize its source checkpoint',
    default: 'pass a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), e.g. from `edgelora demo-model`',
  },
};

const NOUN: Record<keyof typeof HINT, string> = {
  'quantized-model': 'a quantized model directory',
  adapter: 'an adapter directory',
  'hf-checkpoint': 'a Hugging Face checkpoint',
};

/** Throws unless `dir` is a directory of kind `want`; the message says what it is instead. */
export async function expectDir(dir: string, want: keyof typeof HINT): Promise<void> {
  const kind = await dirKind(dir);
  if (kind === want) return;
  const hints = HINT[want];
  throw new EdgeloraError(kind === 'missing' || kind === 'file' ? WHAT[kind] : `${WHAT[kind]}, not ${NOUN[want]}`, {
    where: dir,
    hint: hints[kind] ?? hints.default,
  });
}
