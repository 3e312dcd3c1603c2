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

export interface LinearSpec {
  readonly layer: number;
  readonly proj: Proj;
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
   * ORT int4 for com.microsoft.MatMulNBits: packed [N, K/bs, bs/2], scales [N·K/bs], zero points packed
   * uint8. accuracyLevel 4 quantizes activations to int8 inside the kernel (the fast CPU path); 0 keeps
   * them float32 (exact against a float reference).
   */
  | { kind: 'int4'; blockSize: number; packed: Value; scales: Value; zeroPoints: Value | null; accuracyLevel: number };

/** Supplies weights to the graph (from a float checkpoint while quantizing, or from a quantized model). */
export interface WeightProvider {
  /** The base weight of one projection, added to `g` as initializers. */
  linear(g: Graph, spec: LinearSpec): Promise<BaseWeight>;
  /** A float tensor by Hugging Face name (norms, biases, embeddings, lm_head), added to `g`. */
  float(g: Graph, name: string, shape: number[]): Promise<Value>;
}

/** LoRA operands of one linear: aT [K, R], bT [R, N] with the adapter scale already folded into bT. */
export interface LoraOperands {
  readonly aT: Value;
  readonly bT: Value;
  /** Optional dropout mask on the LoRA input (training), broadcastable to x, values 0 or 1/(1-p). */
  readonly dropout?: Value;
}

/**
 * THE linear layer: y = base(x) + bias + ((x ⊙ dropout) · aT) · bT.
 * x [B, T, K] → y [B, T, N]. The base weight is never modified; LoRA enters only here.
 */
export function linear(g: Graph, x: Value, spec: LinearSpec, base: BaseWeight, bias: Value | null, lora: LoraOperands | null): Value {
  const outShape: Dim[] = [...x.shape.slice(0, -1), spec.N];
  let y: Value;
  switch (base.kind) {
    case 'fp32':
      y = g.matmul(x, base.wT);
      break;
    case 'bnb4':
      y = g.contrib('MatMulBnb4', [x, base.packed, base.absmax], 'float32', outShape, {
        K: int(spec.K),
        N: int(spec.N),
        block_size: int(base.blockSize),
        quant_type: int(base.quantType === 'nf4' ? 1 : 0),
      });
      break;
    case 'int4':
      y = g.contrib('MatMulNBits', [x, base.packed, base.scales, base.zeroPoints], 'float32', outShape, {
        K: int(spec.K),
        N: int(spec.N),
        bits: int(4),
        block_size: int(base.blockSize),
        accuracy_level: int(base.accuracyLevel),
      });
      break;
  }
  if (bias) y = g.add(y, bias);
  if (lora) {
    const xin = lora.dropout ? g.mul(x, lora.dropout) : x;
    y = g.add(y, g.matmul(g.matmul(xin, lora.aT), lora.bT));
  }
  return y;
}

export interface BuildOptions {
  /** 'infer': KV cache inputs/outputs, LoRA on every projection with a free rank. 'train': no cache. */
  readonly mode: 'infer' | 'train';
  /**
   * Which projections get LoRA inputs and with what rank dimension. Default (infer): all seven in
   * every layer, rank symbolic, so any adapter set is a change of feeds.
   */
  readonly lora?: (layer: number, proj: Proj) => { rank: Dim; dropout?: boolean } | null;
}

export interface LlamaGraph {
  readonly logits: Value; // [B, T, V]
  /** LoRA graph inputs by "layer.proj" key. */
  readonly loraInputs: Map<string, { aT: Value; bT: Value; dropout?: Value }>;
}

/** Graph input names, shared by the runtime and the trainer. */
export const INPUT = {
  ids: 'input_ids', // int64 [B, T]
  bias: 'attention_bias', // float32 [B, T, S]: 0 where attending, large negative elsewhere
  cos: 'rope_cos', // float32 [B, T, D]
  sin: 'rope_sin', // float32 [B, T, D]
  pastKey: (i: number) => `past_key.${i}`, // float32 [B, G, P, D]
  pastValue: (i: number) => `past_value.${i}`,
  loraA: (layer: number, proj: Proj) => `lora.${layer}.${proj}.a`, // float32 [K, R]
  loraB: (layer: number, proj: Proj) => `lora.${layer}.${proj}.b`, // float32 [R, N]
  loraDropout: (layer: number, proj: Proj) => `lora.${layer}.${proj}.dropout`, // float32 [B, T, K]
};
export const OUTPUT = {
  logits: 'logits', // float32 [B, T, V]
  presentKey: (i: number) => `present_key.${i}`, // float32 [B, G, S, D]
  presentValue: (i: number) => `present_value.${i}`,
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

/** Builds the decoder. Checks weight shapes through the provider; errors name the layer. */
export async function buildLlama(g: Graph, cfg: ModelConfig, weights: WeightProvider, opts: BuildOptions): Promise<LlamaGraph> {
  const { hiddenSize: C, numHeads: H, numKvHeads: G, headDim: D, vocabSize: V } = cfg;
  if (H % G !== 0) g.fail(`num_attention_heads ${H} is not a multiple of num_key_value_heads ${G}`);
  const rep = H / G;
  const infer = opts.mode === 'infer';
  const loraFor: (layer: number, proj: Proj) => { rank: Dim; dropout?: boolean } | null =
    opts.lora ?? ((layer, proj) => (infer ? { rank: `R_${layer}_${proj}` } : null));

  const ids = g.input(INPUT.ids, 'int64', ['B', 'T']);
  const attnBias = g.input(INPUT.bias, 'float32', ['B', 'T', 'S']);
  const cos = g.unsqueeze(g.input(INPUT.cos, 'float32', ['B', 'T', D]), [1]); // [B, 1, T, D]
  const sin = g.unsqueeze(g.input(INPUT.sin, 'float32', ['B', 'T', D]), [1]);
  const mask = g.unsqueeze(attnBias, [1, 2]); // [B, 1, 1, T, S]
  const rot = rotateHalfMatrix(g, D);
  const scale = g.constF32([1 / Math.sqrt(D)], [1]);
  const loraInputs = new Map<string, { aT: Value; bT: Value; dropout?: Value }>();

  const lin = async (x: Value, layer: number, proj: Proj): Promise<Value> => {
    const { N, K } = linearShape(cfg, proj);
    const spec: LinearSpec = { layer, proj, N, K };
    return g.withScopeAsync(proj, async () => {
      const base = await weights.linear(g, spec);
      const hasBias = (proj === 'q_proj' || proj === 'k_proj' || proj === 'v_proj') ? cfg.qkvBias : proj === 'o_proj' ? cfg.oBias : false;
      const bias = hasBias ? await weights.float(g, linearWeightName(layer, proj).replace(/weight$/, 'bias'), [N]) : null;
      const l = loraFor(layer, proj);
      let lora: LoraOperands | null = null;
      if (l) {
        const aT = g.input(INPUT.loraA(layer, proj), 'float32', [K, l.rank]);
        const bT = g.input(INPUT.loraB(layer, proj), 'float32', [l.rank, N]);
        const dropout = l.dropout ? g.input(INPUT.loraDropout(layer, proj), 'float32', ['B', 'T', K]) : undefined;
        lora = dropout ? { aT, bT, dropout } : { aT, bT };
        loraInputs.set(`${layer}.${proj}`, lora);
      }
      return linear(g, x, spec, base, bias, lora);
    });
  };

  let h = g.gather(await weights.float(g, 'model.embed_tokens.weight', [V, C]), ids); // [B, T, C]

  for (let i = 0; i < cfg.numLayers; i++) {
    await g.withScopeAsync(`layers.${i}`, async () => {
      // --- attention ---
      const x = rmsNorm(g, h, await weights.float(g, `model.layers.${i}.input_layernorm.weight`, [C]), cfg.rmsNormEps);
      const q = await lin(x, i, 'q_proj'); // [B, T, H·D]
      const k = await lin(x, i, 'k_proj'); // [B, T, G·D]
      const v = await lin(x, i, 'v_proj'); // [B, T, G·D]
      const rope = (t: Value) => g.add(g.mul(t, cos), g.mul(g.matmul(t, rot), sin));
      const qh = rope(g.transpose(g.reshape(q, ['B', 'T', H, D]), [0, 2, 1, 3])); // [B, H, T, D]
      let kh = rope(g.transpose(g.reshape(k, ['B', 'T', G, D]), [0, 2, 1, 3])); // [B, G, T, D]
      let vh = g.transpose(g.reshape(v, ['B', 'T', G, D]), [0, 2, 1, 3]); // [B, G, T, D]
      if (infer) {
        const pk = g.input(INPUT.pastKey(i), 'float32', ['B', G, 'P', D]);
        const pv = g.input(INPUT.pastValue(i), 'float32', ['B', G, 'P', D]);
        kh = g.node('Concat', [pk, kh], [{ dtype: 'float32', shape: ['B', G, 'S', D] }], { axis: int(2) }, { names: [OUTPUT.presentKey(i)] })[0]!;
        vh = g.node('Concat', [pv, vh], [{ dtype: 'float32', shape: ['B', G, 'S', D] }], { axis: int(2) }, { names: [OUTPUT.presentValue(i)] })[0]!;
        g.output(kh);
        g.output(vh);
      }
      // GQA without copying: query heads grouped by their key/value head, broadcast over the group.
      const q5 = g.reshape(qh, ['B', G, rep, 'T', D]); // head h = g·rep + r uses kv head g (HF repeat_kv)
      const kT = g.unsqueeze(g.transpose(kh, [0, 1, 3, 2]), [2]); // [B, G, 1, D, S]
      const scores = g.add(g.mul(g.matmul(q5, kT), scale), mask); // [B, G, rep, T, S]
      const probs = g.softmax(scores, -1);
      const ctx = g.matmul(probs, g.unsqueeze(vh, [2])); // [B, G, rep, T, D]
      const merged = g.reshape(g.transpose(g.reshape(ctx, ['B', H, 'T', D]), [0, 2, 1, 3]), ['B', 'T', H * D]);
      h = g.add(h, await lin(merged, i, 'o_proj'));
      // --- MLP ---
      const x2 = rmsNorm(g, h, await weights.float(g, `model.layers.${i}.post_attention_layernorm.weight`, [C]), cfg.rmsNormEps);
      const gate = await lin(x2, i, 'gate_proj');
      const up = await lin(x2, i, 'up_proj');
      const act = g.mul(g.mul(gate, g.sigmoid(gate)), up); // SiLU(gate) · up
      h = g.add(h, await lin(act, i, 'down_proj'));
    });
  }

  const hn = rmsNorm(g, h, await weights.float(g, 'model.norm.weight', [C]), cfg.rmsNormEps);
  const head = cfg.tieWordEmbeddings ? g.value('model.embed_tokens.weight') : await weights.float(g, 'lm_head.weight', [V, C]);
  // lm_head in the Hugging Face layout [V, C] via Gemm(transB), so a tied embedding is not copied.
  const flat = g.reshape(hn, ['BT', C]);
  const outShape = g.concat([g.shapeOf(ids), g.constI64([V])], 0, 3); // [B, T, V] at run time
  const logits = g.reshapeTo(g.gemm(flat, head, { transB: true }), outShape, ['B', 'T', V]);
  const out = g.output(logits, OUTPUT.logits);
  return { logits: out, loraInputs };
}
