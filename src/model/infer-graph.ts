// The LoRA-capable inference graph, built on demand over a quantized model directory. model.onnx on
// disk is the plain decoder (no LoRA inputs: a model without adapters pays nothing for them); the
// first adapter activation builds this twin, which points at the same external data file.
import { Graph } from '../graph/builder.js';
import { toOnnxBytes } from '../graph/onnx.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { buildLlama } from './llama.js';
import { QuantizedWeights } from './weights.js';
import type { Manifest } from './manifest.js';

export async function buildLoraInferenceGraph(dir: string, manifest: Manifest, cfg: ModelConfig): Promise<Uint8Array> {
  const qw = await QuantizedWeights.open(dir, manifest);
  const g = new Graph({ external: qw.referencingSink('the LoRA inference graph') });
  await buildLlama(g, cfg, qw, { mode: 'infer', inferLora: true });
  return toOnnxBytes(g, { name: `edgelora ${cfg.architecture} ${manifest.quant.format} + LoRA` });
}
