// An independent, straightforward TypeScript forward of a Llama-family decoder (batch 1, whole
// sequence, no cache), written from the Hugging Face modeling code's equations with plain loops and
// float64 accumulation. Tests compare the ONNX graph (ORT's kernels) against it.
import type { ModelConfig } from '../../src/formats/hf-config.js';

/** Returns a weight in PyTorch layout ([out, in] for linears), dequantized where stored 4-bit. */
export type WeightFn = (name: string) => Float32Array;

/** One LoRA term on a projection: delta = scale · B · A · x, A [r, in], B [out, r] (PEFT layout). */
export interface RefLora {
  a: Float32Array;
  b: Float32Array;
  r: number;
  scale: number;
  /** LoRA dropout: the multiplier of input element k at position t on the LoRA path (0 or 1 / (1 − p)); absent: 1. */
  dropout?: (t: number, k: number) => number;
}
export type LoraFn = (layer: number, proj: string) => RefLora[];

function linearRef(x: Float64Array, T: number, K: number, w: Float32Array, N: number, bias?: Float32Array, loras: RefLora[] = []): Float64Array {
  const y = new Float64Array(T * N);
  for (let t = 0; t < T; t++) {
    for (let n = 0; n < N; n++) {
      let s: number = bias ? bias[n]! : 0;
      for (let k = 0; k < K; k++) s += x[t * K + k]! * w[n * K + k]!;
      y[t * N + n] = s;
    }
    for (const l of loras) {
      const ax = new Float64Array(l.r);
      for (let j = 0; j < l.r; j++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += l.a[j * K + k]! * x[t * K + k]! * (l.dropout ? l.dropout(t, k) : 1);
        ax[j] = s;
      }
      for (let n = 0; n < N; n++) {
        let s = 0;
        for (let j = 0; j < l.r; j++) s += l.b[n * l.r + j]! * ax[j]!;
        y[t * N + n] = y[t * N + n]! + l.scale * s;
      }
    }
  }
  return y;
}

function rmsNormRef(x: Float64Array, T: number, C: number, w: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    let ms = 0;
    for (let c = 0; c < C; c++) ms += x[t * C + c]! ** 2;
    const inv = 1 / Math.sqrt(ms / C + eps);
    for (let c = 0; c < C; c++) y[t * C + c] = w[c]! * x[t * C + c]! * inv;
  }
  return y;
}

/** Inverse RoPE frequencies with llama3 scaling, written independently of src/model/rope.ts. */
function invFreq(cfg: ModelConfig): Float64Array {
  const D = cfg.headDim;
  const inv = new Float64Array(D / 2);
  for (let i = 0; i < D / 2; i++) {
    let f = 1 / cfg.ropeTheta ** ((2 * i) / D);
    const s = cfg.ropeScaling;
    if (s) {
      const wl = (2 * Math.PI) / f;
      const lowWl = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highWl = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      if (wl > lowWl) f = f / s.factor;
      else if (wl >= highWl) {
        const sm = (s.originalMaxPositionEmbeddings / wl - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f = (1 - sm) * (f / s.factor) + sm * f;
      }
    }
    inv[i] = f;
  }
  return inv;
}

function applyRope(x: Float64Array, T: number, heads: number, D: number, inv: Float64Array): void {
  const half = D / 2;
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < heads; h++) {
      const o = (t * heads + h) * D;
      for (let i = 0; i < half; i++) {
        const a = t * inv[i]!;
        const c = Math.cos(a);
        const s = Math.sin(a);
        const x1 = x[o + i]!;
        const x2 = x[o + i + half]!;
        x[o + i] = x1 * c - x2 * s;
        x[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}

/** Logits [T, V] for the token ids. */
export function referenceForward(cfg: ModelConfig, W: WeightFn, ids: number[], lora: LoraFn = () => []): Float64Array {
  const { hiddenSize: C, numHeads: H, numKvHeads: G, headDim: D, intermediateSize: F, vocabSize: V } = cfg;
  const T = ids.length;
  const emb = W('model.embed_tokens.weight');
  let h = new Float64Array(T * C);
  ids.forEach((id, t) => {
    for (let c = 0; c < C; c++) h[t * C + c] = emb[id * C + c]!;
  });
  const inv = invFreq(cfg);
  const bias = (name: string, on: boolean) => (on ? W(name) : undefined);
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}`;
    const x = rmsNormRef(h, T, C, W(`${p}.input_layernorm.weight`), cfg.rmsNormEps);
    const q = linearRef(x, T, C, W(`${p}.self_attn.q_proj.weight`), H * D, bias(`${p}.self_attn.q_proj.bias`, cfg.qkvBias), lora(l, 'q_proj'));
    const k = linearRef(x, T, C, W(`${p}.self_attn.k_proj.weight`), G * D, bias(`${p}.self_attn.k_proj.bias`, cfg.qkvBias), lora(l, 'k_proj'));
    const v = linearRef(x, T, C, W(`${p}.self_attn.v_proj.weight`), G * D, bias(`${p}.self_attn.v_proj.bias`, cfg.qkvBias), lora(l, 'v_proj'));
    applyRope(q, T, H, D, inv);
    applyRope(k, T, G, D, inv);
    const ctx = new Float64Array(T * H * D);
    const rep = H / G;
    for (let hh = 0; hh < H; hh++) {
      const kvh = Math.floor(hh / rep);
      for (let t = 0; t < T; t++) {
        const scores = new Float64Array(t + 1);
        let max = -Infinity;
        for (let s = 0; s <= t; s++) {
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[(t * H + hh) * D + d]! * k[(s * G + kvh) * D + d]!;
          scores[s] = dot / Math.sqrt(D);
          max = Math.max(max, scores[s]!);
        }
        let sum = 0;
        for (let s = 0; s <= t; s++) sum += scores[s] = Math.exp(scores[s]! - max);
        for (let d = 0; d < D; d++) {
          let acc = 0;
          for (let s = 0; s <= t; s++) acc += (scores[s]! / sum) * v[(s * G + kvh) * D + d]!;
          ctx[(t * H + hh) * D + d] = acc;
        }
      }
    }
    const o = linearRef(ctx, T, H * D, W(`${p}.self_attn.o_proj.weight`), C, bias(`${p}.self_attn.o_proj.bias`, cfg.oBias), lora(l, 'o_proj'));
    h = h.map((val, i) => val + o[i]!);
    const x2 = rmsNormRef(h, T, C, W(`${p}.post_attention_layernorm.weight`), cfg.rmsNormEps);
    const gate = linearRef(x2, T, C, W(`${p}.mlp.gate_proj.weight`), F, undefined, lora(l, 'gate_proj'));
    const up = linearRef(x2, T, C, W(`${p}.mlp.up_proj.weight`), F, undefined, lora(l, 'up_proj'));
    const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]!);
    const down = linearRef(act, T, F, W(`${p}.mlp.down_proj.weight`), C, undefined, lora(l, 'down_proj'));
    h = h.map((val, i) => val + down[i]!);
  }
  const hn = rmsNormRef(h, T, C, W('model.norm.weight'), cfg.rmsNormEps);
  const head = cfg.tieWordEmbeddings ? emb : W('lm_head.weight');
  return linearRef(hn, T, C, head, V);
}

/** max |a − b| / max |b|: the relative error the tests bound. */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): { rel: number; maxAbs: number; at: number } {
  let maxAbs = 0;
  let at = -1;
  let scale = 0;
  for (let i = 0; i < b.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= maxAbs)) {
      maxAbs = d;
      at = i;
    }
    scale = Math.max(scale, Math.abs(b[i]!));
  }
  if (a.length !== b.length) return { rel: Infinity, maxAbs: Infinity, at: -1 };
  return { rel: maxAbs / (scale || 1), maxAbs, at };
}
