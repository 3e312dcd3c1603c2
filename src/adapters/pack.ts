// Packs adapters into the LoRA twin's feeds: per (layer, projection group) one aT [K, ΣR] and one
// bT [ΣR, ΣN] holding every term side by side along the rank dimension (aT = [A₁ᵀ | A₂ᵀ | …],
// bT = [s₁B₁ᵀ ; s₂B₂ᵀ ; …], a term's rows of bT zero outside its own projection's columns). The
// spans say which rank columns belong to which adapter, so a per-row mask can confine each row of a
// mixed batch to its own adapters (src/serve/lora-batch.ts).
import ort from 'onnxruntime-node';
import type { ModelConfig } from '../formats/hf-config.js';
import { INPUT, projGroup, groupShape, type LoraSite, type ProjGroupName } from '../model/llama.js';
import type { LoraAdapter } from './peft.js';

export interface PackTerm {
  readonly adapter: LoraAdapter;
  /** Multiplies each module's own alpha/r scaling inside bT (1 when the scale goes in a row mask). */
  readonly scale: number;
}

/** Rank columns [start, start + r) of one (layer, group) that come from adapter `term` (index into the packed list). */
export interface RankSpan {
  readonly term: number;
  readonly start: number;
  readonly r: number;
}

export interface PackedGroup {
  readonly layer: number;
  readonly group: ProjGroupName;
  readonly R: number; // ΣR of this group
  readonly spans: readonly RankSpan[];
}

export interface PackedLora {
  /** aT/bT by graph input name (INPUT.loraGroupA/B); groups no term touches are absent. */
  readonly tensors: Map<string, ort.Tensor>;
  readonly groups: readonly PackedGroup[];
}

export function packLora(cfg: ModelConfig, terms: readonly PackTerm[]): PackedLora {
  type Term = { a: Float32Array; b: Float32Array; r: number; s: number; term: number };
  const modules = new Map<string, LoraSite & { terms: Term[] }>(); // by siteKey, as adapter.modules
  terms.forEach(({ adapter, scale }, term) => {
    for (const [k, m] of adapter.modules) {
      const slot = modules.get(k) ?? { layer: m.layer, proj: m.proj, terms: [] };
      slot.terms.push({ a: m.a, b: m.b, r: m.r, s: m.scale * scale, term });
      modules.set(k, slot);
    }
  });
  // One aT/bT pair per (layer, projection group): a term for projection p fills p's columns of bT.
  const byGroup = new Map<string, { layer: number; group: ProjGroupName; terms: { offset: number; N: number; t: Term }[] }>();
  for (const { layer, proj, terms: ts } of modules.values()) {
    const { group, offset, N } = projGroup(cfg, proj);
    const key = `${layer}.${group}`;
    const slot = byGroup.get(key) ?? { layer, group, terms: [] };
    for (const t of ts) slot.terms.push({ offset, N, t });
    byGroup.set(key, slot);
  }
  const tensors = new Map<string, ort.Tensor>();
  const groups: PackedGroup[] = [];
  for (const { layer, group, terms: ts } of byGroup.values()) {
    const { N: NG, K } = groupShape(cfg, group);
    const R = ts.reduce((acc, x) => acc + x.t.r, 0);
    const aT = new Float32Array(K * R); // [K, R]
    const bT = new Float32Array(R * NG); // [R, ΣN], zero outside each term's projection
    const spans: RankSpan[] = [];
    let off = 0;
    for (const { offset, N, t } of ts) {
      for (let j = 0; j < t.r; j++) {
        for (let k = 0; k < K; k++) aT[k * R + off + j] = t.a[j * K + k]!;
        for (let n = 0; n < N; n++) bT[(off + j) * NG + offset + n] = t.s * t.b[n * t.r + j]!;
      }
      spans.push({ term: t.term, start: off, r: t.r });
      off += t.r;
    }
    tensors.set(INPUT.loraGroupA(layer, group), new ort.Tensor('float32', aT, [K, R]));
    tensors.set(INPUT.loraGroupB(layer, group), new ort.Tensor('float32', bT, [R, NG]));
    groups.push({ layer, group, R, spans });
  }
  return { tensors, groups };
}
