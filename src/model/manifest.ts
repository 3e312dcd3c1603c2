// manifest.json of a quantized model directory: what the model is, how it was quantized, and its two
// fingerprints (the source model's, which adapters bind to, and this quantization's). Validated with zod at load.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';
import { expectDir } from '../formats/dir-kind.js';

export const MANIFEST_FILE = 'manifest.json';
export const MODEL_FILE = 'model.onnx';
export const DATA_FILE = 'model.onnx.data';
/** Bumped when the graph's inputs change: 2 = fused inference ops and grouped LoRA inputs. */
export const MODEL_FORMAT = 'edgelora-model/2';

export const manifestSchema = z.object({
  format: z.literal(MODEL_FORMAT),
  architecture: z.string(),
  quant: z.object({
    format: z.enum(['fp32', 'nf4', 'fp4', 'int4']),
    blockSize: z.number().int().positive(),
    doubleQuant: z.boolean(),
    /** Where the 4-bit codes came from: quantized here, or taken from a bnb-4bit checkpoint or a GGUF file. */
    source: z.enum(['float', 'bnb-4bit', 'gguf']),
    /** MatMulNBits accuracy_level (int4 only). */
    int4AccuracyLevel: z.number().int().min(0).max(4).optional(),
    /** The vocabulary table(s): float32, or symmetric 8/4-bit blocks (GatherBlockQuantized + MatMulNBits). Absent: float. */
    embeddings: z.enum(['float', 'int8', 'int4']).optional(),
    /** Elements of C per table scale (quantized tables only). */
    embeddingBlockSize: z.number().int().positive().optional(),
  }),
  /** The GGUF file a model was imported from (`edgelora import-gguf`): its name, sha256 and tensor types. */
  gguf: z
    .object({
      file: z.string(),
      sha256: z.string().regex(/^[0-9a-f]{64}$/),
      /** Tensor count per ggml type, e.g. {"Q4_K": 96, "Q6_K": 13, "F32": 25}. */
      types: z.record(z.string(), z.number().int().nonnegative()),
    })
    .optional(),
  /** sha256 (hex) over the canonical config, quantization options and every stored tensor: this quantization. */
  fingerprint: z.string().regex(/^[0-9a-f]{64}$/),
  /**
   * sha256 (hex) over the source checkpoint's config and tensors (source-fingerprint.ts): the same for every
   * quantization of one checkpoint; adapters bind to it. Absent in directories quantized before it existed:
   * those are known by `fingerprint` only (re-quantize to let adapters of their other quantizations in).
   */
  sourceFingerprint: z.string().regex(/^[0-9a-f]{64}$/).optional(),
  /** config.json of the source checkpoint, verbatim. */
  sourceConfig: z.record(z.string(), z.unknown()),
  parameters: z.number().int().nonnegative(),
  bytes: z.object({ model: z.number().int().nonnegative(), data: z.number().int().nonnegative() }),
  createdAt: z.string(),
  tool: z.string(),
});
export type Manifest = z.infer<typeof manifestSchema>;

export async function readManifest(dir: string): Promise<Manifest> {
  const file = path.join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch {
    // Say what the directory is instead (missing, a Hugging Face checkpoint, an adapter, …).
    await expectDir(dir, 'quantized-model');
    throw new EdgeloraError(`cannot read ${MANIFEST_FILE}`, { where: dir, hint: 'point --model at a directory written by `edgelora quantize`' });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`invalid JSON: ${(err as Error).message}`, { where: file });
  }
  const format = (json as { format?: unknown } | null)?.format;
  if (typeof format === 'string' && format.startsWith('edgelora-model/') && format !== MODEL_FORMAT) {
    throw new EdgeloraError(`model written as ${format}; this edgelora runs ${MODEL_FORMAT}`, {
      where: file,
      hint: 're-run `edgelora quantize` on the source checkpoint',
    });
  }
  const r = manifestSchema.safeParse(json);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new EdgeloraError(`field ${i.path.join('.') || '(root)'}: ${i.message}`, { where: file, hint: 're-run `edgelora quantize`' });
  }
  return r.data;
}
