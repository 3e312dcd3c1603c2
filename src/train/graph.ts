// The training graph: the SAME model definition as inference (buildLlama, mode 'train') + the loss
// (mean token NLL, Hugging Face convention) + its reverse-mode derivative (graph/autodiff.ts) for the
// LoRA inputs only. The frozen base is referenced in the quantized model's own data file (no copy).
//
// With `maxTokens` the lm_head and the loss run chunk by chunk over positions (LOSS_CHUNK rows at a time),
// and each chunk's gradient with respect to the hidden state is computed right there and fed back: the
// [B·T, V] logits, log-probabilities and their gradient never exist at once (with a 151,936 vocabulary they
// are 155 MB each per 256 tokens). Chunk j+1 is fenced behind chunk j's gradient so ORT cannot hoist all
// forwards first. The body's backward then starts from that gradient (autodiff's `seed`).
//
// Dimension letters: B batch, T tokens, V vocab, K in features, N out features, R LoRA rank.
import { Graph, type Dim, type Value } from '../graph/builder.js';
import { toOnnxBytes } from '../graph/onnx.js';
import { differentiate, type RuntimeFeed } from '../graph/autodiff.js';
import { buildLlama, INPUT, linearShape, lmHead, tableRows, siteKey, type LoraSite, type Proj, type TableWeight } from '../model/llama.js';
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

/**
 * Positions per lm_head + loss chunk. The vocab-sized tensors alive at once are one chunk's logits,
 * log-probabilities, one-hot targets and gradient: 4 × 64 × 151,936 × 4 B = 156 MB for Qwen2.5, instead of
 * 3 × B·T × V (934 MB at 1 × 512).
 */
export const LOSS_CHUNK = 64;
/** Rows of a quantized table dequantized at once for dX = dlogits · W ([Vc, C] float: 29 MB at C = 896). */
export const TABLE_CHUNK = 8192;
/** Runtime-fed int64 [V] = 0..V−1: row ids for dequantizing a quantized table in slices (a constant would be folded). */
export const VOCAB_IDS = 'train.vocab_ids';

export interface LoraTarget extends LoraSite {
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
  /**
   * The most tokens (B·T) one run will see: set, the lm_head and the loss run in LOSS_CHUNK-position chunks
   * with each chunk's gradient fed back (see the file comment); unset, over all positions at once.
   */
  readonly maxTokens?: number;
  /** Positions per chunk (default LOSS_CHUNK) and table rows per dequantized slice (default TABLE_CHUNK); tests shrink them. */
  readonly lossChunk?: number;
  readonly tableChunk?: number;
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
  const byKey = new Map(opts.targets.map((t) => [siteKey(t), t]));
  if (byKey.size === 0) throw new EdgeloraError('no LoRA targets to train', { where: '--targets' });
  const chunked = opts.maxTokens !== undefined;
  const { hidden, head, loraInputs } = await buildLlama(g, cfg, qw, {
    mode: 'train',
    lora: (layer, proj) => {
      const t = byKey.get(siteKey({ layer, proj }));
      return t ? { rank: t.rank, dropout: opts.dropout } : null;
    },
    // The lm_head is emitted here: through a quantized table it reads the table in dequantized slices (logitsThroughTable).
    lmHead: false,
  });
  const V = cfg.vocabSize;
  const targets = g.input(TRAIN_INPUT.targets, 'int64', ['B', 'T']);
  const lossScale = g.input(TRAIN_INPUT.lossScale, 'float32', [1]);
  let seed: Value | undefined;
  const extraFeeds = new Map<string, RuntimeFeed>();
  if (chunked) {
    const r = chunkedLoss(g, cfg, hidden, head, targets, lossScale, { maxTokens: opts.maxTokens!, rows: opts.lossChunk ?? LOSS_CHUNK, tableRows: opts.tableChunk ?? TABLE_CHUNK }, extraFeeds);
    g.output(r.loss, TRAIN_OUTPUT.loss);
    seed = r.dHidden;
  } else {
    const loss = g.withScope('loss', () => {
      const flat = g.reshape(hidden, ['BT', cfg.hiddenSize]); // [B·T, C]
      const scores = head.kind === 'float' ? lmHead(g, flat, head, V, cfg.hiddenSize) : logitsThroughTable(g, flat, head, V, cfg.hiddenSize, vocabIdsOf(g, V, extraFeeds), opts.tableChunk ?? TABLE_CHUNK, false); // [B·T, V]
      const labels = g.reshape(targets, ['BT']);
      const [nllSum] = g.node('SoftmaxCrossEntropyLoss', [scores, labels], [{ dtype: 'float32', shape: [] }, { dtype: 'float32', shape: ['BT', V] }], {
        reduction: { kind: 'string', value: 'sum' },
        ignore_index: { kind: 'int', value: IGNORE },
      });
      return g.mul(nllSum!, lossScale); // [1]
    });
    g.output(loss, TRAIN_OUTPUT.loss);
  }
  const wrt: Value[] = [];
  for (const t of opts.targets) {
    const l = loraInputs.get(siteKey(t))!;
    wrt.push(l.aT, l.bT);
  }
  const ad = differentiate(g, seed ? hidden : g.value(TRAIN_OUTPUT.loss), wrt, {
    bnb4Backward: opts.bnb4Backward ?? 'dequantize',
    ...(seed ? { seed } : {}),
    ...(opts.recompute ? { segmentOf: (n) => /^layers\.\d+(?=\.)/.exec(n.name)?.[0] ?? null } : {}),
  });
  pruneDeadNodes(g);
  // The quantized table's own initializers are declared by the weight provider but read here only through their
  // lookup aliases (tableRows); dropped, so ORT does not warn about them on every run.
  const used = g.readNames();
  for (const name of [...g.initializers.keys()]) if (!used.has(name)) g.initializers.delete(name);
  const bytes = toOnnxBytes(g, { name: `edgelora train ${cfg.architecture}` });
  return {
    bytes,
    dataFile: qw.dataFile ? `${dir.replace(/\/$/, '')}/${qw.dataFile}` : null,
    runtimeFeeds: new Map([...ad.runtimeFeeds, ...extraFeeds]),
    nodes: g.nodes.length,
  };
}

/**
 * Drops nodes no graph output depends on. A recomputed layer (autodiff's `segmentOf`) is emitted whole, but its
 * backward reads only some of its values: the copies of its down_proj, its residual sums and its output feed nothing.
 * ORT runs such leaves anyway, and last, so each kept its inputs (the layer's [B·T, F] MLP activation, 9.5 MiB
 * a layer at 1 × 512 on Qwen2.5-0.5B) alive from its layer's backward to the end of the step: 24 layers' worth at
 * the step's peak (measured by replaying ORT's profile). Removing them changes no output.
 */
function pruneDeadNodes(g: Graph): void {
  const needed = new Set(g.outputs.map((v) => v.name));
  const keep = new Array<boolean>(g.nodes.length).fill(false);
  for (let i = g.nodes.length - 1; i >= 0; i--) {
    const n = g.nodes[i]!; // nodes are in topological order: consumers after producers
    if (!n.outputs.some((o) => needed.has(o))) continue;
    keep[i] = true;
    for (const x of n.inputs) if (x) needed.add(x);
  }
  let j = 0;
  for (let i = 0; i < g.nodes.length; i++) if (keep[i]) g.nodes[j++] = g.nodes[i]!;
  g.nodes.length = j;
}

/** The runtime-fed row ids 0..V−1 (VOCAB_IDS), added to the graph and `feeds` on first use. */
function vocabIdsOf(g: Graph, V: number, feeds: Map<string, RuntimeFeed>): () => Value {
  return () => {
    if (!feeds.has(VOCAB_IDS)) {
      feeds.set(VOCAB_IDS, { dtype: 'int64', shape: [V], data: BigInt64Array.from({ length: V }, (_, i) => BigInt(i)) });
      g.input(VOCAB_IDS, 'int64', [V]);
    }
    return g.value(VOCAB_IDS);
  };
}

/** A zero (float [1]) that exists only once `after` does: adding it orders work behind `after` (NaN stays NaN). */
function fenceF32(g: Graph, after: Value): Value {
  return g.mul(g.reshape(g.slice(g.reshape(after, ['n*']), 0, 0, 1, 1), [1]), g.constF32([0], [1]));
}

/** An int64 zero [1] that exists only once `after` does (IsNaN → 0/1 → ×0: never NaN, unlike a float cast). */
function fenceI64(g: Graph, after: Value): Value {
  const first = g.reshape(g.slice(g.reshape(after, ['n*']), 0, 0, 1, 1), [1]);
  const nan = g.node('IsNaN', [first], [{ dtype: 'bool', shape: [1] }])[0]!;
  return g.mul(g.cast(nan, 'int64'), g.constI64([0], [1]));
}

/**
 * dX = d · W for d [M, V] through the lm_head table: float, one MatMul on the table as stored; quantized,
 * dequantized TABLE_CHUNK rows at a time (GatherBlockQuantized on runtime-fed row ids) and accumulated, so
 * no float copy of the table ever exists. [M, V] → [M, C].
 */
function dxThroughTable(g: Graph, d: Value, head: TableWeight, V: number, C: number, vocabIds: () => Value, chunk: number): Value {
  if (head.kind === 'float') return g.matmul(d, head.w);
  let acc: Value | null = null;
  for (let v0 = 0; v0 < V; v0 += chunk) {
    const v1 = Math.min(V, v0 + chunk);
    // Each slice waits for the previous one's product (the first for d), so one [Vc, C] float slice exists at a time.
    const ids = g.add(g.slice(vocabIds(), 0, v0, v1, v1 - v0), fenceI64(g, acc ?? d));
    const w = tableRows(g, head, ids, C); // [Vc, C]
    const part = g.matmul(g.slice(d, 1, v0, v1, v1 - v0), w); // [M, C]
    acc = acc ? g.add(acc, part) : part;
  }
  return acc!;
}

/**
 * logits = h · tableᵀ for h [M, C] through a quantized table, dequantized TABLE_CHUNK rows at a time like
 * dxThroughTable: the training graph never hands the table to MatMulNBits, so ORT never prepacks it (a second,
 * anonymous copy beside the file-backed one: ~150 MiB for Qwen2.5's int8 table, and ~290 MiB more while it
 * packs at session start). [M, C] → [M, V].
 */
function logitsThroughTable(g: Graph, h: Value, head: TableWeight, V: number, C: number, vocabIds: () => Value, chunk: number, fenced: boolean): Value {
  const parts: Value[] = [];
  let prev: Value = h;
  for (let v0 = 0; v0 < V; v0 += chunk) {
    const v1 = Math.min(V, v0 + chunk);
    // Fenced (chunked loss): each slice waits for the previous product. Unfenced (the full-logits graph, which
    // autodiff differentiates): a fence would put the row ids on the path from the LoRA inputs.
    const slice = g.slice(vocabIds(), 0, v0, v1, v1 - v0);
    const ids = fenced ? g.add(slice, fenceI64(g, prev)) : slice;
    const w = tableRows(g, head, ids, C); // [Vc, C]
    prev = g.matmul(h, g.transpose(w, [1, 0])); // [M, Vc] (ORT fuses the transpose into the product)
    parts.push(prev);
  }
  return parts.length === 1 ? parts[0]! : g.concat(parts, 1, V);
}

/**
 * Σ NLL · lossScale over all positions, and its gradient with respect to `hidden` [B, T, C], computed
 * LOSS_CHUNK positions at a time. Per chunk the gradient of the summed NLL by the logits is
 * (softmax − onehot(target)) · lossScale on counted rows (the SoftmaxCrossEntropyLoss rule in autodiff.ts),
 * then dX through the table. Positions are padded to a multiple of the chunk with ignored targets.
 */
function chunkedLoss(
  g: Graph,
  cfg: ModelConfig,
  hidden: Value,
  head: TableWeight,
  targets: Value,
  lossScale: Value,
  sizes: { maxTokens: number; rows: number; tableRows: number },
  feeds: Map<string, RuntimeFeed>,
): { loss: Value; dHidden: Value } {
  const { vocabSize: V, hiddenSize: C } = cfg;
  const Tc = sizes.rows;
  const chunks = Math.max(1, Math.ceil(sizes.maxTokens / Tc));
  const P = chunks * Tc;
  const vocabIds = vocabIdsOf(g, V, feeds);
  return g.withScope('loss', () => {
    const flat = g.reshape(hidden, ['BT', C]); // [B·T, C]
    const labels = g.reshape(targets, ['BT']);
    const rows = g.shapeOf(flat, 0, 1); // int64 [1]: B·T
    const extra = g.sub(g.constI64([P]), rows);
    const zero = g.constI64([0]);
    const padTo = (x: Value, pads: Value, value: Value, shape: Dim[]) => g.node('Pad', [x, pads, value], [{ dtype: x.dtype, shape }])[0]!;
    const hP = padTo(flat, g.concat([zero, zero, extra, zero], 0, 4), g.constF32([0], []), [P, C]); // [P, C]
    const tP = padTo(labels, g.concat([zero, extra], 0, 2), g.constI64([IGNORE], []), [P]); // [P]
    const ign = g.constI64([IGNORE], [1]);
    let loss: Value | null = null;
    let prev: Value | null = null;
    const grads: Value[] = [];
    for (let j = 0; j < chunks; j++) {
      const a = j * Tc;
      let h = g.slice(hP, 0, a, a + Tc, Tc); // [Tc, C]
      if (prev) h = g.add(h, fenceF32(g, prev));
      const t = g.slice(tP, 0, a, a + Tc, Tc); // [Tc]
      const logitsJ = head.kind === 'float' ? lmHead(g, h, head, V, C) : logitsThroughTable(g, h, head, V, C, vocabIds, sizes.tableRows, true); // [Tc, V]
      const [nll, logp] = g.node('SoftmaxCrossEntropyLoss', [logitsJ, t], [{ dtype: 'float32', shape: [] }, { dtype: 'float32', shape: [Tc, V] }], {
        reduction: { kind: 'string', value: 'sum' },
        ignore_index: { kind: 'int', value: IGNORE },
      });
      loss = loss ? g.add(loss, nll!) : nll!;
      const isIgn = g.equal(t, ign);
      const keep = g.cast(g.node('Not', [isIgn], [{ dtype: 'bool', shape: [Tc] }])[0]!, 'float32');
      // Fenced behind this chunk's log-probabilities: the one-hot targets depend only on a graph input, and ORT
      // would otherwise build every chunk's [Tc, V] one-hot at the start of the step.
      const safe = g.add(g.where(isIgn, g.constI64([0], [1]), t), fenceI64(g, logp!));
      const onehot = g.node('OneHot', [safe, g.constI64([V], [1]), g.constF32([0, 1], [2])], [{ dtype: 'float32', shape: [Tc, V] }], { axis: { kind: 'int', value: -1 } })[0]!;
      const d = g.mul(g.sub(g.exp(logp!), onehot), g.mul(g.unsqueeze(keep, [1]), lossScale)); // [Tc, V]
      prev = dxThroughTable(g, d, head, V, C, vocabIds, sizes.tableRows); // [Tc, C]
      grads.push(prev);
    }
    const dP = chunks === 1 ? grads[0]! : g.concat(grads, 0, P); // [P, C]
    const dFlat = g.node('Slice', [dP, zero, rows, zero], [{ dtype: 'float32', shape: ['BT', C] }])[0]!;
    const dHidden = g.reshapeTo(dFlat, g.shapeOf(hidden), [...hidden.shape]);
    return { loss: g.mul(loss!, lossScale), dHidden };
  });
}
