// Tensor names between llama.cpp's GGUF (blk.N.attn_q.weight) and Hugging Face (model.layers.N.…),
// and llama.cpp's q/k row permutation: convert_hf_to_gguf.py's LlamaModel permutes q_proj and k_proj
// rows from rotate_half order into interleaved pairs for its rope (qwen2 uses NEOX rope: no permute).
import { LINEAR_PROJS, type Proj } from '../../model/llama.js';

export const GGUF_PROJ: Readonly<Record<Proj, string>> = Object.freeze({
  q_proj: 'attn_q',
  k_proj: 'attn_k',
  v_proj: 'attn_v',
  o_proj: 'attn_output',
  gate_proj: 'ffn_gate',
  up_proj: 'ffn_up',
  down_proj: 'ffn_down',
});

export function ggufLinearName(layer: number, proj: Proj, what: 'weight' | 'bias' = 'weight'): string {
  return `blk.${layer}.${GGUF_PROJ[proj]}.${what}`;
}

/** Hugging Face name → GGUF name for the non-linear tensors (and linear weights/biases). */
export function ggufName(hf: string): string | null {
  if (hf === 'model.embed_tokens.weight') return 'token_embd.weight';
  if (hf === 'model.norm.weight') return 'output_norm.weight';
  if (hf === 'lm_head.weight') return 'output.weight';
  const m = /^model\.layers\.(\d+)\.(.+)\.(weight|bias)$/.exec(hf);
  if (!m) return null;
  const layer = Number(m[1]);
  const mod = m[2]!;
  if (mod === 'input_layernorm') return `blk.${layer}.attn_norm.${m[3]}`;
  if (mod === 'post_attention_layernorm') return `blk.${layer}.ffn_norm.${m[3]}`;
  for (const p of LINEAR_PROJS) if (mod.endsWith(`.${p}`)) return ggufLinearName(layer, p, m[3] as 'weight' | 'bias');
  return null;
}

/** Heads whose rows llama.cpp permutes for a projection (null: not permuted). */
export function permutedHeads(arch: string, proj: Proj, heads: number, kvHeads: number): number | null {
  if (arch !== 'llama') return null;
  if (proj === 'q_proj') return heads;
  if (proj === 'k_proj') return kvHeads;
  return null;
}

/**
 * Moves whole rows (rowBytes each) between Hugging Face order and llama.cpp's: per head of D rows,
 * HF row s·D/2 + j (half s, index j) is llama.cpp row 2j + s. Rows are independent in every ggml
 * type (blocks run along a row), so quantized data permutes exactly.
 */
export function permuteRows(data: Uint8Array, nHead: number, rowBytes: number, direction: 'to-gguf' | 'from-gguf'): Uint8Array {
  const rows = data.length / rowBytes;
  const D = rows / nHead;
  const half = D / 2;
  const out = new Uint8Array(data.length);
  for (let h = 0; h < nHead; h++) {
    for (let s = 0; s < 2; s++) {
      for (let j = 0; j < half; j++) {
        const hfRow = h * D + s * half + j;
        const ggRow = h * D + 2 * j + s;
        const [from, to] = direction === 'to-gguf' ? [hfRow, ggRow] : [ggRow, hfRow];
        out.set(data.subarray(from * rowBytes, (from + 1) * rowBytes), to * rowBytes);
      }
    }
  }
  return out;
}
