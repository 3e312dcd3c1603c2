// The training graph: the SAME model definition as inference (buildLlama, mode 'train') + the loss
// (mean token NLL, Hugging Face convention) + its reverse-mode derivative (graph/autodiff.ts) for the
// LoRA inputs only. The frozen base is referenced in the quantized model's own data file (no copy).
//
// Dimension letters: B batch, T tokens, V vocab, K in features, N out features, R LoRA rank.
import { Graph, type Value } from '../graph/builder.js';
import { toOnnxBytes } from '../graph/onnx.js';
import { differentiate, type RuntimeFeed } from '../graph/autodiff.js';
import { buildLlama, INPUT, linearShape, type Proj } from '../model/llama.js';
import { QuantizedWeights } from '../model/weights.js';
import type { Manifest } from '../model/manifest.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { EdgeloraError } from '../util/errors.js';

export const TRAIN_INPUT = {
  /** int64 [B, T]: the label each position predicts (labels shifted left by one), -100 = no loss. */
  targets: 'train.targets',
  /** float32 [1]: 1 / (label tokens in the whole optimizer step), so the loss is a mean over them. */
  lossScale: 'train.loss_scale',
};
export const TRAIN_OUTPUT = {
  /** float32 [1]: Σ NLL over this micro-batch's label tokens × loss_scale. */
  loss: 'train.loss',
  gradA: (layer: number, proj: Proj) => `grad.${INPUT.loraA(layer, proj)}`, // [K, R]
  gradB: (layer: number, proj: Proj) => `grad.${INPUT.loraB(layer, proj)}`, // [R, N]
};
export const IGNORE = -100;

export interface LoraTarget {
  readonly layer: number;
  readonly proj: Proj;
  readonly rank: number; // R
  readonly K: number;
  readonly N: number;
}

export interface TrainGraphOptions {
  readonly targets: readonly LoraTarget[];
  /** Feed dropout masks on the LoRA inputs (graph inputs lora.{l}.{p}.dropout [B, T, K]). */
  readonly dropout: boolean;
  /** Recompute each decoder layer's activations in the backward pass (gradient checkpointing). */
  readonly recompute?: boolean;
  /** dX through a 4-bit base: in-graph dequantization (any EP) or MatMulBnb4 transB=0 (CUDA only). */
  readonly bnb4Backward?: 'dequantize' | 'transB0';
}

export interface TrainGraph {
  /** The ONNX model bytes; its external initializers point into `dataFile` by offset. */
  readonly bytes: Uint8Array;
  /** The quantized model's data file (absolute path) the graph reads the frozen base from. */
  readonly dataFile: string | null;
  /** Constant inputs the backward needs fed on every run (codebooks, nibble masks). */
  readonly runtimeFeeds: Map<string, RuntimeFeed>;
  readonly nodes: number;
}

/** LoRA targets for a rank and a list of projections, on every layer. */
export function loraTargets(cfg: ModelConfig, projs: readonly Proj[], rank: (layer: number, proj: Proj) => number): LoraTarget[] {
  const out: LoraTarget[] = [];
  for (let layer = 0; layer < cfg.numLayers; layer++) {
    for (const proj of projs) {
      const { N, K } = linearShape(cfg, proj);
      out.push({ layer, proj, rank: rank(layer, proj), K, N });
    }
  }
  return out;
}

/** Builds the training graph over a quantized model directory. */
export async function buildTrainGraph(dir: string, manifest: Manifest, cfg: ModelConfig, opts: TrainGraphOptions): Promise<TrainGraph> {
  const qw = await QuantizedWeights.open(dir, manifest);
  const g = new Graph({ external: qw.referencingSink('the training graph') });
  const byKey = new Map(opts.targets.map((t) => [`${t.layer}.${t.proj}`, t]));
  if (byKey.size === 0) throw new EdgeloraError('no LoRA targets to train', { where: '--targets' });
  const { logits, loraInputs } = await buildLlama(g, cfg, qw, {
    mode: 'train',
    lora: (layer, proj) => {
      const t = byKey.get(`${layer}.${proj}`);
      return t ? { rank: t.rank, dropout: opts.dropout } : null;
    },
  });
  // logits stay internal: the training run returns only the loss and the gradients.
  g.outputs.splice(g.outputs.indexOf(logits), 1);
  const V = cfg.vocabSize;
  const targets = g.input(TRAIN_INPUT.targets, 'int64', ['B', 'T']);
  const lossScale = g.input(TRAIN_INPUT.lossScale, 'float32', [1]);
  const loss = g.withScope('loss', () => {
    const scores = g.reshape(logits, ['BT', V]); // [B·T, V]
    const labels = g.reshape(targets, ['BT']);
    const [nllSum] = g.node('SoftmaxCrossEntropyLoss', [scores, labels], [{ dtype: 'float32', shape: [] }, { dtype: 'float32', shape: ['BT', V] }], {
      reduction: { kind: 'string', value: 'sum' },
      ignore_index: { kind: 'int', value: IGNORE },
    });
    return g.mul(nllSum!, lossScale); // [1]
  });
  g.output(loss, TRAIN_OUTPUT.loss);
  const wrt: Value[] = [];
  for (const t of opts.targets) {
    const l = loraInputs.get(`${t.layer}.${t.proj}`)!;
    wrt.push(l.aT, l.bT);
  }
  const ad = differentiate(g, g.value(TRAIN_OUTPUT.loss), wrt, {
    bnb4Backward: opts.bnb4Backward ?? 'dequantize',
    ...(opts.recompute ? { segmentOf: (n) => /^layers\.\d+(?=\.)/.exec(n.name)?.[0] ?? null } : {}),
  });
  const bytes = toOnnxBytes(g, { name: `edgelora train ${cfg.architecture}` });
  return {
    bytes,
    dataFile: qw.dataFile ? `${dir.replace(/\/$/, '')}/${qw.dataFile}` : null,
    runtimeFeeds: ad.runtimeFeeds,
    nodes: g.nodes.length,
  };
}
