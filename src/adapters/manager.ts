// The runtime adapter API: load, activate (with a per-adapter scale), deactivate, list and unload
// adapters on one loaded base. Activation is a change of graph feeds only: the active set's deltas
// are summed by concatenating ranks (packLora in pack.ts), so one pair of MatMuls per projection
// group (q/k/v, o, gate/up, down) serves any number of stacked adapters.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { EdgeloraError } from '../util/errors.js';
import type { ModelRuntime, LoraFeeds } from '../runtime/model.js';
import { baseOf, loadAdapter, type LoraAdapter } from './peft.js';
import { packLora } from './pack.js';

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
  /** The source model it belongs to (null: not recorded). */
  readonly sourceFingerprint: string | null;
  /** Set when it runs on another quantization of its source model than it was trained on: one line to show. */
  readonly baseNote: string | null;
}

interface Entry {
  adapter: LoraAdapter;
  active: boolean;
  scale: number;
  /** Load generation, so reloading an id never reuses a stale cache key. */
  generation: number;
  contentHash: string;
}

/** Loading other content under an id that is loaded: an id always means one content. */
export class AdapterConflictError extends EdgeloraError {}

export class AdapterManager {
  private readonly entries = new Map<string, Entry>();
  private order: string[] = [];
  private feedsCache: LoraFeeds | null = null;
  private generation = 0;

  constructor(private readonly model: ModelRuntime) {}

  /**
   * Loads (and validates) an adapter; nothing changes on error. Returns its id. `replace` lets other
   * content take over a loaded id in one step (a fleet push of a new version under the same id), so
   * the id is never missing in between; holders of the old data (rows in flight) keep it.
   */
  async load(dir: string, opts: { id?: string; replace?: boolean } = {}): Promise<string> {
    const adapter = await loadAdapter(dir, { cfg: this.model.cfg, ...baseOf(this.model.manifest) });
    const id = opts.id ?? dir;
    const contentHash = adapterContentHash(adapter);
    const existing = this.entries.get(id);
    // An id always means one content: loading the same content again is a no-op, other content is refused.
    if (existing && existing.contentHash === contentHash) return id;
    if (existing && !opts.replace) throw new AdapterConflictError(`an adapter with id "${id}" is already loaded with other content`, { where: dir, hint: 'unload it first or choose another id' });
    this.entries.set(id, { adapter, active: existing?.active ?? false, scale: existing?.scale ?? 1, generation: ++this.generation, contentHash });
    if (existing) this.feedsCache = null;
    return id;
  }

  /** Whether an adapter with this id is loaded. */
  has(id: string): boolean {
    return this.entries.has(id);
  }

  /**
   * A loaded adapter's data and its version key (id, load generation, content hash). The data stays
   * valid after an unload: a request in flight keeps what it started with.
   */
  held(id: string): { adapter: LoraAdapter; key: string } {
    const e = this.get(id);
    return { adapter: e.adapter, key: `${id}#${e.generation}:${e.contentHash.slice(0, 16)}` };
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
        sourceFingerprint: e.adapter.sourceFingerprint,
        baseNote: e.adapter.baseNote,
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
    const key = active.length === 0 ? '' : active.map(([id, e]) => `${this.held(id).key}*${e.scale}`).join('+');
    const { tensors } = packLora(this.model.cfg, active.map(([, e]) => ({ adapter: e.adapter, scale: e.scale })));
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

/** sha256 over an adapter's modules (names, ranks, scales, A and B bytes). */
export function adapterContentHash(adapter: LoraAdapter): string {
  const h = createHash('sha256');
  for (const [k, m] of adapter.modules) {
    h.update(`${k}|${m.r}|${m.scale}|`);
    h.update(new Uint8Array(m.a.buffer, m.a.byteOffset, m.a.byteLength));
    h.update(new Uint8Array(m.b.buffer, m.b.byteOffset, m.b.byteLength));
  }
  return h.digest('hex');
}
