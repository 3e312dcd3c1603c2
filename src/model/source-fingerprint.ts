// The source model's fingerprint: what an adapter binds to (base-identity.ts). sha256 over the canonical
// config and every tensor the model reads, as float32 values, in name order. It does not depend on the
// quantization (nf4, fp4, int4, fp32), the block size or the vocabulary-table choice, nor on whether the
// checkpoint stores bf16, f16 or f32 bytes of the same values; the quantized model's own `fingerprint`
// (weights.ts startFingerprint) covers all of those. A pre-quantized bnb-4bit checkpoint is its own
// source: its linears are hashed as the codes and absmax it ships.
import { createHash } from 'node:crypto';
import { canonicalJson } from '../util/canonical-json.js';
import { SafetensorsReader } from '../formats/safetensors.js';
import { loadHfConfig, expectedWeightShapes } from '../formats/hf-config.js';
import { readBnbWeight, type BnbWeight } from '../quant/bnb-checkpoint.js';

/** Bumped if what is hashed ever changes; part of the hashed bytes. */
export const SOURCE_FINGERPRINT_FORMAT = 'edgelora-source/1';

/**
 * config.json fields that describe how a checkpoint was saved, not what it computes: a bf16 checkpoint
 * upcast to f32 (torch_dtype changes) or re-saved by another transformers release is the same model.
 */
const IGNORED_CONFIG_KEYS = ['_name_or_path', 'transformers_version', 'torch_dtype'];

function sourceConfig(raw: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(raw).filter(([k]) => !IGNORED_CONFIG_KEYS.includes(k)));
}

function bytesOf(a: Float32Array | Uint8Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Collects per-tensor digests in any order (and any number of times per tensor), then hashes them sorted by name. */
export class SourceHasher {
  private readonly tensors = new Map<string, string>();

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** A float tensor's values (float32, whatever dtype the file stores). */
  addFloat(name: string, shape: readonly number[], values: Float32Array): void {
    if (this.tensors.has(name)) return;
    const h = createHash('sha256').update(bytesOf(values)).digest('hex');
    this.tensors.set(name, `f32|${shape.join(',')}|${h}`);
  }

  /** A linear a bnb-4bit checkpoint ships pre-quantized: its codes and (de-nested) absmax. */
  addBnb(name: string, q: BnbWeight): void {
    if (this.tensors.has(name)) return;
    const h = createHash('sha256').update(bytesOf(q.packed)).update(bytesOf(q.absmax)).digest('hex');
    this.tensors.set(name, `bnb4:${q.quantType}:${q.blockSize}|${q.shape.join(',')}|${h}`);
  }

  /** The fingerprint (64 hex digits) of the config and every tensor added. */
  digest(rawConfig: Record<string, unknown>): string {
    const tensors = [...this.tensors].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return createHash('sha256')
      .update(canonicalJson({ format: SOURCE_FINGERPRINT_FORMAT, config: sourceConfig(rawConfig), tensors }))
      .digest('hex');
  }
}

/** Hashes the tensors of `names` that the hasher has not seen yet, from a checkpoint. */
export async function addMissingTensors(hasher: SourceHasher, reader: SafetensorsReader, shapes: ReadonlyMap<string, number[]>): Promise<void> {
  for (const name of shapes.keys()) {
    if (hasher.has(name)) continue;
    const bnb = ['nf4', 'fp4'].some((t) => reader.has(`${name}.quant_state.bitsandbytes__${t}`));
    if (bnb) {
      const q = await readBnbWeight(async (n) => (reader.has(n) ? { dtype: reader.info(n).dtype, shape: reader.info(n).shape, data: await reader.readRaw(n) } : undefined), name);
      hasher.addBnb(name, q);
    } else {
      hasher.addFloat(name, reader.info(name).shape, await reader.readF32(name));
    }
  }
}

/** The source fingerprint of a Hugging Face checkpoint directory (reads every tensor the model uses once). */
export async function sourceFingerprintOfCheckpoint(hfDir: string): Promise<string> {
  const { config: cfg, raw } = await loadHfConfig(hfDir);
  const reader = await SafetensorsReader.open(hfDir);
  try {
    const hasher = new SourceHasher();
    await addMissingTensors(hasher, reader, expectedWeightShapes(cfg));
    return hasher.digest(raw);
  } finally {
    await reader.close();
  }
}

/** The source fingerprint of a GGUF file: its converted config and the file's sha256 (one file, one model). */
export function sourceFingerprintOfGguf(rawConfig: Record<string, unknown>, ggufSha256: string): string {
  return createHash('sha256')
    .update(canonicalJson({ format: SOURCE_FINGERPRINT_FORMAT, config: sourceConfig(rawConfig), gguf: ggufSha256 }))
    .digest('hex');
}
