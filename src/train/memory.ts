// Peak-memory estimate of a fine-tuning plan, itemized (a MemoryPlan, as src/profiles/memory.ts uses),
// so a plan that would not fit is refused before it starts. Activations are the float32 tensors the
// backward keeps per decoder layer for B × T tokens; with recomputation only each layer's input stays
// alive, plus one layer's activations at a time.
//
// Dimension letters: B batch, T seq-len, C hidden, H heads, G kv heads, D head dim, F intermediate, V vocab.
import type { ModelConfig } from '../formats/hf-config.js';
import type { MemoryPlan } from '../profiles/memory.js';
import type { LoraTarget } from './graph.js';

export interface TrainMemoryInput {
  readonly cfg: ModelConfig;
  /** Bytes of the quantized model (model.onnx + model.onnx.data). */
  readonly baseBytes: number;
  /** Largest single base weight as float32 [N, K] (4-bit bases dequantize one at a time in backward). */
  readonly dequantBytes: number;
  readonly batch: number; // B
  readonly seqLen: number; // T
  readonly targets: readonly LoraTarget[];
  readonly dropout: boolean;
  readonly optimizer: 'adamw' | 'sgd';
  readonly recompute: boolean;
  /** Positions per chunk of the chunked lm_head + loss (src/train/graph.ts), when the graph is built chunked. */
  readonly lossChunkRows?: number;
  /** Node.js + onnxruntime resident baseline, default 120 MB (measured on linux-x64). */
  readonly runtimeBytes?: number;
}

export interface TrainMemoryEstimate extends MemoryPlan {
  /** Activations kept per layer without recomputation. */
  readonly perLayer: number;
  readonly perLayerRecompute: number;
}

/** float32 activations the backward keeps for one decoder layer, per token. */
function layerFloatsPerToken(cfg: ModelConfig, T: number, targets: readonly LoraTarget[], layer: number, dropout: boolean): number {
  const { hiddenSize: C, numHeads: H, numKvHeads: G, headDim: D, intermediateSize: F } = cfg;
  // rmsnorm ×2 (x, x², normed, scaled), q/k/v + RoPE copies, attention scores + probabilities (H·T per
  // query), context, residual, MLP gate / sigmoid / silu / up / product.
  let n = 2 * 4 * C + 3 * H * D + 4 * G * D + 2 * H * T + 2 * H * D + 2 * C + 5 * F;
  for (const t of targets) if (t.layer === layer) n += t.rank + (dropout ? 2 * t.K : 0);
  return n;
}

/**
 * Table rows dequantized at once by the chunked lm_head (src/train/graph.ts TABLE_CHUNK; repeated here so that this
 * file, which the serve process imports, does not pull in the graph builder).
 */
const TABLE_ROWS = 8192;

/**
 * What the process holds beyond the tensors counted below, as a fraction of one layer's activations, per layer. It was
 * 0.22 while recomputed layers left unread copies that ORT ran last, each keeping its MLP activation alive to the end
 * of the step (pruned now: src/train/graph.ts pruneDeadNodes), and while ORT's memory pattern sized one block per run.
 * What is left (ORT's session state for a ~17,000-node graph, kernel scratch such as an unpacked MatMulNBits'
 * dequantized B, allocator slack) is calibrated, not derived: measured peaks less every other item, r16 all-linear,
 * --recompute, malloc-tuned (src/runtime/malloc.ts): Qwen2.5-0.5B int4 + int8 table 1 × 512, 269 MiB = 0.11 of 24 ×
 * 103 MiB; Llama-3.2-1B the same, 193 MiB = 0.06 of 16 × 208 MiB; small nf4 4 × 256, 234 MiB = 0.17 of 12 × 113 MiB.
 * 0.115 puts the three plans within 9% of their peaks (−8%, +1%, +8%).
 */
const RESIDUE_PER_LAYER = 0.115;

export function estimateTrainingMemory(input: TrainMemoryInput): TrainMemoryEstimate {
  const { cfg, batch: B, seqLen: T, targets } = input;
  const tokens = B * T;
  const per = (l: number) => 4 * tokens * layerFloatsPerToken(cfg, T, targets, l, input.dropout);
  const perPlain = (l: number) => 4 * tokens * layerFloatsPerToken(cfg, T, targets, l, false);
  let all = 0;
  let maxLayer = 0;
  for (let l = 0; l < cfg.numLayers; l++) {
    all += per(l);
    maxLayer = Math.max(maxLayer, per(l));
  }
  const boundary = 4 * tokens * cfg.hiddenSize;
  let params = 0;
  for (const t of targets) params += t.rank * (t.K + t.N);
  const act = `activations (${B} × ${T} tokens${input.recompute ? ', recomputed per layer' : ''})`;
  const breakdown: Record<string, number> = { 'base model (read in place)': input.baseBytes };
  if (input.lossChunkRows && input.recompute) {
    // Between forward and backward only the layer inputs stay. The step's other peak is whichever is larger: one
    // layer recomputed with its backward's temporaries (2 × its activations), or one loss chunk: its logits and the
    // SoftmaxCrossEntropyLoss body's [rows, V] tensors (six alive at once in ORT's plan) and two table slices.
    const rows = Math.min(tokens, input.lossChunkRows);
    const lossChunk = 6 * 4 * rows * cfg.vocabSize + 2 * 4 * TABLE_ROWS * cfg.hiddenSize;
    breakdown[`${act}: layer inputs`] = cfg.numLayers * boundary;
    breakdown['working set: max(one layer and its backward, one loss chunk)'] = Math.max(2 * maxLayer, lossChunk);
    let layers = 0;
    for (let l = 0; l < cfg.numLayers; l++) layers += perPlain(l);
    breakdown[`ORT session and allocator overhead, ${RESIDUE_PER_LAYER} of each layer's activations (calibrated)`] = RESIDUE_PER_LAYER * layers;
  } else {
    breakdown[act] = input.recompute ? cfg.numLayers * boundary + 2 * maxLayer : all + 2 * maxLayer / cfg.numLayers;
    // Full: logits, log-probabilities and their gradient, [B·T, V] each. Chunked: one chunk's logits,
    // log-probabilities, one-hot targets and gradient, [rows, V] each.
    breakdown['logits and their gradient'] = input.lossChunkRows ? 4 * 4 * Math.min(tokens, input.lossChunkRows) * cfg.vocabSize : 3 * 4 * tokens * cfg.vocabSize;
  }
  Object.assign(breakdown, {
    'dequantized weight in backward': input.dequantBytes,
    'LoRA parameters': 4 * params * 2, // host copy + fed copy
    'LoRA gradients': 4 * params * 2,
    'optimizer state': input.optimizer === 'adamw' ? 8 * params : 0,
    runtime: input.runtimeBytes ?? 120e6,
  });
  const bytes = Object.values(breakdown).reduce((a, b) => a + b, 0);
  return {
    what: `fine-tuning (batch ${B} × seq-len ${T}, ${targets.length} LoRA modules)`,
    bytes,
    breakdown,
    lower: ['--batch-size', '--seq-len', ...(input.recompute ? [] : ['add --recompute']), '--rank / --targets'],
    perLayer: per(0),
    perLayerRecompute: boundary,
  };
}
