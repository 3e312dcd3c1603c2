// A loaded quantized model: one ORT session serving prefill, decode and scoring. The KV cache is
// held as ORT tensors between calls and belongs to the adapter set that computed it: a forward
// with another adapter set refuses the cache (a cached prefix is never reused across adapters).
import ort from 'onnxruntime-node';
import path from 'node:path';
import type { ModelConfig } from '../formats/hf-config.js';
import { parseHfConfig } from '../formats/hf-config.js';
import { loadTokenizer, type EdgeTokenizer } from '../formats/tokenizer.js';
import { EdgeloraError } from '../util/errors.js';
import { readManifest, MODEL_FILE, type Manifest } from '../model/manifest.js';
import { buildLoraInferenceGraph } from '../model/infer-graph.js';
import { INPUT, OUTPUT, PROJ_GROUPS, groupShape } from '../model/llama.js';
import { inverseFrequencies } from '../model/rope.js';
import { createSession } from './sessions.js';
import { TableRowReader } from './table-rows.js';

/** The LoRA feeds of an adapter set: one aT/bT pair per (layer, projection) input, plus an identity. */
export interface LoraFeeds {
  /** Identifies the adapter set (ids, versions, scales); '' for no adapter. Tensors are keyed by
   * graph input name (INPUT.loraGroupA/B). */
  readonly key: string;
  readonly tensors: ReadonlyMap<string, ort.Tensor>;
}

/**
 * KV buffers [B, G, capacity, D] per layer, fed whole as past_key/past_value (GroupQueryAttention
 * reads each row's first seqlens_k positions). A forward returns only its new keys and values; they
 * are appended here in place, so a decode step moves T tokens of cache, not the whole cache.
 */
interface KvStore {
  readonly capacity: number;
  readonly keys: Float32Array[];
  readonly values: Float32Array[];
  /** Bumped by every forward that writes into the buffers; a cache of an older version is stale. */
  version: number;
}

export interface KvCache {
  readonly batch: number; // B
  /** Tokens held: the longest row's real length. */
  readonly length: number;
  /** Each row's real length: right padding of a batched prompt stays out of it. */
  readonly lengths: readonly number[];
  /** The adapter set that computed this cache. */
  readonly adapterKey: string;
  readonly store: KvStore | null;
  readonly version: number;
}

export interface ForwardRequest {
  /** Token ids, B rows of equal length T (right-padded by the caller when rows differ). */
  readonly ids: number[][];
  /**
   * Which of `ids` are real tokens (1) vs padding (0); default all real. Padding may only end a row
   * of a first (uncached) forward; a row continuing a cache must be all real tokens.
   */
  readonly mask?: Uint8Array[];
  readonly cache?: KvCache | null;
  readonly lora?: LoraFeeds;
  /** Tokens the cache should have room for (prompt + new tokens), so decoding never regrows it. */
  readonly reserve?: number;
  /**
   * Which positions get logits: 'all' (default, scoring) or 'last' (position T−1 of every row, all a
   * generation step needs: the lm_head is the largest matmul of a prefill).
   */
  readonly logits?: 'all' | 'last';
}

export interface ForwardResult {
  readonly logits: Float32Array; // [B, T, V], or [B, 1, V] for logits: 'last'
  readonly dims: readonly [number, number, number];
  readonly cache: KvCache;
}

export interface LoadOptions {
  /** ORT session options (execution providers, threads); default CPU with all cores. */
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
}

export class ModelRuntime {
  private readonly inv: Float32Array;
  private readonly emptyLora: Map<string, ort.Tensor>;
  private inputNames: Set<string>;
  private current: ort.InferenceSession;
  private switching: Promise<void> | null = null;
  /** Set while suspend() has released the session: what resume() recreates. */
  private suspended: { lora: boolean } | null = null;
  /** cos/sin(position · inv_freq) [M, D/2] for positions 0..M-1, grown on demand. */
  private ropeCos = new Float32Array(0);
  private ropeSin = new Float32Array(0);

  private constructor(
    readonly dir: string,
    readonly manifest: Manifest,
    readonly cfg: ModelConfig,
    readonly tokenizer: EdgeTokenizer,
    session: ort.InferenceSession,
    private readonly options: ort.InferenceSession.SessionOptions | undefined,
    /** Reads the token rows a graph over a quantized table is fed (null for a float table). */
    private readonly tableRows: TableRowReader | null = null,
  ) {
    this.current = session;
    this.inv = inverseFrequencies(cfg);
    this.inputNames = new Set(session.inputNames);
    if (!this.inputNames.has(INPUT.positions)) {
      throw new EdgeloraError('model.onnx has an older graph layout than this edgelora runs', {
        where: path.join(dir, MODEL_FILE),
        hint: 're-run `edgelora quantize` on the source checkpoint',
      });
    }
    this.emptyLora = new Map();
    for (let l = 0; l < cfg.numLayers; l++) {
      for (const grp of PROJ_GROUPS) {
        const { N, K } = groupShape(cfg, grp.name);
        this.emptyLora.set(INPUT.loraGroupA(l, grp.name), new ort.Tensor('float32', new Float32Array(0), [K, 0]));
        this.emptyLora.set(INPUT.loraGroupB(l, grp.name), new ort.Tensor('float32', new Float32Array(0), [0, N]));
      }
    }
  }

  /** [0, 1, …, T−1] as an int64 tensor (cached for the last length asked). */
  private positionsCache: ort.Tensor | null = null;
  private allPositions(T: number): ort.Tensor {
    if (this.positionsCache?.dims[0] !== T) this.positionsCache = new ort.Tensor('int64', BigInt64Array.from({ length: T }, (_, i) => BigInt(i)), [T]);
    return this.positionsCache;
  }

  /** cos/sin tables covering positions 0..m-1, as [m, D/2] tensors over one growing table. */
  private ropeCaches(m: number): { cos: ort.Tensor; sin: ort.Tensor } {
    const half = this.inv.length;
    const have = this.ropeCos.length / half;
    if (have < m) {
      const rows = Math.min(Math.max(m, have * 2, 256), Math.max(m, this.cfg.maxPositionEmbeddings));
      const cos = new Float32Array(rows * half);
      const sin = new Float32Array(rows * half);
      cos.set(this.ropeCos);
      sin.set(this.ropeSin);
      for (let p = have; p < rows; p++) {
        for (let i = 0; i < half; i++) {
          const a = Math.fround(p * this.inv[i]!); // as Hugging Face: float32 position · inv_freq
          cos[p * half + i] = Math.cos(a);
          sin[p * half + i] = Math.sin(a);
        }
      }
      this.ropeCos = cos;
      this.ropeSin = sin;
    }
    return {
      cos: new ort.Tensor('float32', this.ropeCos.subarray(0, m * half), [m, half]),
      sin: new ort.Tensor('float32', this.ropeSin.subarray(0, m * half), [m, half]),
    };
  }

  static async load(dir: string, opts: LoadOptions = {}): Promise<ModelRuntime> {
    const manifest = await readManifest(dir);
    const cfg = parseHfConfig(manifest.sourceConfig, path.join(dir, 'manifest.json'));
    const tokenizer = await loadTokenizer(dir);
    const rows = await TableRowReader.open(dir, manifest);
    const session = await createSession({ kind: 'decoder', model: path.join(dir, MODEL_FILE), sessionOptions: opts.sessionOptions, format: manifest.quant.format, embeddings: manifest.quant.embeddings, where: path.join(dir, MODEL_FILE) });
    return new ModelRuntime(dir, manifest, cfg, tokenizer, session, opts.sessionOptions, rows);
  }

  /** The ORT session now serving forwards (the plain decoder, or its LoRA-capable twin). */
  get session(): ort.InferenceSession {
    return this.current;
  }

  /** Whether the session takes LoRA inputs (true once an adapter set has been fed). */
  get loraReady(): boolean {
    return this.inputNames.has(INPUT.loraGroupA(0, PROJ_GROUPS[0].name));
  }

  /**
   * Replaces the plain decoder session with the LoRA-capable graph over the same weights (built in
   * memory; model.onnx.data is shared). The old session is released first, so weights are never
   * held twice. Called by the first forward with adapter feeds; call it earlier to take that cost
   * (graph build + session creation) before the first token.
   */
  async enableLora(): Promise<void> {
    if (this.loraReady) return;
    if (this.suspended) throw new EdgeloraError('enableLora: the model session is suspended (released for a fine-tuning job)', { hint: 'call resume() first' });
    this.switching ??= (async () => {
      const bytes = await buildLoraInferenceGraph(this.dir, this.manifest, this.cfg);
      const { format, embeddings } = this.manifest.quant;
      await this.current.release();
      try {
        this.current = await createSession({ kind: 'lora-twin', model: bytes, sessionOptions: this.options, externalDataDir: this.dir, format, embeddings, where: this.dir });
      } catch (err) {
        this.current = await createSession({ kind: 'decoder', model: path.join(this.dir, MODEL_FILE), sessionOptions: this.options, format, embeddings, where: path.join(this.dir, MODEL_FILE) });
        throw err;
      }
      this.inputNames = new Set(this.current.inputNames);
    })().finally(() => {
      this.switching = null;
    });
    return this.switching;
  }

  private readonly ones = new Map<string, ort.Tensor>();
  /** A row mask of ones [B, 1, R] (cached per shape). */
  private onesMask(B: number, R: number): ort.Tensor {
    const k = `${B}x${R}`;
    let t = this.ones.get(k);
    if (!t) this.ones.set(k, (t = new ort.Tensor('float32', new Float32Array(B * R).fill(1), [B, 1, R])));
    return t;
  }

  /**
   * A cache over caller-owned buffers (the serving batch's slots): `keys[i]`/`values[i]` are
   * [B, G, capacity, D] views for rows holding `lengths` tokens. A forward continuing it appends in
   * place; the caller keeps capacity ≥ every row's length after the step and tracks which adapter
   * set each row was computed under (`adapterKey` names the batch's feeds).
   */
  cacheOver(buffers: { capacity: number; keys: Float32Array[]; values: Float32Array[] }, lengths: readonly number[], adapterKey: string): KvCache {
    const store: KvStore = { capacity: buffers.capacity, keys: buffers.keys, values: buffers.values, version: 0 };
    return { batch: lengths.length, length: Math.max(0, ...lengths), lengths: [...lengths], adapterKey, store, version: 0 };
  }

  /** An empty cache for `batch` rows, bound to an adapter set. */
  emptyCache(batch: number, adapterKey = ''): KvCache {
    return { batch, length: 0, lengths: new Array<number>(batch).fill(0), adapterKey, store: null, version: 0 };
  }

  /** The cache's buffers with room for `needed` tokens per row (a new store, rows copied, if not). */
  private storeFor(cache: KvCache, needed: number, reserve: number): KvStore {
    const old = cache.store;
    if (old && old.capacity >= needed) return old;
    const { numLayers, numKvHeads: G, headDim: D, maxPositionEmbeddings } = this.cfg;
    const B = cache.batch;
    const capacity = Math.max(needed, Math.min(Math.max(reserve, old ? old.capacity * 2 : 0), maxPositionEmbeddings));
    const fresh = () => new Float32Array(B * G * capacity * D);
    const store: KvStore = { capacity, keys: Array.from({ length: numLayers }, fresh), values: Array.from({ length: numLayers }, fresh), version: 0 };
    if (old) {
      for (let i = 0; i < numLayers; i++) {
        for (let b = 0; b < B; b++) {
          const n = cache.lengths[b]! * D;
          for (let h = 0; h < G; h++) {
            const from = (b * G + h) * old.capacity * D;
            const to = (b * G + h) * capacity * D;
            store.keys[i]!.set(old.keys[i]!.subarray(from, from + n), to);
            store.values[i]!.set(old.values[i]!.subarray(from, from + n), to);
          }
        }
      }
    }
    return store;
  }

  /** Runs the decoder on new tokens, continuing `cache`. */
  async forward(req: ForwardRequest): Promise<ForwardResult> {
    const B = req.ids.length;
    const T = req.ids[0]?.length ?? 0;
    if (B === 0 || T === 0) throw new EdgeloraError('forward: empty batch');
    if (this.suspended) throw new EdgeloraError('forward: the model session is suspended (released for a fine-tuning job)', { hint: 'call resume() first' });
    if (req.ids.some((r) => r.length !== T)) throw new EdgeloraError('forward: rows of different lengths (pad them)');
    const lora = req.lora ?? { key: '', tensors: new Map() };
    const cache = req.cache ?? this.emptyCache(B, lora.key);
    if (cache.adapterKey !== lora.key) {
      throw new EdgeloraError('KV cache was computed under another adapter set', {
        hint: 'start a new cache after activating or deactivating adapters',
      });
    }
    if (cache.batch !== B) throw new EdgeloraError(`forward: cache has ${cache.batch} rows, request ${B}`);
    if (cache.store && cache.store.version !== cache.version) {
      throw new EdgeloraError('this KV cache was already continued by another forward (its buffers are reused in place)', {
        hint: 'continue from the newest cache, or recompute the prefix to branch',
      });
    }
    const { numLayers, numKvHeads: G, headDim: D, vocabSize: V } = this.cfg;
    const first = cache.length === 0;
    // GroupQueryAttention's conventions: seqlens_k[b] = row b's real length after this step − 1;
    // total_sequence_length = the longest row after it (the prompt length on a first forward).
    // A row's new tokens are written at its real length.
    const lengths: number[] = [];
    const seqlens = new Int32Array(B);
    for (let b = 0; b < B; b++) {
      const m = req.mask?.[b];
      let real = T;
      if (m) {
        if (m.length !== T) throw new EdgeloraError(`forward: mask row ${b} has ${m.length} entries for ${T} tokens`);
        real = m.indexOf(0) < 0 ? T : m.indexOf(0);
        if (m.subarray(real).some((x) => x !== 0)) {
          throw new EdgeloraError(`forward: row ${b} has padding before a real token`, { hint: 'pad rows on the right' });
        }
        if (!first && real < T) throw new EdgeloraError(`forward: row ${b} continues a cache but holds padding`, { hint: 'only a first forward may be padded' });
      }
      const len = cache.lengths[b]! + real;
      lengths.push(len);
      seqlens[b] = Math.max(len, 1) - 1;
    }
    const longest = Math.max(...lengths);
    if (longest > this.cfg.maxPositionEmbeddings) {
      throw new EdgeloraError(`sequence of ${longest} tokens exceeds max_position_embeddings ${this.cfg.maxPositionEmbeddings}`, {
        hint: 'use a shorter prompt or fewer new tokens',
      });
    }
    const total = first ? T : longest;
    const store = this.storeFor(cache, Math.max(total, T), req.reserve ?? 0);
    const positions = new BigInt64Array(B * T);
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T; t++) positions[b * T + t] = BigInt(cache.lengths[b]! + t);
    }
    // Sized to the cache capacity, not this step: constant input shapes across decode steps let ORT
    // reuse its memory plan (a changing shape makes it plan again every token).
    const rope = this.ropeCaches(Math.max(total, T, store.capacity));
    // A graph over a quantized table takes its tokens' stored rows (an older model.onnx still takes the ids).
    const tokens: Record<string, ort.Tensor> = this.inputNames.has(INPUT.tokenRows)
      ? this.rowReader().feeds(req.ids)
      : { [INPUT.ids]: new ort.Tensor('int64', BigInt64Array.from(req.ids.flat(), (id) => BigInt(id)), [B, T]) };
    const feeds: Record<string, ort.Tensor> = {
      ...tokens,
      [INPUT.positions]: new ort.Tensor('int64', positions, [B, T]),
      [INPUT.seqlensK]: new ort.Tensor('int32', seqlens, [B]),
      [INPUT.totalLength]: new ort.Tensor('int32', Int32Array.of(total), []),
      [INPUT.cosCache]: rope.cos,
      [INPUT.sinCache]: rope.sin,
      [INPUT.logitPositions]: req.logits === 'last' ? new ort.Tensor('int64', BigInt64Array.of(BigInt(T - 1)), [1]) : this.allPositions(T),
    };
    const dims = [B, G, store.capacity, D];
    for (let i = 0; i < numLayers; i++) {
      feeds[INPUT.pastKey(i)] = new ort.Tensor('float32', store.keys[i]!, dims);
      feeds[INPUT.pastValue(i)] = new ort.Tensor('float32', store.values[i]!, dims);
    }
    if (lora.tensors.size > 0) await this.enableLora();
    if (this.loraReady) {
      for (const [name, t] of this.emptyLora) feeds[name] = lora.tensors.get(name) ?? t;
      // Feeds without row masks apply their adapters to every row: a mask of ones.
      for (let l = 0; l < numLayers; l++) {
        for (const grp of PROJ_GROUPS) {
          const m = INPUT.loraGroupMask(l, grp.name);
          feeds[m] = lora.tensors.get(m) ?? this.onesMask(B, feeds[INPUT.loraGroupA(l, grp.name)]!.dims[1]!);
        }
      }
    }
    for (const name of lora.tensors.keys()) {
      if (!this.inputNames.has(name)) throw new EdgeloraError(`adapter feed ${name} is not an input of the model graph`);
    }
    const out = await this.current.run(feeds);
    // Append this step's keys/values [B, T, G·D] at each row's position in the [B, G, cap, D] buffers.
    for (let i = 0; i < numLayers; i++) {
      const nk = out[OUTPUT.newKey(i)]!.data as Float32Array;
      const nv = out[OUTPUT.newValue(i)]!.data as Float32Array;
      const sk = store.keys[i]!;
      const sv = store.values[i]!;
      for (let b = 0; b < B; b++) {
        for (let t = 0; t < T; t++) {
          const src = (b * T + t) * G * D;
          for (let h = 0; h < G; h++) {
            const dst = ((b * G + h) * store.capacity + cache.lengths[b]! + t) * D;
            sk.set(nk.subarray(src + h * D, src + (h + 1) * D), dst);
            sv.set(nv.subarray(src + h * D, src + (h + 1) * D), dst);
          }
        }
      }
    }
    store.version++;
    return {
      logits: out[OUTPUT.logits]!.data as Float32Array,
      dims: [B, req.logits === 'last' ? 1 : T, V],
      cache: { batch: B, length: longest, lengths, adapterKey: lora.key, store, version: store.version },
    };
  }

  /**
   * Releases the session, so the base's weights leave memory, until resume() (a fine-tuning job in
   * this process needs the room: onnxruntime-node sessions cannot share initializers). Forwards are
   * refused meanwhile; KV caches are host buffers and stay valid across it.
   */
  async suspend(): Promise<void> {
    if (this.suspended) return;
    await this.switching?.catch(() => undefined);
    this.suspended = { lora: this.loraReady };
    await this.current.release();
  }

  /** Recreates the session suspend() released (the LoRA twin if that was serving). */
  async resume(): Promise<void> {
    const s = this.suspended;
    if (!s) return;
    const { format, embeddings } = this.manifest.quant;
    this.current = s.lora
      ? await createSession({ kind: 'lora-twin', model: await buildLoraInferenceGraph(this.dir, this.manifest, this.cfg), sessionOptions: this.options, externalDataDir: this.dir, format, embeddings, where: this.dir })
      : await createSession({ kind: 'decoder', model: path.join(this.dir, MODEL_FILE), sessionOptions: this.options, format, embeddings, where: path.join(this.dir, MODEL_FILE) });
    this.inputNames = new Set(this.current.inputNames);
    this.suspended = null;
  }

  get isSuspended(): boolean {
    return this.suspended !== null;
  }

  async release(): Promise<void> {
    await this.switching?.catch(() => undefined);
    this.tableRows?.close();
    if (this.suspended) return;
    await this.current.release();
  }

  private rowReader(): TableRowReader {
    if (!this.tableRows) throw new EdgeloraError('the model graph takes table rows but the manifest records a float vocabulary table', { where: this.dir, hint: 're-run `edgelora quantize`' });
    return this.tableRows;
  }
}
