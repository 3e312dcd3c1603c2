// The Llama-family model definition (Llama, Mistral, Qwen2): ONE function builds the decoder graph
// for inference (KV cache in/out) and for training (no cache; the trainer appends the loss and
// differentiates). `linear()` is the only place a linear layer is emitted: 4-bit (or fp32) base
// matmul + bias + the LoRA delta scale·(x·Aᵀ)·Bᵀ, with A and B as graph inputs.
//
// Dimension letters: B batch, T new tokens, P cached tokens, S = P + T, C hidden, H heads,
// G key/value heads, D head dim, F intermediate, V vocab, R LoRA rank.
import type { Graph, Value, Dim } from '../graph/builder.js';
import { int } from '../graph/builder.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { int4Layout } from '../quant/int4.js';
// The 4-bit forwards, with their gradient rules beside them (importing registers the rules into autodiff).
import { matMulBnb4, matMulNBits } from '../quant/ops.js';

export const LINEAR_PROJS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type Proj = (typeof LINEAR_PROJS)[number];

/** Hugging Face module path of a projection inside a layer, e.g. "self_attn.q_proj". */
export function projModule(proj: Proj): string {
  return proj.endsWith('_proj') && ['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(proj) ? `self_attn.${proj}` : `mlp.${proj}`;
}

/** The Hugging Face weight name of a layer's projection, e.g. model.layers.3.self_attn.q_proj.weight. */
export function linearWeightName(layer: number, proj: Proj): string {
  return `model.layers.${layer}.${projModule(proj)}.weight`;
}

/**
 * One linear layer of the decoder that a LoRA adapts: (layer, projection). Every record about such a layer
 * (an adapter's module, a trainer's parameters, a training graph's target, a linear's spec) is a LoraSite,
 * and `siteKey` is the one string key for it.
 */
export interface LoraSite {
  readonly layer: number;
  readonly proj: Proj;
}

/** "3.q_proj": the key of a site in every map (adapter modules, trainer parameters and checkpoints, graph LoRA inputs). */
export function siteKey(site: LoraSite): string {
  return `${site.layer}.${site.proj}`;
}

/** Layer order, then LINEAR_PROJS order (the order adapter tensors are written in). */
export function compareSites(x: LoraSite, y: LoraSite): number {
  return x.layer - y.layer || LINEAR_PROJS.indexOf(x.proj) - LINEAR_PROJS.indexOf(y.proj);
}

/** [out N, in K] of a projection for this config. */
export function linearShape(cfg: ModelConfig, proj: Proj): { N: number; K: number } {
  const C = cfg.hiddenSize;
  const qDim = cfg.numHeads * cfg.headDim;
  const kvDim = cfg.numKvHeads * cfg.headDim;
  switch (proj) {
    case 'q_proj': return { N: qDim, K: C };
    case 'k_proj': case 'v_proj': return { N: kvDim, K: C };
    case 'o_proj': return { N: C, K: qDim };
    case 'gate_proj': case 'up_proj': return { N: cfg.intermediateSize, K: C };
    case 'down_proj': return { N: C, K: cfg.intermediateSize };
  }
}

export interface LinearSpec extends LoraSite {
  readonly N: number; // out features
  readonly K: number; // in features
}

/** How a frozen base weight sits in the graph. */
export type BaseWeight =
  /** wT [K, N]: the PyTorch weight transposed, for a plain MatMul. */
  | { kind: 'fp32'; wT: Value }
  /** bitsandbytes layout for com.microsoft.MatMulBnb4: packed [(N·K+1)/2] uint8, absmax [ceil(N·K/bs)]. */
  | { kind: 'bnb4'; quantType: 'nf4' | 'fp4'; blockSize: number; packed: Value; absmax: Value }
  /**
   * ORT int4 (or int8) for com.microsoft.MatMulNBits: packed [N, K/bs, bs·bits/8], scales [N·K/bs], zero
   * points packed uint8 (or float32 [N·K/bs], GGUF Q4_K's mins). bits 4 (default layout) or 8 (GGUF Q8_0 /
   * Q6_K): MatMulNBits' bits attribute. accuracyLevel 4 quantizes activations to int8 inside the kernel (the
   * fast CPU path); 0 keeps them float32 (exact against a float reference).
   */
  | { kind: 'int4'; bits: 4 | 8; blockSize: number; packed: Value; scales: Value; zeroPoints: Value | null; accuracyLevel: number };

/**
 * How a vocabulary table [V, C] (the embedding, and the lm_head: the same one when tied) sits in the graph.
 * 'float': Gather for the lookup, Gemm(transB) for the lm_head (today's bitsandbytes-exact configuration).
 * 'quantized': symmetric blockwise along C in MatMulNBits' layout, packed [V, C/bs, bs·bits/8] uint8 and scales
 * [V, C/bs]; the lookup is com.microsoft.GatherBlockQuantized and the lm_head MatMulNBits, both reading the SAME
 * stored bytes (one copy in model.onnx.data). The lookup names them through alias initializers (see
 * Graph.aliasInitializer): ORT prepacks the lm_head's and releases it, while the lookup's mapping only ever touches
 * the rows it reads, so ORT holds one copy, not the prepacked one plus the original (measured: 130 MiB less RSS for
 * Qwen2.5-0.5B's int8 table). The alias also gives GatherBlockQuantized its scales as [V, C/bs, 1] without a
 * constant-folded Reshape copy.
 */
export type TableWeight =
  | { kind: 'float'; w: Value }
  | { kind: 'quantized'; bits: 4 | 8; blockSize: number; packed: Value; scales: Value; accuracyLevel: number };

/** Supplies weights to the graph (from a float checkpoint while quantizing, or from a quantized model). */
export interface WeightProvider {
  /** The base weight of one projection, added to `g` as initializers. */
  linear(g: Graph, spec: LinearSpec): Promise<BaseWeight>;
  /** A float tensor by Hugging Face name (norms, biases), added to `g`. */
  float(g: Graph, name: string, shape: number[]): Promise<Value>;
  /** A vocabulary table [V, C] by Hugging Face name (model.embed_tokens.weight, lm_head.weight), added to `g`. */
  table(g: Graph, name: string, shape: [number, number]): Promise<TableWeight>;
  /**
   * For a provider that writes the external data file (quantize): the order in which one projection group's
   * tensors are stored, by name (lower first): all codes, then all scales, so each is one span of the file.
   */
  readonly storageRank?: (name: string) => number;
}

/** The rows of `table` for `ids` [.., n] → [.., n, C] float (the lookup; also a quantized table's dequantizer). */
export function tableRows(g: Graph, table: TableWeight, ids: Value, C: number): Value {
  if (table.kind === 'float') return g.gather(table.w, ids);
  const V = table.packed.shape[0] as number;
  const kb = C / table.blockSize;
  const packed = g.aliasInitializer(table.packed.name, `${table.packed.name}.gather`, [...(table.packed.shape as number[])]);
  const scales = g.aliasInitializer(table.scales.name, `${table.scales.name}.gather`, [V, kb, 1]);
  const rows = g.contrib('GatherBlockQuantized', [packed, ids, scales], 'float32', [...ids.shape, kb, table.blockSize], {
    bits: int(table.bits),
    block_size: int(table.blockSize),
    gather_axis: int(0),
    quantize_axis: int(2),
  }); // [B, T, C/bs, bs]
  return g.reshape(rows, [...ids.shape, C]);
}

/**
 * Inference's lookup of a quantized table: the runtime reads each distinct token's stored row (codes and scales)
 * from model.onnx.data itself (src/runtime/table-rows.ts) and feeds them, and GatherBlockQuantized dequantizes
 * them here exactly as it would gather them from the table. The table's only reader in the graph is then the
 * lm_head, which ORT prepacks and releases, so no mapping of the table stays in memory: a lookup over a mapped
 * table kept 75 MiB of Qwen2.5-0.5B's 130 MiB int8 table resident after 256 tokens (page fault-around), and all
 * of it once enough distinct tokens had been seen.
 */
function fedTableRows(g: Graph, table: Extract<TableWeight, { kind: 'quantized' }>, C: number): Value {
  const kb = C / table.blockSize;
  const blob = table.packed.shape[2] as number;
  const rows = g.input(INPUT.tokenRows, 'uint8', ['U', kb, blob]);
  const scales = g.input(INPUT.tokenRowScales, 'float32', ['U', kb, 1]);
  const index = g.input(INPUT.tokenRowIndex, 'int64', ['B', 'T']);
  const out = g.contrib('GatherBlockQuantized', [rows, index, scales], 'float32', ['B', 'T', kb, table.blockSize], {
    bits: int(table.bits),
    block_size: int(table.blockSize),
    gather_axis: int(0),
    quantize_axis: int(2),
  }); // [B, T, C/bs, bs]
  return g.reshape(out, ['B', 'T', C]);
}

/**
 * Rows of the quantized table per lm_head MatMulNBits in inference: ORT prepacks one node's weight at a time and
 * then releases its mapping, so while the table is prepacked only one slice of its stored bytes is resident (a
 * whole-table node held Qwen2.5-0.5B's 130 MiB int8 table beside everything already prepacked: +112 MiB peak).
 */
export const LM_HEAD_SLICE_BYTES = 32 * 2 ** 20;

/** logits = x · tableᵀ: x [M, C] → [M, V], reading the table in its stored layout (never a transposed copy). */
export function lmHead(g: Graph, x: Value, table: TableWeight, V: number, C: number, opts: { sliceBytes?: number } = {}): Value {
  if (table.kind === 'float') return g.gemm(x, table.w, { transB: true });
  const kb = C / table.blockSize;
  const rowBytes = kb * ((table.packed.shape[2] as number) + 4);
  const sliceRows = Math.max(64, Math.floor((opts.sliceBytes ?? 0) / rowBytes / 64) * 64);
  const M = x.shape[0]!;
  if (opts.sliceBytes === undefined || sliceRows >= V || !g.externalSpan([table.packed.name]) || !g.externalSpan([table.scales.name])) {
    return matMulNBits(g, x, table, { N: V, K: C }, [M, V]);
  }
  const parts: Value[] = [];
  for (let r0 = 0; r0 < V; r0 += sliceRows) {
    const r1 = Math.min(V, r0 + sliceRows);
    const packed = g.rowsInitializer(table.packed.name, `${table.packed.name}.rows${r0}`, r0, r1);
    const scales = g.rowsInitializer(table.scales.name, `${table.scales.name}.rows${r0}`, r0, r1);
    parts.push(matMulNBits(g, x, { ...table, packed, scales }, { N: r1 - r0, K: C }, [M, r1 - r0]));
  }
  return g.concat(parts, -1, V);
}

/** LoRA operands of one linear: aT [K, R], bT [R, N] with the adapter scale already folded into bT. */
export interface LoraOperands {
  readonly aT: Value;
  readonly bT: Value;
  /** Optional dropout mask on the LoRA input (training), broadcastable to x, values 0 or 1/(1-p). */
  readonly dropout?: Value;
  /**
   * Optional per-row gate on the rank columns (inference) [B, 1, R]: row b's own adapters' columns
   * carry that row's scale, every other column 0, so rows with different adapter sets share one
   * forward over the concatenation of all their adapters.
   */
  readonly rowMask?: Value;
}

/**
 * A LoRA dropout mask float [B, T, K] (0 or 1 / (1 − p)) from its fed keep bits uint8 [B, T, ⌈K/8⌉] (INPUT.loraDropout):
 * a float mask fed per target would be 32× larger (Qwen2.5-0.5B, r16 on all seven projections, 1 × 512 tokens: 503 MB
 * of masks alive for the whole step, 16 MB as bits). Unpacked inside the layer, so under recomputation the float
 * mask is rebuilt in the backward, never kept.
 */
function dropoutMask(g: Graph, name: string, K: number): Value {
  const Kb = Math.ceil(K / 8);
  const bits = g.input(name, 'uint8', ['B', 'T', Kb]);
  const scale = g.inputs.some((v) => v.name === INPUT.loraDropoutScale) ? g.value(INPUT.loraDropoutScale) : g.input(INPUT.loraDropoutScale, 'float32', [1]);
  const shifted = g.node('BitShift', [g.unsqueeze(bits, [3]), g.constU8([0, 1, 2, 3, 4, 5, 6, 7], [8])], [{ dtype: 'uint8', shape: ['B', 'T', Kb, 8] }], { direction: { kind: 'string', value: 'RIGHT' } })[0]!;
  const bit = g.node('BitwiseAnd', [shifted, g.constU8([1], [1])], [{ dtype: 'uint8', shape: ['B', 'T', Kb, 8] }])[0]!;
  let keep = g.reshape(g.cast(bit, 'float32'), ['B', 'T', Kb * 8]);
  if (Kb * 8 !== K) keep = g.slice(keep, 2, 0, K, K);
  return g.mul(keep, scale); // [B, T, K]
}

/** The LoRA delta ((x ⊙ dropout) · aT ⊙ rowMask) · bT [B, T, N]: the one place it is computed. */
function loraDelta(g: Graph, x: Value, lora: LoraOperands): Value {
  const xin = lora.dropout ? g.mul(x, lora.dropout) : x;
  const xa = g.matmul(xin, lora.aT); // [B, T, R]
  return g.matmul(lora.rowMask ? g.mul(xa, lora.rowMask) : xa, lora.bT);
}

/**
 * THE linear layer: y = base(x) + bias + ((x ⊙ dropout) · aT) · bT.
 * x [B, T, K] → y [B, T, N]. The base weight is never modified; LoRA enters only here.
 */
export function linear(g: Graph, x: Value, spec: { readonly N: number; readonly K: number }, base: BaseWeight, bias: Value | null, lora: LoraOperands | null): Value {
  const outShape: Dim[] = [...x.shape.slice(0, -1), spec.N];
  let y: Value;
  switch (base.kind) {
    case 'fp32':
      y = g.matmul(x, base.wT);
      break;
    case 'bnb4':
      y = matMulBnb4(g, x, base, spec, outShape);
      break;
    case 'int4':
      y = matMulNBits(g, x, base, spec, outShape);
      break;
  }
  if (bias) y = g.add(y, bias);
  if (lora) y = g.add(y, loraDelta(g, x, lora));
  return y;
}

/**
 * Projections that read the same input. In the inference graph each group is ONE base matmul over
 * the concatenated weights and ONE LoRA pair whose bT is block-structured (an adapter's q rows only
 * fill q's columns), so a layer runs 4 base matmuls and 4 LoRA pairs instead of 7 and 7. Per-node
 * dispatch dominates one-token decode at edge model sizes; this is where the nodes go.
 */
export const PROJ_GROUPS = [
  { name: 'qkv_proj', projs: ['q_proj', 'k_proj', 'v_proj'] },
  { name: 'o_proj', projs: ['o_proj'] },
  { name: 'gate_up_proj', projs: ['gate_proj', 'up_proj'] },
  { name: 'down_proj', projs: ['down_proj'] },
] as const satisfies readonly { name: string; projs: readonly Proj[] }[];
export type ProjGroupName = (typeof PROJ_GROUPS)[number]['name'];

/** The group a projection belongs to and its column offset inside the group's output. */
export function projGroup(cfg: ModelConfig, proj: Proj): { group: ProjGroupName; offset: number; N: number; K: number } {
  for (const grp of PROJ_GROUPS) {
    let offset = 0;
    for (const p of grp.projs as readonly Proj[]) {
      const { N, K } = linearShape(cfg, p);
      if (p === proj) return { group: grp.name, offset, N, K };
      offset += N;
    }
  }
  throw new Error(`unknown projection ${proj}`);
}

/** [ΣN, K] of a projection group. */
export function groupShape(cfg: ModelConfig, group: ProjGroupName): { N: number; K: number } {
  const grp = PROJ_GROUPS.find((x) => x.name === group)!;
  const shapes = (grp.projs as readonly Proj[]).map((p) => linearShape(cfg, p));
  return { N: shapes.reduce((a, s) => a + s.N, 0), K: shapes[0]!.K };
}

export interface BuildOptions {
  /**
   * 'infer': KV cache inputs/outputs, ORT's fused inference ops (GroupQueryAttention with rotary,
   * (Skip)SimplifiedLayerNormalization), grouped projections, and a LoRA pair on every group with a
   * free rank, so any adapter set is a change of feeds. 'train': plain differentiable ops, no cache,
   * LoRA per projection as `lora` says.
   */
  readonly mode: 'infer' | 'train';
  /** Inference: whether the graph takes LoRA inputs (default true); without them it is a plain decoder. */
  readonly inferLora?: boolean;
  /** Training: which projections get LoRA inputs and with what rank dimension. */
  readonly lora?: (layer: number, proj: Proj) => { rank: Dim; dropout?: boolean } | null;
  /** Inference over a quantized table: bytes of the table per lm_head MatMulNBits (default LM_HEAD_SLICE_BYTES). */
  readonly lmHeadSliceBytes?: number;
  /** Emit the lm_head and the logits output (default true); the trainer computes them chunk by chunk itself. */
  readonly lmHead?: boolean;
}

export interface LlamaGraph {
  /** [B, T, V] (inference: [B, L, V]); null when built with lmHead false. */
  readonly logits: Value | null;
  /** The final normed hidden state [B, T, C], the lm_head's input. */
  readonly hidden: Value;
  /** The lm_head's table (the embedding when tied). */
  readonly head: TableWeight;
  /** LoRA graph inputs by "layer.proj" key (training) or "layer.group" key (inference). */
  readonly loraInputs: Map<string, { aT: Value; bT: Value; dropout?: Value; rowMask?: Value }>;
}

/** Graph input names, shared by the runtime and the trainer. */
export const INPUT = {
  ids: 'input_ids', // int64 [B, T] (an inference graph over a quantized table takes the three below instead)
  tokenRows: 'token_rows', // uint8 [U, C/bs, bs·bits/8]: the stored table rows of the U distinct tokens
  tokenRowScales: 'token_row_scales', // float32 [U, C/bs, 1]: their scales
  tokenRowIndex: 'token_row_index', // int64 [B, T]: which of the U rows each token is
  // Training graph:
  bias: 'attention_bias', // float32 [B, T, S]: 0 where attending, large negative elsewhere
  cos: 'rope_cos', // float32 [B, T, D]
  sin: 'rope_sin', // float32 [B, T, D]
  // Inference graph (GroupQueryAttention's conventions; rows are right-padded):
  seqlensK: 'seqlens_k', // int32 [B]: each row's real length after this step, minus one
  totalLength: 'total_sequence_length', // int32 []: the present cache's length
  positions: 'position_ids', // int64 [B, T]: each new token's position
  cosCache: 'rope_cos_cache', // float32 [M, D/2]: cos(position · inv_freq) for positions 0..M-1
  logitPositions: 'logit_positions', // int64 [L]: which of the T new positions get logits
  sinCache: 'rope_sin_cache', // float32 [M, D/2]
  loraGroupA: (layer: number, group: ProjGroupName) => `lora.${layer}.${group}.a`, // float32 [K, R]
  loraGroupB: (layer: number, group: ProjGroupName) => `lora.${layer}.${group}.b`, // float32 [R, ΣN]
  loraGroupMask: (layer: number, group: ProjGroupName) => `lora.${layer}.${group}.m`, // float32 [B, 1, R]: per-row scale per rank column
  pastKey: (i: number) => `past_key.${i}`, // float32 [B, G, P, D]
  pastValue: (i: number) => `past_value.${i}`,
  loraA: (layer: number, proj: Proj) => `lora.${layer}.${proj}.a`, // float32 [K, R]
  loraB: (layer: number, proj: Proj) => `lora.${layer}.${proj}.b`, // float32 [R, N]
  // uint8 [B, T, ⌈K/8⌉]: the keep bits of one target's dropout mask, element k in bit k % 8 of byte k / 8 (LSB first).
  loraDropout: (layer: number, proj: Proj) => `lora.${layer}.${proj}.dropout`,
  loraDropoutScale: 'lora.dropout_scale', // float32 [1]: what a kept element is multiplied by, 1 / (1 − p)
};
export const OUTPUT = {
  logits: 'logits', // float32 [B, T, V] (inference: [B, L, V] at logit_positions)
  // This step's keys (rotated) and values, [B, T, G·D]: the runtime appends them to its cache. The
  // whole present cache is not an output: onnxruntime-node copies every fetched output into a fresh
  // JS buffer, which for the full cache cost more than the rest of a decode step's overhead.
  newKey: (i: number) => `new_key.${i}`,
  newValue: (i: number) => `new_value.${i}`,
};

/** Additive mask value for blocked positions: large and finite, so fully padded rows stay finite. */
export const MASKED = -1e9;

/** RMSNorm in float32: w · x · rsqrt(mean(x²) + eps). */
function rmsNorm(g: Graph, x: Value, w: Value, eps: number): Value {
  const ms = g.reduce('ReduceMean', g.mul(x, x), [-1]);
  const inv = g.reciprocal(g.sqrt(g.add(ms, g.constF32([eps], [1]))));
  return g.mul(g.mul(x, inv), w);
}

/** rotate_half as a constant signed permutation: x · Rot with Rot [D, D]. */
function rotateHalfMatrix(g: Graph, D: number): Value {
  const half = D / 2;
  const m = new Float32Array(D * D);
  for (let j = 0; j < half; j++) {
    m[(j + half) * D + j] = -1; // out[j] = -x[j + D/2]
    m[j * D + j + half] = 1; // out[j + D/2] = x[j]
  }
  return g.constF32(m, [D, D]);
}

/**
 * The group's tensors `parts` joined along axis 0 as `name` [rows, ...]: one initializer over the data file where
 * they are stored back to back (no copy: ORT maps it, prepacks it and releases it like any weight), else a Concat
 * (a model quantized before groups were stored together; ORT's optimizer folds it into an in-memory copy).
 */
function joinRows(g: Graph, parts: Value[], name: string, rows: number): Value {
  const span = g.externalSpan(parts.map((p) => p.name));
  if (span) return g.externalInitializer(name, parts[0]!.dtype, [rows, ...(parts[0]!.shape.slice(1) as number[])], span);
  return g.concat(parts, 0, rows);
}

/**
 * One base weight for several projections that read the same input, concatenated along N, or null
 * where the layouts do not allow it (then the group runs its matmuls separately and concatenates the
 * outputs). Each part is one span of the data file where quantize stored the group together (joinRows).
 */
function fuseBases(g: Graph, specs: LinearSpec[], bases: BaseWeight[], name: string): BaseWeight | null {
  if (bases.length === 1) return bases[0]!;
  const N = specs.reduce((a, s) => a + s.N, 0);
  const first = bases[0]!;
  switch (first.kind) {
    case 'fp32': {
      const ws = bases.filter((b): b is Extract<BaseWeight, { kind: 'fp32' }> => b.kind === 'fp32');
      if (ws.length !== bases.length) return null;
      return { kind: 'fp32', wT: g.concat(ws.map((b) => b.wT), 1, N) };
    }
    case 'bnb4': {
      const ws = bases.filter((b): b is Extract<BaseWeight, { kind: 'bnb4' }> => b.kind === 'bnb4' && b.quantType === first.quantType && b.blockSize === first.blockSize);
      // Flat row-major codes concatenate only when no block straddles two projections.
      if (ws.length !== bases.length || specs.some((s) => (s.N * s.K) % first.blockSize !== 0 || (s.N * s.K) % 2 !== 0)) return null;
      const total = specs.reduce((a, s) => a + s.N * s.K, 0);
      return {
        kind: 'bnb4',
        quantType: first.quantType,
        blockSize: first.blockSize,
        packed: joinRows(g, ws.map((b) => b.packed), `${name}.bnb4`, total / 2),
        absmax: joinRows(g, ws.map((b) => b.absmax), `${name}.absmax`, total / first.blockSize),
      };
    }
    case 'int4': {
      const zp = first.zeroPoints !== null;
      const zpType = first.zeroPoints?.dtype;
      const ws = bases.filter((b): b is Extract<BaseWeight, { kind: 'int4' }> =>
        b.kind === 'int4' && b.bits === first.bits && b.blockSize === first.blockSize && b.accuracyLevel === first.accuracyLevel &&
        (b.zeroPoints !== null) === zp && b.zeroPoints?.dtype === zpType);
      if (ws.length !== bases.length) return null;
      const kb = Math.ceil(specs[0]!.K / first.blockSize);
      // Zero points: packed uint8 (two a byte at 4 bits, one at 8), or one float per block.
      const { zpRow } = int4Layout(first.bits, first.blockSize, kb, zpType === 'float32');
      return {
        kind: 'int4',
        bits: first.bits,
        blockSize: first.blockSize,
        packed: joinRows(g, ws.map((b) => b.packed), `${name}.int4`, N),
        scales: joinRows(g, ws.map((b) => b.scales), `${name}.scales`, N * kb),
        zeroPoints: zp ? joinRows(g, ws.map((b) => b.zeroPoints!), `${name}.zero_points`, N * zpRow) : null,
        accuracyLevel: first.accuracyLevel,
      };
    }
  }
}

/** Builds the decoder. Checks weight shapes through the provider; errors name the layer. */
export async function buildLlama(g: Graph, cfg: ModelConfig, weights: WeightProvider, opts: BuildOptions): Promise<LlamaGraph> {
  const { hiddenSize: C, numHeads: H, numKvHeads: G, headDim: D, vocabSize: V } = cfg;
  if (H % G !== 0) g.fail(`num_attention_heads ${H} is not a multiple of num_key_value_heads ${G}`);
  const loraInputs = new Map<string, { aT: Value; bT: Value; dropout?: Value }>();
  const embTable = await weights.table(g, 'model.embed_tokens.weight', [V, C]);
  const fedRows = opts.mode === 'infer' && embTable.kind === 'quantized';
  const h = fedRows ? fedTableRows(g, embTable, C) : tableRows(g, embTable, g.input(INPUT.ids, 'int64', ['B', 'T']), C); // [B, T, C]
  const normW = (name: string) => weights.float(g, name, [C]);
  let hn: Value;
  if (opts.mode === 'infer') hn = await inferLayers(g, cfg, weights, h, normW, opts.inferLora === false ? null : loraInputs);
  else hn = await trainLayers(g, cfg, weights, h, normW, opts, loraInputs);

  const head = cfg.tieWordEmbeddings ? embTable : await weights.table(g, 'lm_head.weight', [V, C]);
  if (opts.lmHead === false) return { logits: null, hidden: hn, head, loraInputs };
  // Inference computes logits only at the positions asked for (generation needs the last one).
  const rows = opts.mode === 'infer' ? g.gather(hn, g.input(INPUT.logitPositions, 'int64', ['L']), 1) : hn; // [B, L, C]
  const L = opts.mode === 'infer' ? 'L' : 'T';
  // lm_head in the Hugging Face layout [V, C], so a tied embedding is not copied.
  const flat = g.reshape(rows, ['BL', C]);
  const outShape = g.concat([g.shapeOf(rows, 0, 2), g.constI64([V])], 0, 3); // [B, L, V] at run time
  const logits = g.reshapeTo(lmHead(g, flat, head, V, C, opts.mode === 'infer' ? { sliceBytes: opts.lmHeadSliceBytes ?? LM_HEAD_SLICE_BYTES } : {}), outShape, ['B', L, V]);
  const out = g.output(logits, OUTPUT.logits);
  return { logits: out, hidden: hn, head, loraInputs };
}

/** The bias of a projection, if the architecture has one. */
async function projBias(g: Graph, cfg: ModelConfig, weights: WeightProvider, layer: number, proj: Proj, N: number): Promise<Value | null> {
  const has = proj === 'q_proj' || proj === 'k_proj' || proj === 'v_proj' ? cfg.qkvBias : proj === 'o_proj' ? cfg.oBias : false;
  return has ? weights.float(g, linearWeightName(layer, proj).replace(/weight$/, 'bias'), [N]) : null;
}

/**
 * Inference layers with ORT's fused CPU/CUDA ops: (Skip)SimplifiedLayerNormalization carries the
 * residual stream, RotaryEmbedding rotates q and k, GroupQueryAttention does the KV cache concat,
 * GQA and the causal/padding mask in one node. Returns the final normed hidden state [B, T, C].
 */
async function inferLayers(
  g: Graph,
  cfg: ModelConfig,
  weights: WeightProvider,
  embedded: Value,
  normW: (name: string) => Promise<Value>,
  loraInputs: Map<string, { aT: Value; bT: Value }> | null,
): Promise<Value> {
  const { hiddenSize: C, numHeads: H, numKvHeads: G, headDim: D, rmsNormEps: eps } = cfg;
  const seqlensK = g.input(INPUT.seqlensK, 'int32', ['B']);
  const totalLen = g.input(INPUT.totalLength, 'int32', []);
  const positions = g.input(INPUT.positions, 'int64', ['B', 'T']);
  const cosCache = g.input(INPUT.cosCache, 'float32', ['M', D / 2]);
  const sinCache = g.input(INPUT.sinCache, 'float32', ['M', D / 2]);

  const group = async (x: Value, layer: number, name: ProjGroupName): Promise<Value> =>
    g.withScopeAsync(name, async () => {
      const projs = PROJ_GROUPS.find((p) => p.name === name)!.projs as readonly Proj[];
      const specs = projs.map((proj): LinearSpec => ({ layer, proj, ...linearShape(cfg, proj) }));
      const bases: BaseWeight[] = [];
      const biases: (Value | null)[] = [];
      // A provider that writes the data file stores the group's codes back to back, then its scales, so
      // fuseBases can take each as one span of the file.
      await g.withExternalOrder(weights.storageRank ?? (() => 0), async () => {
        for (const s of specs) {
          bases.push(await weights.linear(g, s));
          biases.push(await projBias(g, cfg, weights, layer, s.proj, s.N));
        }
      });
      const { N, K } = groupShape(cfg, name);
      let lora: LoraOperands | null = null;
      if (loraInputs) {
        const R = `R_${layer}_${name}`;
        lora = {
          aT: g.input(INPUT.loraGroupA(layer, name), 'float32', [K, R]),
          bT: g.input(INPUT.loraGroupB(layer, name), 'float32', [R, N]),
          rowMask: g.input(INPUT.loraGroupMask(layer, name), 'float32', ['B', 1, R]),
        };
        loraInputs.set(`${layer}.${name}`, lora);
      }
      const fused = fuseBases(g, specs, bases, `model.layers.${layer}.${name}`);
      const zeros = (n: number) => g.constF32(new Float32Array(n), [n]);
      const bias = biases.every((b) => b === null) ? null : biases.length === 1 ? biases[0]! : g.concat(biases.map((b, i) => b ?? zeros(specs[i]!.N)), 0, N);
      if (fused) return linear(g, x, { N, K }, fused, bias, lora);
      const parts = specs.map((s, i) => linear(g, x, s, bases[i]!, biases[i] ?? null, null));
      const y = g.concat(parts, -1, N);
      return lora ? g.add(y, loraDelta(g, x, lora)) : y;
    });

  const sln = (x: Value, w: Value): Value =>
    g.node('SimplifiedLayerNormalization', [x, w], [{ dtype: 'float32', shape: [...x.shape] }], { axis: int(-1), epsilon: { kind: 'float', value: eps }, stash_type: int(1) })[0]!;
  /** RMSNorm(residual + delta), and the new residual. */
  const skipSln = (residual: Value, delta: Value, w: Value): { normed: Value; sum: Value } => {
    const stat: Dim[] = [...residual.shape.slice(0, -1), 1];
    const [normed, , , sum] = g.node(
      'SkipSimplifiedLayerNormalization',
      [residual, delta, w],
      [{ dtype: 'float32', shape: [...residual.shape] }, { dtype: 'float32', shape: stat }, { dtype: 'float32', shape: stat }, { dtype: 'float32', shape: [...residual.shape] }],
      { epsilon: { kind: 'float', value: eps } },
      { domain: 'com.microsoft' },
    );
    return { normed: normed!, sum: sum! };
  };

  let residual = embedded;
  let pending: Value | null = null; // the last block's output, not yet added to the residual stream
  const norm = async (name: string): Promise<Value> => {
    const w = await normW(name);
    if (!pending) return sln(residual, w);
    const r = skipSln(residual, pending, w);
    residual = r.sum;
    pending = null;
    return r.normed;
  };

  for (let i = 0; i < cfg.numLayers; i++) {
    await g.withScopeAsync(`layers.${i}`, async () => {
      const x = await norm(`model.layers.${i}.input_layernorm.weight`);
      const qkv = await group(x, i, 'qkv_proj'); // [B, T, (H + 2G)·D]
      const [q, k, v] = g.node('Split', [qkv, g.constI64([H * D, G * D, G * D])],
        [{ dtype: 'float32', shape: ['B', 'T', H * D] }, { dtype: 'float32', shape: ['B', 'T', G * D] }, { dtype: 'float32', shape: ['B', 'T', G * D] }],
        { axis: int(-1) }, { names: [g.fresh('q'), g.fresh('k'), OUTPUT.newValue(i)] });
      const rotary = (t: Value, heads: number, name?: string) =>
        g.node('RotaryEmbedding', [t, positions, cosCache, sinCache], [{ dtype: 'float32', shape: [...t.shape] }],
          { interleaved: int(0), num_heads: int(heads), rotary_embedding_dim: int(D) },
          { domain: 'com.microsoft', ...(name ? { names: [name] } : {}) })[0]!;
      const kr = rotary(k!, G, OUTPUT.newKey(i));
      g.output(kr);
      g.output(v!);
      const pk = g.input(INPUT.pastKey(i), 'float32', ['B', G, 'P', D]);
      const pv = g.input(INPUT.pastValue(i), 'float32', ['B', G, 'P', D]);
      // The present cache stays inside the graph: GroupQueryAttention needs it to attend over past + new.
      const [attn] = g.node(
        'GroupQueryAttention',
        [rotary(q!, H), kr, v!, pk, pv, seqlensK, totalLen],
        [{ dtype: 'float32', shape: ['B', 'T', H * D] }, { dtype: 'float32', shape: ['B', G, 'S', D] }, { dtype: 'float32', shape: ['B', G, 'S', D] }],
        { num_heads: int(H), kv_num_heads: int(G) },
        { domain: 'com.microsoft' },
      );
      pending = await group(attn!, i, 'o_proj');
      const x2 = await norm(`model.layers.${i}.post_attention_layernorm.weight`);
      const gu = await group(x2, i, 'gate_up_proj'); // [B, T, 2F]
      const F = cfg.intermediateSize;
      const [gate, up] = g.node('Split', [gu, g.constI64([F, F])], [{ dtype: 'float32', shape: ['B', 'T', F] }, { dtype: 'float32', shape: ['B', 'T', F] }], { axis: int(-1) });
      const act = g.mul(g.mul(gate!, g.sigmoid(gate!)), up!); // SiLU(gate) · up
      pending = await group(act, i, 'down_proj');
    });
  }
  return norm('model.norm.weight');
}

/** Training layers: plain ops our autodiff differentiates; LoRA per projection as opts.lora says. */
async function trainLayers(
  g: Graph,
  cfg: ModelConfig,
  weights: WeightProvider,
  embedded: Value,
  normW: (name: string) => Promise<Value>,
  opts: BuildOptions,
  loraInputs: Map<string, { aT: Value; bT: Value; dropout?: Value }>,
): Promise<Value> {
  const { numHeads: H, numKvHeads: G, headDim: D } = cfg;
  const rep = H / G;
  const loraFor = opts.lora ?? (() => null);
  const attnBias = g.input(INPUT.bias, 'float32', ['B', 'T', 'S']);
  const cos = g.unsqueeze(g.input(INPUT.cos, 'float32', ['B', 'T', D]), [1]); // [B, 1, T, D]
  const sin = g.unsqueeze(g.input(INPUT.sin, 'float32', ['B', 'T', D]), [1]);
  const mask = g.unsqueeze(attnBias, [1, 2]); // [B, 1, 1, T, S]
  const rot = rotateHalfMatrix(g, D);
  const scale = g.constF32([1 / Math.sqrt(D)], [1]);

  const lin = async (x: Value, layer: number, proj: Proj): Promise<Value> => {
    const { N, K } = linearShape(cfg, proj);
    const spec: LinearSpec = { layer, proj, N, K };
    return g.withScopeAsync(proj, async () => {
      const base = await weights.linear(g, spec);
      const bias = await projBias(g, cfg, weights, layer, proj, N);
      const l = loraFor(layer, proj);
      let lora: LoraOperands | null = null;
      if (l) {
        const aT = g.input(INPUT.loraA(layer, proj), 'float32', [K, l.rank]);
        const bT = g.input(INPUT.loraB(layer, proj), 'float32', [l.rank, N]);
        const dropout = l.dropout ? dropoutMask(g, INPUT.loraDropout(layer, proj), K) : undefined;
        lora = dropout ? { aT, bT, dropout } : { aT, bT };
        loraInputs.set(siteKey(spec), lora);
      }
      return linear(g, x, spec, base, bias, lora);
    });
  };

  let h = embedded;
  for (let i = 0; i < cfg.numLayers; i++) {
    await g.withScopeAsync(`layers.${i}`, async () => {
      // --- attention ---
      const x = rmsNorm(g, h, await normW(`model.layers.${i}.input_layernorm.weight`), cfg.rmsNormEps);
      const q = await lin(x, i, 'q_proj'); // [B, T, H·D]
      const k = await lin(x, i, 'k_proj'); // [B, T, G·D]
      const v = await lin(x, i, 'v_proj'); // [B, T, G·D]
      const rope = (t: Value) => g.add(g.mul(t, cos), g.mul(g.matmul(t, rot), sin));
      const qh = rope(g.transpose(g.reshape(q, ['B', 'T', H, D]), [0, 2, 1, 3])); // [B, H, T, D]
      const kh = rope(g.transpose(g.reshape(k, ['B', 'T', G, D]), [0, 2, 1, 3])); // [B, G, T, D]
      const vh = g.transpose(g.reshape(v, ['B', 'T', G, D]), [0, 2, 1, 3]); // [B, G, T, D]
      // GQA without copying: query heads grouped by their key/value head, broadcast over the group.
      const q5 = g.reshape(qh, ['B', G, rep, 'T', D]); // head h = g·rep + r uses kv head g (HF repeat_kv)
      const kT = g.unsqueeze(g.transpose(kh, [0, 1, 3, 2]), [2]); // [B, G, 1, D, S]
      const scores = g.add(g.mul(g.matmul(q5, kT), scale), mask); // [B, G, rep, T, S]
      const probs = g.softmax(scores, -1);
      const ctx = g.matmul(probs, g.unsqueeze(vh, [2])); // [B, G, rep, T, D]
      const merged = g.reshape(g.transpose(g.reshape(ctx, ['B', H, 'T', D]), [0, 2, 1, 3]), ['B', 'T', H * D]);
      h = g.add(h, await lin(merged, i, 'o_proj'));
      // --- MLP ---
      const x2 = rmsNorm(g, h, await normW(`model.layers.${i}.post_attention_layernorm.weight`), cfg.rmsNormEps);
      const gate = await lin(x2, i, 'gate_proj');
      const up = await lin(x2, i, 'up_proj');
      const act = g.mul(g.mul(gate, g.sigmoid(gate)), up); // SiLU(gate) · up
      h = g.add(h, await lin(act, i, 'down_proj'));
    });
  }
  return rmsNorm(g, h, await normW('model.norm.weight'), cfg.rmsNormEps);
}
