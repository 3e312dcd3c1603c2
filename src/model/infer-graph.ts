// The LoRA-capable inference graph, built on demand over a quantized model directory. model.onnx on
// disk is the plain decoder (no LoRA inputs: a model without adapters pays nothing for them); the
// first adapter activation builds this twin, which points at the same external data file.
import { Graph, type ExternalDataSink } from '../graph/builder.js';
import { toOnnxBytes } from '../graph/onnx.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { EdgeloraError } from '../util/errors.js';
import { buildLlama } from './llama.js';
import { QuantizedWeights } from './weights.js';
import { DATA_FILE, type Manifest } from './manifest.js';

export async function buildLoraInferenceGraph(dir: string, manifest: Manifest, cfg: ModelConfig): Promise<Uint8Array> {
  const qw = await QuantizedWeights.open(dir, manifest);
  // Every large tensor is already in the model's data file: the sink only names it.
  const sink: ExternalDataSink = {
    minBytes: Number.POSITIVE_INFINITY,
    location: qw.dataFile ?? DATA_FILE,
    append: () => {
      throw new EdgeloraError('inference graph tried to write a new external tensor', { where: dir });
    },
  };
  const g = new Graph({ external: sink });
  await buildLlama(g, cfg, qw, { mode: 'infer', inferLora: true });
  return toOnnxBytes(g, { name: `edgelora ${cfg.architecture} ${manifest.quant.format} + LoRA` });
}
