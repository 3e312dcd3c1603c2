// The runtime adapter API: load, activate (with a per-adapter scale), deactivate, list and unload
// adapters on one loaded base. Activation is a change of graph feeds only: the active set's deltas
// are summed by concatenating ranks, aT = [A₁ᵀ | A₂ᵀ | …] [K, ΣR] and bT = [s₁B₁ᵀ ; s₂B₂ᵀ ; …]
// [ΣR, N], so one pair of MatMuls per projection group (q/k/v, o, gate/up, down) serves any number
// of stacked adapters; a term's rows of bT are zero outside its own projection's columns.
import ort from 'onnxruntime-node';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { EdgeloraError } from '../util/errors.js';
import { INPUT, projGroup, groupShape, type Proj, type ProjGroupName } from '../model/llama.js';
import type { ModelRuntime, LoraFeeds } from '../runtime/model.js';
import { loadAdapter, type LoraAdapter } from './peft.js';

export interface AdapterInfo {
  readonly id: string;
  readonly dir: string;
  readonly active: boolean;
  /** User scale multiplying the adapter's own alpha/r scaling (default 1). */
  readonly scale: number;
  readonly rank: number;
  readonly targets: string[];
  readonly parameters: number;
  /** Bytes held in memory for this adapter (float32 A and B). */
  readonly bytes: number;
  readonly baseFingerprint: string | null;
}

interface Entry {
  adapter: LoraAdapter;
  active: boolean;
  scale: number;
  /** Load generation, so reloading an id never reuses a stale cache key. */
  generation: number;
  contentHash: string;
}

export class AdapterManager {
  private readonly entries = new Map<string, Entry>();
  private order: string[] = [];
  private feedsCache: LoraFeeds | null = null;
  private generation = 0;

  constructor(private readonly model: ModelRuntime) {}

  /** Loads (and validates) an adapter; nothing changes on error. Returns its id. */
  async load(dir: string, opts: { id?: string } = {}): Promise<string> {
    const adapter = await loadAdapter(dir, { cfg: this.model.cfg, fingerprint: this.model.manifest.fingerprint });
    const id = opts.id ?? dir;
    if (this.entries.has(id)) throw new EdgeloraError(`an adapter with id "${id}" is already loaded`, { hint: 'unload it first or choose another id' });
    const h = createHash('sha256');
    for (const [k, m] of adapter.modules) {
      h.update(`${k}|${m.r}|${m.scale}|`);
      h.update(new Uint8Array(m.a.buffer, m.a.byteOffset, m.a.byteLength));
      h.update(new Uint8Array(m.b.buffer, m.b.byteOffset, m.b.byteLength));
    }
    this.entries.set(id, { adapter, active: false, scale: 1, generation: ++this.generation, contentHash: h.digest('hex') });
    return id;
  }

  private get(id: string): Entry {
    const e = this.entries.get(id);
    if (!e) throw new EdgeloraError(`no loaded adapter "${id}"`, { hint: `loaded: ${[...this.entries.keys()].join(', ') || 'none'}` });
    return e;
  }

  /** Activates an adapter with a scale (stacking onto those already active). */
  activate(id: string, scale = 1): void {
    if (!Number.isFinite(scale)) throw new EdgeloraError(`adapter scale ${scale} is not a finite number`, { where: id });
    const e = this.get(id);
    e.active = true;
    e.scale = scale;
    this.order = [...this.order.filter((x) => x !== id), id];
    this.feedsCache = null;
  }

  deactivate(id: string): void {
    const e = this.get(id);
    e.active = false;
    this.order = this.order.filter((x) => x !== id);
    this.feedsCache = null;
  }

  unload(id: string): void {
    this.get(id);
    this.entries.delete(id);
    this.order = this.order.filter((x) => x !== id);
    this.feedsCache = null;
  }

  list(): AdapterInfo[] {
    return [...this.entries].map(([id, e]) => {
      const ranks = new Set([...e.adapter.modules.values()].map((m) => m.r));
      return {
        id,
        dir: e.adapter.dir,
        active: e.active,
        scale: e.scale,
        rank: Math.max(...ranks),
        targets: [...new Set([...e.adapter.modules.values()].map((m) => m.proj))],
        parameters: e.adapter.parameters,
        bytes: e.adapter.bytes,
        baseFingerprint: e.adapter.baseFingerprint,
      };
    });
  }

  /** Ids of the active adapters, in activation order. */
  active(): string[] {
    return [...this.order];
  }

  /** The graph feeds for the active set (cached until the set changes). */
  feeds(): LoraFeeds {
    if (this.feedsCache) return this.feedsCache;
    const active = this.order.map((id) => [id, this.get(id)] as const);
    const key = active.length === 0 ? '' : active.map(([id, e]) => `${id}#${e.generation}:${e.contentHash.slice(0, 16)}*${e.scale}`).join('+');
    const tensors = new Map<string, ort.Tensor>();
    const cfg = this.model.cfg;
    type Term = { a: Float32Array; b: Float32Array; r: number; s: number };
    const modules = new Map<string, { layer: number; proj: Proj; terms: Term[] }>();
    for (const [, e] of active) {
      for (const [k, m] of e.adapter.modules) {
        const slot = modules.get(k) ?? { layer: m.layer, proj: m.proj, terms: [] };
        slot.terms.push({ a: m.a, b: m.b, r: m.r, s: m.scale * e.scale });
        modules.set(k, slot);
      }
    }
    // One aT/bT pair per (layer, projection group): a term for projection p fills p's columns of bT.
    const byGroup = new Map<string, { layer: number; group: ProjGroupName; terms: { offset: number; N: number; t: Term }[] }>();
    for (const { layer, proj, terms } of modules.values()) {
      const { group, offset, N } = projGroup(cfg, proj);
      const slot = byGroup.get(`${layer}.${group}`) ?? { layer, group, terms: [] };
      for (const t of terms) slot.terms.push({ offset, N, t });
      byGroup.set(`${layer}.${group}`, slot);
    }
    for (const { layer, group, terms } of byGroup.values()) {
      const { N: NG, K } = groupShape(cfg, group);
      const R = terms.reduce((acc, x) => acc + x.t.r, 0);
      const aT = new Float32Array(K * R); // [K, R]
      const bT = new Float32Array(R * NG); // [R, ΣN], zero outside each term's projection
      let off = 0;
      for (const { offset, N, t } of terms) {
        for (let j = 0; j < t.r; j++) {
          for (let k = 0; k < K; k++) aT[k * R + off + j] = t.a[j * K + k]!;
          for (let n = 0; n < N; n++) bT[(off + j) * NG + offset + n] = t.s * t.b[n * t.r + j]!;
        }
        off += t.r;
      }
      tensors.set(INPUT.loraGroupA(layer, group), new ort.Tensor('float32', aT, [K, R]));
      tensors.set(INPUT.loraGroupB(layer, group), new ort.Tensor('float32', bT, [R, NG]));
    }
    this.feedsCache = { key, tensors };
    return this.feedsCache;
  }
}

/**
 * Parses "dir[:scale]" as given to --adapter. Text after the last ":" is the scale unless the
 * whole spec names an existing path (a directory may have a ":" in its name) or it holds a "/".
 */
export function parseAdapterSpec(spec: string): { dir: string; scale: number } {
  const i = spec.lastIndexOf(':');
  if (i <= 0 || existsSync(spec)) return { dir: spec, scale: 1 };
  const dir = spec.slice(0, i);
  const raw = spec.slice(i + 1);
  if (raw.includes('/') || raw.includes(path.sep)) return { dir: spec, scale: 1 };
  const scale = raw.trim() === '' ? NaN : Number(raw);
  if (!Number.isFinite(scale)) {
    throw new EdgeloraError(`bad scale "${raw}" in ${spec}: the text after ":" must be a number`, {
      where: '--adapter',
      hint: `write DIR:SCALE with a number, e.g. ${dir}:0.5, or DIR alone for scale 1`,
    });
  }
  return { dir, scale };
}
