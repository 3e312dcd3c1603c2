// A loaded quantized model: one ORT session serving prefill, decode and scoring. The KV cache is
// held as ORT tensors between calls and belongs to the adapter set that computed it: a forward
// with another adapter set refuses the cache (a cached prefix is never reused across adapters).
import ort from 'onnxruntime-node';
import os from 'node:os';
import path from 'node:path';
import type { ModelConfig } from '../formats/hf-config.js';
import { parseHfConfig } from '../formats/hf-config.js';
import { loadTokenizer, type EdgeTokenizer } from '../formats/tokenizer.js';
import { EdgeloraError } from '../util/errors.js';
import { readManifest, MODEL_FILE, type Manifest } from '../model/manifest.js';
import { INPUT, OUTPUT, MASKED, LINEAR_PROJS, linearShape } from '../model/llama.js';
import { inverseFrequencies, ropeTables } from '../model/rope.js';

/** The LoRA feeds of an adapter set: one aT/bT pair per (layer, projection) input, plus an identity. */
export interface LoraFeeds {
  /** Identifies the adapter set (ids, versions, scales); '' for no adapter. */
  readonly key: string;
  readonly tensors: ReadonlyMap<string, ort.Tensor>;
}

export interface KvCache {
  readonly batch: number; // B
  readonly length: number; // P
  readonly keys: ort.Tensor[]; // per layer [B, G, P, D]
  readonly values: ort.Tensor[];
  /** Which rows' positions are real (1) or padding (0), per row, length P. */
  readonly keyMask: Uint8Array[];
  /** The adapter set that computed this cache. */
  readonly adapterKey: string;
}

export interface ForwardRequest {
  /** Token ids, B rows of equal length T (right-padded by the caller when rows differ). */
  readonly ids: number[][];
  /** Which of `ids` are real tokens (1) vs padding (0); default all real. */
  readonly mask?: Uint8Array[];
  readonly cache?: KvCache | null;
  readonly lora?: LoraFeeds;
}

export interface ForwardResult {
  readonly logits: Float32Array; // [B, T, V]
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
  private readonly inputNames: Set<string>;

  private constructor(
    readonly dir: string,
    readonly manifest: Manifest,
    readonly cfg: ModelConfig,
    readonly tokenizer: EdgeTokenizer,
    readonly session: ort.InferenceSession,
  ) {
    this.inv = inverseFrequencies(cfg);
    this.inputNames = new Set(session.inputNames);
    this.emptyLora = new Map();
    for (let l = 0; l < cfg.numLayers; l++) {
      for (const p of LINEAR_PROJS) {
        const { N, K } = linearShape(cfg, p);
        this.emptyLora.set(INPUT.loraA(l, p), new ort.Tensor('float32', new Float32Array(0), [K, 0]));
        this.emptyLora.set(INPUT.loraB(l, p), new ort.Tensor('float32', new Float32Array(0), [0, N]));
      }
    }
  }

  static async load(dir: string, opts: LoadOptions = {}): Promise<ModelRuntime> {
    const manifest = await readManifest(dir);
    const cfg = parseHfConfig(manifest.sourceConfig, path.join(dir, 'manifest.json'));
    const tokenizer = await loadTokenizer(dir);
    const sessionOptions: ort.InferenceSession.SessionOptions = opts.sessionOptions ?? {
      executionProviders: ['cpu'],
      intraOpNumThreads: os.availableParallelism(),
      graphOptimizationLevel: 'all',
    };
    // In an nf4/fp4 graph the only kernel ORT prepacks is the lm_head Gemm, and its packed copy
    // duplicates the (tied) embedding table: on the small preset prepacking cost ~100 MiB of RSS
    // and no decode speed (bench: 445 → 348 MiB peak). int4's MatMulNBits and fp32's MatMul need it.
    const bnb4 = manifest.quant.format === 'nf4' || manifest.quant.format === 'fp4';
    const options: ort.InferenceSession.SessionOptions = bnb4
      ? { ...sessionOptions, extra: { ...(sessionOptions.extra ?? {}), session: { ...((sessionOptions.extra as { session?: object } | undefined)?.session ?? {}), disable_prepacking: '1' } } }
      : sessionOptions;
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(path.join(dir, MODEL_FILE), options);
    } catch (err) {
      throw new EdgeloraError(`onnxruntime could not load the model: ${(err as Error).message}`, {
        where: path.join(dir, MODEL_FILE),
        hint: 're-run `edgelora quantize`; the directory may be incomplete',
      });
    }
    return new ModelRuntime(dir, manifest, cfg, tokenizer, session);
  }

  /** An empty cache for `batch` rows, bound to an adapter set. */
  emptyCache(batch: number, adapterKey = ''): KvCache {
    const { numLayers, numKvHeads: G, headDim: D } = this.cfg;
    const empty = () => new ort.Tensor('float32', new Float32Array(0), [batch, G, 0, D]);
    return {
      batch,
      length: 0,
      keys: Array.from({ length: numLayers }, empty),
      values: Array.from({ length: numLayers }, empty),
      keyMask: Array.from({ length: batch }, () => new Uint8Array(0)),
      adapterKey,
    };
  }

  /** Runs the decoder on new tokens, continuing `cache`. */
  async forward(req: ForwardRequest): Promise<ForwardResult> {
    const B = req.ids.length;
    const T = req.ids[0]?.length ?? 0;
    if (B === 0 || T === 0) throw new EdgeloraError('forward: empty batch');
    if (req.ids.some((r) => r.length !== T)) throw new EdgeloraError('forward: rows of different lengths (pad them)');
    const lora = req.lora ?? { key: '', tensors: new Map() };
    const cache = req.cache ?? this.emptyCache(B, lora.key);
    if (cache.adapterKey !== lora.key) {
      throw new EdgeloraError('KV cache was computed under another adapter set', {
        hint: 'start a new cache after activating or deactivating adapters',
      });
    }
    if (cache.batch !== B) throw new EdgeloraError(`forward: cache has ${cache.batch} rows, request ${B}`);
    const { numLayers, headDim: D, vocabSize: V } = this.cfg;
    const P = cache.length;
    const S = P + T;
    if (S > this.cfg.maxPositionEmbeddings) {
      throw new EdgeloraError(`sequence of ${S} tokens exceeds max_position_embeddings ${this.cfg.maxPositionEmbeddings}`, {
        hint: 'use a shorter prompt or fewer new tokens',
      });
    }

    const ids = new BigInt64Array(B * T);
    const cos = new Float32Array(B * T * D);
    const sin = new Float32Array(B * T * D);
    const bias = new Float32Array(B * T * S);
    const keyMask: Uint8Array[] = [];
    for (let b = 0; b < B; b++) {
      const row = req.ids[b]!;
      const m = req.mask?.[b];
      const km = new Uint8Array(S);
      km.set(cache.keyMask[b]!, 0);
      for (let t = 0; t < T; t++) {
        ids[b * T + t] = BigInt(row[t]!);
        km[P + t] = m ? m[t]! : 1;
      }
      keyMask.push(km);
      // Positions count real tokens only, so right padding never shifts a row's positions.
      let pos = 0;
      for (let s = 0; s < P; s++) pos += km[s]!;
      const positions = new Array<number>(T);
      for (let t = 0; t < T; t++) positions[t] = pos + t;
      const tab = ropeTables(this.inv, positions);
      cos.set(tab.cos, b * T * D);
      sin.set(tab.sin, b * T * D);
      for (let t = 0; t < T; t++) {
        const base = (b * T + t) * S;
        for (let s = 0; s < S; s++) bias[base + s] = s <= P + t && km[s] ? 0 : MASKED;
      }
    }
    const feeds: Record<string, ort.Tensor> = {
      [INPUT.ids]: new ort.Tensor('int64', ids, [B, T]),
      [INPUT.bias]: new ort.Tensor('float32', bias, [B, T, S]),
      [INPUT.cos]: new ort.Tensor('float32', cos, [B, T, D]),
      [INPUT.sin]: new ort.Tensor('float32', sin, [B, T, D]),
    };
    for (let i = 0; i < numLayers; i++) {
      feeds[INPUT.pastKey(i)] = cache.keys[i]!;
      feeds[INPUT.pastValue(i)] = cache.values[i]!;
    }
    for (const [name, t] of this.emptyLora) feeds[name] = lora.tensors.get(name) ?? t;
    for (const name of lora.tensors.keys()) {
      if (!this.inputNames.has(name)) throw new EdgeloraError(`adapter feed ${name} is not an input of the model graph`);
    }
    const out = await this.session.run(feeds);
    const logits = out[OUTPUT.logits]!;
    const keys: ort.Tensor[] = [];
    const values: ort.Tensor[] = [];
    for (let i = 0; i < numLayers; i++) {
      keys.push(out[OUTPUT.presentKey(i)]!);
      values.push(out[OUTPUT.presentValue(i)]!);
    }
    return {
      logits: logits.data as Float32Array,
      dims: [B, T, V],
      cache: { batch: B, length: S, keys, values, keyMask, adapterKey: lora.key },
    };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
