// `edgelora adapter merge`: a float Hugging Face checkpoint with an adapter's deltas merged in
// (W' = W + scale · B·A), for runtimes that only take merged weights. The product runs in ORT (one
// small graph per adapted weight), one tensor at a time; the output directory is written atomically.
import ort from 'onnxruntime-node';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Graph } from '../graph/builder.js';
import { toOnnxBytes } from '../graph/onnx.js';
import { SafetensorsReader, writeSafetensors, type WriteEntry } from '../formats/safetensors.js';
import { loadHfConfig } from '../formats/hf-config.js';
import { writeDirAtomic } from '../util/atomic.js';
import { linearWeightName } from '../model/llama.js';
import { loadAdapter, readBinding, type LoraModule } from './peft.js';
import { matchBase } from '../model/base-identity.js';
import { sourceFingerprintOfCheckpoint } from '../model/source-fingerprint.js';
import { EdgeloraError } from '../util/errors.js';
import { createSession } from '../runtime/sessions.js';

const COPIED = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json'];

/** One ORT session computing W + s·(B·A) for W [N, K], B [N, r], A [r, K] (symbolic sizes). */
async function mergeSession(): Promise<ort.InferenceSession> {
  const g = new Graph();
  const w = g.input('w', 'float32', ['N', 'K']);
  const b = g.input('b', 'float32', ['N', 'R']);
  const a = g.input('a', 'float32', ['R', 'K']);
  const s = g.input('s', 'float32', [1]);
  g.output(g.add(w, g.mul(g.matmul(b, a), s)), 'merged');
  return createSession({ kind: 'merge', model: toOnnxBytes(g), where: 'edgelora adapter merge' });
}

/**
 * Merges into a float checkpoint after checking that the adapter belongs to it: an adapter bound to a
 * source model (edgelora_adapter.json `source_fingerprint`) is refused on another source, before anything
 * is written. Adapters without that binding (made elsewhere, or before it existed) are checked by shape
 * only, and `note` says so.
 */
export async function mergeAdapter(
  hfDir: string,
  adapterDir: string,
  outDir: string,
  opts: { scale?: number; force?: boolean } = {},
): Promise<{ merged: number; note: string | null }> {
  const { config: cfg } = await loadHfConfig(hfDir);
  const binding = await readBinding(adapterDir);
  let note: string | null = null;
  if (binding.sourceFingerprint !== null) {
    // One extra read of the checkpoint (hashing), so that a refusal leaves nothing behind.
    const source = await sourceFingerprintOfCheckpoint(hfDir);
    const match = matchBase(binding, { fingerprint: null, sourceFingerprint: source, quant: 'the float checkpoint' });
    if (match.kind === 'refused') throw new EdgeloraError(match.message, { where: `${adapterDir} → ${hfDir}`, hint: 'merge into the float checkpoint the adapter was fine-tuned from (the one its base was quantized from)' });
  } else if (binding.fingerprint !== null) {
    note = `${adapterDir} predates source-model binding: that ${hfDir} is its model is not checked (shapes only)`;
  }
  const adapter = await loadAdapter(adapterDir, { cfg, fingerprint: null });
  const byWeight = new Map<string, LoraModule>();
  for (const m of adapter.modules.values()) byWeight.set(linearWeightName(m.layer, m.proj), m);
  const session = await mergeSession();
  const reader = await SafetensorsReader.open(hfDir);
  const userScale = opts.scale ?? 1;
  try {
    await writeDirAtomic(
      outDir,
      async (tmp) => {
        const entries: WriteEntry[] = reader.names().map((name) => {
          const info = reader.info(name);
          const m = byWeight.get(name);
          if (!m) return { name, dtype: info.dtype, shape: [...info.shape], data: () => reader.readRaw(name) };
          return {
            name,
            dtype: 'F32',
            shape: [...info.shape],
            data: async () => {
              const [N, K] = info.shape as [number, number];
              const out = await session.run({
                w: new ort.Tensor('float32', await reader.readF32(name), [N, K]),
                b: new ort.Tensor('float32', m.b, [N, m.r]),
                a: new ort.Tensor('float32', m.a, [m.r, K]),
                s: new ort.Tensor('float32', Float32Array.of(m.scale * userScale), [1]),
              });
              return out.merged!.data as Float32Array;
            },
          };
        });
        await writeSafetensors(path.join(tmp, 'model.safetensors'), entries, { format: 'pt' });
        for (const f of COPIED) {
          await fs.copyFile(path.join(hfDir, f), path.join(tmp, f)).catch((err: NodeJS.ErrnoException) => {
            if (err.code !== 'ENOENT') throw err;
          });
        }
      },
      { replace: opts.force ?? false },
    );
  } finally {
    await reader.close();
    await session.release();
  }
  return { merged: byWeight.size, note };
}
