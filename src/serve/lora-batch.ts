// LoRA feeds for a batch whose rows carry different adapter sets. Every adapter any row uses is
// packed once along the rank dimension (packLora); a per-row mask [B, 1, R] per (layer, group) holds
// row b's scale on its own adapters' rank columns and 0 on every other column, so
// y_b = base(x_b) + ((x_b·aT) ⊙ m_b)·bT is exactly row b's own adapters' delta.
import ort from 'onnxruntime-node';
import type { ModelConfig } from '../formats/hf-config.js';
import { INPUT } from '../model/llama.js';
import type { LoraAdapter } from '../adapters/peft.js';
import { packLora, type PackedLora } from '../adapters/pack.js';
import type { LoraFeeds } from '../runtime/model.js';

/** Adapters the packed union keeps at most before it is rebuilt from what the batch needs. */
const UNION_LIMIT = 16;

/** One adapter as a row holds it: its data (kept alive by the row even after an unload) and version key. */
export interface HeldAdapter {
  readonly id: string;
  /** id, load generation and content hash: two loads of an id never share a key. */
  readonly key: string;
  readonly adapter: LoraAdapter;
}

/** A row's adapter set: the adapters it stacks, each with its scale. */
export interface AdapterSet {
  readonly terms: readonly { readonly held: HeldAdapter; readonly scale: number }[];
}

/** The set's identity: ids, content versions and scales (what any cache reuse must be keyed on). */
export function adapterSetKey(set: AdapterSet): string {
  return set.terms.map((t) => `${t.held.key}*${t.scale}`).join('+');
}

/**
 * Builds feeds for rows in batch order. The packed union is cached by the adapters it holds (a
 * batch's composition changes far less often than tokens are decoded); masks by the rows' sets.
 */
export class BatchLoraPacker {
  private union: { held: HeldAdapter[]; packed: PackedLora; index: Map<string, number> } | null = null;
  private last: { key: string; feeds: LoraFeeds } | null = null;
  /** The union each feeds object was built over (for rowAdapters). */
  private readonly builtOver = new WeakMap<LoraFeeds, { held: HeldAdapter[]; packed: PackedLora }>();

  constructor(private readonly cfg: ModelConfig) {}

  feeds(rows: readonly AdapterSet[]): LoraFeeds {
    const key = rows.map(adapterSetKey).join('|');
    if (this.last?.key === key) return this.last.feeds;
    const seen = new Map<string, HeldAdapter>();
    for (const r of rows) for (const t of r.terms) if (!seen.has(t.held.key)) seen.set(t.held.key, t.held);
    if (seen.size === 0) {
      this.last = { key, feeds: { key, tensors: new Map() } };
      return this.last.feeds;
    }
    // Rows come and go one at a time; repacking the union each time one adapter leaves and comes back
    // cost more than the decode steps between (packLora of 8 × r8 q,v on the small preset: 12–16 ms of JS,
    // measured on a loaded 2-core machine). So the union only grows while it covers what the batch needs, up to UNION_LIMIT
    // adapters; columns of adapters no row uses carry mask 0.
    const covered = this.union !== null && [...seen.keys()].every((k) => this.union!.index.has(k));
    if (!covered) {
      const keep = this.union && this.union.index.size + seen.size <= UNION_LIMIT ? this.union.held : [];
      const all = new Map<string, HeldAdapter>([...keep.map((h) => [h.key, h] as const), ...seen]);
      const held = [...all.keys()].sort().map((k) => all.get(k)!);
      // Scale 1 inside bT: each row's scale lives in its mask.
      const packed = packLora(this.cfg, held.map((h) => ({ adapter: h.adapter, scale: 1 })));
      this.union = { held, packed, index: new Map(held.map((h, i) => [h.key, i])) };
    }
    const { packed, index } = this.union!;
    const B = rows.length;
    // scale[b][term]: row b's scale for the packed adapter `term` (0 when the row does not use it).
    const scales = rows.map((r) => {
      const s = new Float32Array(index.size);
      for (const t of r.terms) s[index.get(t.held.key)!]! += t.scale;
      return s;
    });
    const tensors = new Map(packed.tensors);
    for (const grp of packed.groups) {
      const m = new Float32Array(B * grp.R); // [B, 1, R]
      for (let b = 0; b < B; b++) for (const sp of grp.spans) m.fill(scales[b]![sp.term]!, b * grp.R + sp.start, b * grp.R + sp.start + sp.r);
      tensors.set(INPUT.loraGroupMask(grp.layer, grp.group), new ort.Tensor('float32', m, [B, 1, grp.R]));
    }
    this.last = { key, feeds: { key, tensors } };
    this.builtOver.set(this.last.feeds, this.union!);
    return this.last.feeds;
  }

  /**
   * What each row of `feeds` (B rows) really gets, read back from the mask tensors, not from the sets
   * asked for: per row the adapters whose rank columns carry a nonzero scale, as "key*scale" joined by
   * "+" in key order ('' for none). A scale that differs between a row's spans reads "key*?" (a torn
   * mask). For checks (the engine's rows observer), not the decode path.
   */
  rowAdapters(feeds: LoraFeeds, B: number): string[] {
    const union = this.builtOver.get(feeds);
    if (!union) return Array.from({ length: B }, () => '');
    const seen = Array.from({ length: B }, () => new Map<number, number | null>());
    for (const grp of union.packed.groups) {
      const m = feeds.tensors.get(INPUT.loraGroupMask(grp.layer, grp.group))!.data as Float32Array; // [B, 1, R]
      for (let b = 0; b < B; b++) {
        for (const sp of grp.spans) {
          const v = m[b * grp.R + sp.start]!;
          const prev = seen[b]!.get(sp.term);
          seen[b]!.set(sp.term, prev === undefined || prev === v ? v : null);
        }
      }
    }
    return seen.map((terms) =>
      [...terms]
        .filter(([, v]) => v !== 0)
        .map(([t, v]) => `${union.held[t]!.key}*${v ?? '?'}`)
        .sort()
        .join('+'),
    );
  }
}
