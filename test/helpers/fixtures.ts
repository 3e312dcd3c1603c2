// Shared test fixtures: a tiny demo checkpoint and its quantized variants, made once per process in
// a temporary directory, plus helpers to read dequantized weights for the reference forward.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { makeDemoModel } from '../../src/formats/demo-model.js';
import { quantizeModel } from '../../src/model/quantize.js';
import type { QuantOptions } from '../../src/model/weights.js';
import { QuantizedWeights } from '../../src/model/weights.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig, type ModelConfig } from '../../src/formats/hf-config.js';
import { LINEAR_PROJS, linearWeightName } from '../../src/model/llama.js';

export function tempDir(prefix = 'edgelora-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A tiny float checkpoint at <root>/hf (seeded). */
export async function tinyCheckpoint(root: string, seed = 1): Promise<string> {
  const dir = path.join(root, 'hf');
  await makeDemoModel(dir, { preset: 'tiny', seed });
  return dir;
}

export async function quantized(hfDir: string, root: string, name: string, opts: Partial<QuantOptions> & { format: QuantOptions['format'] }): Promise<string> {
  const out = path.join(root, name);
  await quantizeModel(hfDir, out, {
    blockSize: opts.format === 'int4' ? 32 : 64,
    doubleQuant: false,
    ...opts,
  });
  return out;
}

/** All float weights of a quantized model (4-bit linears dequantized), by Hugging Face name. */
export async function dequantizedWeights(dir: string): Promise<{ cfg: ModelConfig; W: (name: string) => Float32Array }> {
  const manifest = await readManifest(dir);
  const cfg = parseHfConfig(manifest.sourceConfig, dir);
  const qw = await QuantizedWeights.open(dir, manifest);
  const map = new Map<string, Float32Array>();
  for (const t of qw.tensors.values()) if (t.dtype === 'float32' && !t.name.startsWith('const_') && !/\.(T|absmax|scales|qscales)$/.test(t.name)) map.set(t.name, await qw.readF32(t.name));
  // A quantized vocabulary table, dequantized (a float one was read above).
  for (const name of ['model.embed_tokens.weight', 'lm_head.weight']) {
    if (qw.tableLayout(name, cfg.hiddenSize)) map.set(name, await qw.dequantizedTable(name, cfg.vocabSize, cfg.hiddenSize));
  }
  for (let l = 0; l < cfg.numLayers; l++) for (const p of LINEAR_PROJS) map.set(linearWeightName(l, p), await qw.dequantizedLinear(cfg, l, p));
  return {
    cfg,
    W: (name) => {
      const w = map.get(name);
      if (!w) throw new Error(`reference: no weight ${name}`);
      return w;
    },
  };
}
