// The serving engine: one loaded base, its adapter registry and a continuous-batching scheduler.
// Requests wait in a bounded queue; at every token boundary waiting rows are prefilled into free
// batch slots (rows of equal prompt length share one prefill forward), then ONE decode forward
// advances every running row by a token, whatever adapters each row uses (BatchLoraPacker's
// per-row rank mask keeps each row to its own adapters). A row leaves when it finishes or its
// client goes away. HTTP (src/serve/http.ts) and the CLI are shells over this object; issue #12
// adds fine-tuning jobs and the fleet agent on the same base through `adapters` and `between()`.
import path from 'node:path';
import type ort from 'onnxruntime-node';
import { ModelRuntime, type KvCache, type LoraFeeds } from '../runtime/model.js';
import { AdapterManager, AdapterConflictError, type AdapterInfo } from '../adapters/manager.js';
import { sampleToken, checkSampling, type SamplingOptions } from '../runtime/sampling.js';
import { StreamDecoder } from '../formats/tokenizer.js';
import { Rng } from '../util/rng.js';
import { EdgeloraError } from '../util/errors.js';
import { BatchLoraPacker, type AdapterSet } from './lora-batch.js';
import { KvSlots } from './kv-slots.js';
import { StopMatcher } from './stop.js';

/** Event-loop turns the scheduler waits at most for more arrivals before a prefill (gatherArrivals). */
const ARRIVAL_TURNS = 4;

/** An error a client caused or must handle; `status` and `code` become the OpenAI error body. */
export class ServeError extends EdgeloraError {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string,
    readonly param: string | null = null,
    opts: { hint?: string; where?: string } = {},
  ) {
    super(message, opts);
  }
}

export interface EngineOptions {
  /** Rows decoded together at most (default 8). */
  readonly maxBatch?: number;
  /** Requests waiting for a batch slot at most; one more is refused with 429 (default 64). */
  readonly maxQueue?: number;
  /** Tokens a request may hold at most, prompt + completion (default: the model's max_position_embeddings). */
  readonly ctx?: number;
  /** The profile's ORT session options. */
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
  readonly observer?: EngineObserver;
}

/** What the scheduler reports (metrics hang here); every member optional. */
export interface EngineObserver {
  batch?(rows: number): void;
  firstToken?(ms: number): void;
  decodeStep?(rows: number, ms: number): void;
  finished?(r: CompletionResult): void;
  queueDepth?(n: number): void;
  /**
   * Before every forward (prefill group or decode step), each row's request and the adapters the fed
   * masks give it (BatchLoraPacker.rowAdapters; '' for the base alone). A check, not a metric: when
   * set, every forward scans its masks.
   */
  rows?(rows: readonly { req: CompletionRequest; adapters: string }[]): void;
}

export interface CompletionRequest {
  readonly promptIds: readonly number[];
  /** Adapters to stack, by id, each with its scale. Resolved (and held) at submit time. */
  readonly adapters: readonly { readonly id: string; readonly scale: number }[];
  readonly maxTokens: number;
  readonly sampling: SamplingOptions;
  readonly seed: number;
  readonly stop?: readonly string[];
  /** Keep generating past end-of-sequence tokens (benchmarks; vLLM's `ignore_eos`). */
  readonly ignoreEos?: boolean;
  /** Aborting cancels the row at the next token boundary (or drops it from the queue). */
  readonly signal?: AbortSignal;
  /** Streamed text as it becomes final (held back while it could start a stop string). */
  readonly onText?: (text: string) => void;
}

export type FinishReason = 'stop' | 'length' | 'cancelled';

export interface CompletionResult {
  readonly text: string;
  readonly tokenIds: number[];
  readonly promptTokens: number;
  readonly finishReason: FinishReason;
  /** From submit to the first sampled token. */
  readonly ttftMs: number;
}

interface Row {
  readonly req: CompletionRequest;
  readonly set: AdapterSet;
  readonly rng: Rng;
  readonly stream: StreamDecoder;
  readonly stop: StopMatcher;
  readonly submitted: number;
  readonly out: number[];
  emitted: string;
  /** Tokens in this row's cache. */
  length: number;
  /** The token the next decode step feeds. */
  next: number;
  ttftMs: number;
  done: FinishReason | null;
  stoppedByString: boolean;
  resolve(r: CompletionResult): void;
  reject(e: unknown): void;
}

export class ServeEngine {
  readonly adapters: AdapterManager;
  readonly maxBatch: number;
  readonly maxQueue: number;
  readonly ctx: number;
  private readonly queue: Row[] = [];
  private readonly running: Row[] = [];
  private readonly slots: KvSlots;
  private readonly packer: BatchLoraPacker;
  private readonly eos: Set<number>;
  private wake: (() => void) | null = null;
  private loopDone: Promise<void> | null = null;
  private stopping = false;
  private readonly betweenBatches: (() => Promise<void> | void)[] = [];
  private readonly defaultScales = new Map<string, number>();
  /** What a request for the bare base id gets: an adapter id (the fleet's active one), or null (the base alone). */
  private baseDefault: string | null = null;
  /** Serving paused for a fine-tuning job (pauseServing): no rows admitted; `released` once the session is. */
  private pause: { released: boolean; ready: () => void; fail: (e: unknown) => void } | null = null;

  private constructor(
    readonly model: ModelRuntime,
    readonly modelId: string,
    private readonly observer: EngineObserver,
    opts: EngineOptions,
  ) {
    this.adapters = new AdapterManager(model);
    this.maxBatch = opts.maxBatch ?? 8;
    this.maxQueue = opts.maxQueue ?? 64;
    this.ctx = Math.min(opts.ctx ?? model.cfg.maxPositionEmbeddings, model.cfg.maxPositionEmbeddings);
    this.slots = new KvSlots(model.cfg, this.maxBatch, this.ctx);
    this.packer = new BatchLoraPacker(model.cfg);
    this.eos = new Set(model.tokenizer.eosTokenIds);
  }

  /** Loads the base once, switches it to the LoRA twin (so adapters are a change of feeds) and starts the scheduler. */
  static async start(dir: string, opts: EngineOptions & { modelId?: string } = {}): Promise<ServeEngine> {
    for (const [k, v] of [['maxBatch', opts.maxBatch], ['maxQueue', opts.maxQueue], ['ctx', opts.ctx]] as const) {
      if (v !== undefined && !(Number.isInteger(v) && v >= (k === 'maxQueue' ? 0 : 1))) throw new EdgeloraError(`${k} ${v}: must be an integer ≥ ${k === 'maxQueue' ? 0 : 1}`);
    }
    const model = await ModelRuntime.load(dir, opts.sessionOptions ? { sessionOptions: opts.sessionOptions } : {});
    try {
      await model.enableLora();
    } catch (err) {
      await model.release();
      throw err;
    }
    const engine = new ServeEngine(model, opts.modelId ?? path.basename(path.resolve(dir)), opts.observer ?? {}, opts);
    engine.loopDone = engine.loop();
    return engine;
  }

  /**
   * Loads and validates an adapter under `id` (same content again: no-op; other content: refused).
   * `scale` (default 1) is what a request naming the adapter gets unless it gives its own.
   * `replace`: other content takes over a loaded id in one step (rows in flight keep the old data).
   */
  async loadAdapter(id: string, dir: string, scale = 1, opts: { replace?: boolean } = {}): Promise<{ created: boolean; info: AdapterInfo & { defaultScale: number } }> {
    if (!Number.isFinite(scale)) throw new ServeError(`scale ${scale} is not a finite number`, 400, 'invalid_scale', 'scale');
    const existed = this.adapters.has(id);
    try {
      await this.adapters.load(dir, { id, ...(opts.replace ? { replace: true } : {}) });
    } catch (err) {
      if (err instanceof AdapterConflictError) {
        throw new ServeError(err.message, 409, 'adapter_conflict', 'id', { hint: 'unload it first (DELETE /v1/adapters/{id}) or choose another id' });
      }
      throw new ServeError(err instanceof EdgeloraError ? err.describe() : (err as Error).message, 400, 'invalid_adapter', 'path');
    }
    if (!existed) this.defaultScales.set(id, scale);
    return { created: !existed, info: this.adapterInfo().find((a) => a.id === id)! };
  }

  /** The loaded adapters, each with the scale a request gets by default. */
  adapterInfo(): (AdapterInfo & { defaultScale: number })[] {
    return this.adapters.list().map((a) => ({ ...a, defaultScale: this.defaultScales.get(a.id) ?? 1 }));
  }

  /**
   * The adapter stack a request asks for: `model` is the base id or "<base>:<adapter>", then the
   * `adapters` extension's entries. An unknown model or adapter is a 404.
   */
  resolveAdapters(model: string, extra: readonly { id: string; scale?: number | undefined }[] = []): { id: string; scale: number }[] {
    const out: { id: string; scale: number }[] = [];
    if (model === this.modelId && this.baseDefault !== null && this.adapters.has(this.baseDefault)) {
      out.push({ id: this.baseDefault, scale: this.defaultScales.get(this.baseDefault) ?? 1 });
    } else if (model !== this.modelId) {
      const prefix = `${this.modelId}:`;
      const id = model.startsWith(prefix) ? model.slice(prefix.length) : null;
      if (id === null || !this.adapters.has(id)) {
        throw new ServeError(`the model "${model}" does not exist`, 404, 'model_not_found', 'model', { hint: `GET /v1/models lists ${this.modelId} and ${this.modelId}:<adapter>` });
      }
      out.push({ id, scale: this.defaultScales.get(id) ?? 1 });
    }
    for (const a of extra) {
      if (!this.adapters.has(a.id)) throw new ServeError(`the adapter "${a.id}" does not exist`, 404, 'adapter_not_found', 'adapters', { hint: 'GET /v1/adapters lists the loaded ones' });
      out.push({ id: a.id, scale: a.scale ?? this.defaultScales.get(a.id) ?? 1 });
    }
    return out;
  }

  /**
   * Sets what a request for the bare base id gets (null: the base alone). Requests already
   * submitted keep the set they resolved; call it inside between() to swap at a token boundary.
   */
  setBaseDefault(id: string | null): void {
    if (id !== null && !this.adapters.has(id)) throw new EdgeloraError(`no loaded adapter "${id}" to serve as the base default`);
    this.baseDefault = id;
  }

  get baseDefaultAdapter(): string | null {
    return this.baseDefault;
  }

  /** Unloads an adapter; rows already running with it finish with the data they started with. */
  unloadAdapter(id: string): void {
    if (!this.adapters.has(id)) throw new ServeError(`no loaded adapter "${id}"`, 404, 'adapter_not_found', 'id');
    this.adapters.unload(id);
    this.defaultScales.delete(id);
    if (this.baseDefault === id) this.baseDefault = null;
  }

  /** Runs `fn` at the next token boundary, with no forward in flight (for swaps that need it). */
  between<T>(fn: () => Promise<T> | T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.betweenBatches.push(async () => {
        try {
          resolve(await fn());
        } catch (e) {
          reject(e);
        }
      });
      this.wake?.();
    });
  }

  /**
   * Serving queues during a fine-tuning job: rows running now finish, then the base's session is
   * released (its weights leave memory for the job's training session) and requests wait in the queue
   * (up to maxQueue; none fails) until the returned resume() recreates the session and serves them.
   * Adapter swaps (between()) still run while paused.
   */
  async pauseServing(): Promise<{ resume: () => Promise<void> }> {
    if (this.pause) throw new EdgeloraError('serving is already paused');
    if (this.stopping) throw new EdgeloraError('the engine is shutting down');
    await new Promise<void>((ready, fail) => {
      this.pause = { released: false, ready, fail };
      this.wake?.();
    });
    let resumed = false;
    return {
      resume: async () => {
        if (resumed) return;
        resumed = true;
        try {
          await this.model.resume();
        } finally {
          // Even when the session could not be recreated: queued rows then fail with the forward's error, not hang.
          this.pause = null;
          this.wake?.();
        }
      },
    };
  }

  /** Whether serving is paused for a fine-tuning job (requests queue). */
  get paused(): boolean {
    return this.pause !== null;
  }

  get queueDepth(): number {
    return this.queue.length;
  }

  get runningRows(): number {
    return this.running.length;
  }

  /**
   * Throws the ServeError a request would be refused with (shutting down, sampling, context,
   * adapters, queue); a streaming response calls it before it sends its headers.
   */
  check(req: Omit<CompletionRequest, 'signal' | 'onText'>, promptParam = 'prompt'): void {
    if (this.stopping) throw new ServeError('the server is shutting down', 503, 'shutting_down');
    try {
      checkSampling(req.sampling);
    } catch (err) {
      throw new ServeError((err as Error).message.replace(/--(top-k|top-p)/g, (_m, f: string) => f.replace('-', '_')), 400, 'invalid_value');
    }
    const P = req.promptIds.length;
    if (P === 0) throw new ServeError('the prompt encodes to no tokens', 400, 'empty_prompt', promptParam);
    if (P >= this.ctx) {
      throw new ServeError(`the prompt has ${P} tokens; this server's context is ${this.ctx} tokens (prompt + completion), so at most ${this.ctx - 1} prompt tokens fit`, 400, 'context_length_exceeded', promptParam, { hint: 'shorten the prompt, or start the server with a larger --ctx' });
    }
    if (req.maxTokens > this.ctx - P) {
      throw new ServeError(`max_tokens ${req.maxTokens} + ${P} prompt tokens exceed this server's context of ${this.ctx} tokens; at most ${this.ctx - P} completion tokens fit`, 400, 'context_length_exceeded', 'max_tokens', { hint: 'lower max_tokens' });
    }
    const missing = req.adapters.find((a) => !this.adapters.has(a.id));
    if (missing) throw new ServeError(`the adapter "${missing.id}" does not exist`, 404, 'adapter_not_found', 'adapters');
    if (this.queue.length >= this.maxQueue) throw new ServeError(`the queue is full (${this.maxQueue} requests waiting)`, 429, 'queue_full', null, { hint: 'retry later' });
  }

  /** Checks a request (check()), holds its adapters' data, and queues it. */
  submit(req: CompletionRequest): Promise<CompletionResult> {
    let set: AdapterSet;
    try {
      this.check(req);
      set = { terms: req.adapters.map((a) => ({ held: { id: a.id, ...this.adapters.held(a.id) }, scale: a.scale })) };
    } catch (err) {
      return Promise.reject(err);
    }
    if (req.signal?.aborted) return Promise.reject(new ServeError('the request was cancelled', 499, 'cancelled'));
    return new Promise<CompletionResult>((resolve, reject) => {
      const row: Row = {
        req,
        set,
        rng: new Rng(req.seed),
        stream: new StreamDecoder(this.model.tokenizer),
        stop: new StopMatcher(req.stop ?? []),
        submitted: performance.now(),
        out: [],
        emitted: '',
        length: 0,
        next: -1,
        ttftMs: 0,
        done: null,
        stoppedByString: false,
        resolve,
        reject,
      };
      req.signal?.addEventListener('abort', () => this.wake?.(), { once: true });
      this.queue.push(row);
      this.observer.queueDepth?.(this.queue.length);
      this.wake?.();
    });
  }

  /**
   * Stops taking requests; lets rows finish for up to `graceMs`, then cancels the rest (queued rows
   * at once), stops the scheduler and releases the session.
   */
  async shutdown(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    for (const r of this.queue.splice(0)) this.finish(r, 'cancelled');
    this.observer.queueDepth?.(0);
    const deadline = performance.now() + graceMs;
    while (this.running.length > 0 && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const r of this.running) r.done = 'cancelled';
    this.wake?.();
    await this.loopDone;
    await this.model.release();
  }

  private async loop(): Promise<void> {
    for (;;) {
      for (const fn of this.betweenBatches.splice(0)) await fn();
      this.dropCancelled();
      if (this.stopping && this.running.length === 0) return;
      const pause = this.pause;
      if (pause && this.running.length === 0) {
        if (!pause.released) {
          try {
            await this.model.suspend();
            pause.released = true;
            pause.ready();
          } catch (err) {
            this.pause = null;
            pause.fail(err);
          }
          continue;
        }
        // Released: wait for resume(), a between() or shutdown.
        await new Promise<void>((r) => {
          this.wake = r;
        });
        this.wake = null;
        continue;
      }
      if (this.running.length === 0 && this.queue.length === 0) {
        await new Promise<void>((r) => {
          this.wake = r;
        });
        this.wake = null;
        continue;
      }
      if (!pause) {
        await this.gatherArrivals();
        this.dropCancelled();
      }
      const admitted = pause ? [] : this.queue.splice(0, this.maxBatch - this.running.length);
      try {
        if (admitted.length > 0) {
          this.observer.queueDepth?.(this.queue.length);
          await this.prefill(admitted);
        }
        this.retire();
        if (this.running.length > 0) await this.decodeStep();
        this.retire();
      } catch (err) {
        // A failed forward fails the rows it touched; the engine keeps serving the others.
        for (const r of new Set([...this.running.splice(0), ...admitted])) r.reject(err);
      }
    }
  }

  /**
   * A forward blocks the event loop (onnxruntime-node runs a session synchronously), so requests that
   * came in during it are still being read when the scheduler gets here, and the first one submitted
   * may be what woke it. Before admitting, yield to the event loop while that lets more requests reach
   * the queue (at most ARRIVAL_TURNS turns, each microseconds when nothing is pending), so that
   * requests arriving together share one prefill forward instead of one each: every prefill forward
   * stalls all running rows and reads all the weights again.
   */
  private async gatherArrivals(): Promise<void> {
    for (let turn = 0; turn < ARRIVAL_TURNS; turn++) {
      if (this.queue.length === 0 || this.running.length + this.queue.length >= this.maxBatch) return;
      const before = this.queue.length;
      await new Promise<void>((r) => setImmediate(r));
      if (this.queue.length === before) return;
    }
  }

  private dropCancelled(): void {
    for (let i = this.queue.length - 1; i >= 0; i--) {
      const r = this.queue[i]!;
      if (r.req.signal?.aborted) {
        this.queue.splice(i, 1);
        this.finish(r, 'cancelled');
        this.observer.queueDepth?.(this.queue.length);
      }
    }
    for (const r of this.running) if (r.req.signal?.aborted && !r.done) r.done = 'cancelled';
  }

  /** Prefills new rows into slots after the running ones; rows of equal prompt length share a forward. */
  private async prefill(rows: Row[]): Promise<void> {
    const reserve = Math.max(...rows.map((r) => r.req.promptIds.length + r.req.maxTokens));
    this.slots.ensure(reserve, this.running.map((r) => r.length));
    const byLength = new Map<number, Row[]>();
    for (const r of rows) byLength.set(r.req.promptIds.length, [...(byLength.get(r.req.promptIds.length) ?? []), r]);
    for (const group of byLength.values()) {
      const from = this.running.length;
      this.observer.batch?.(group.length);
      const lora = this.packer.feeds(group.map((r) => r.set));
      this.reportRows(group, lora);
      const cache = this.model.cacheOver(this.slots.view(from, group.length), group.map(() => 0), lora.key);
      const res = await this.model.forward({ ids: group.map((r) => [...r.req.promptIds]), cache, lora, logits: 'last' });
      const V = res.dims[2];
      group.forEach((r, b) => {
        r.length = r.req.promptIds.length;
        this.running.push(r);
        r.ttftMs = performance.now() - r.submitted;
        this.observer.firstToken?.(r.ttftMs);
        this.accept(r, sampleToken(res.logits.subarray(b * V, (b + 1) * V), r.req.sampling, r.rng));
      });
    }
  }

  /** One forward advancing every running row by one token. */
  private async decodeStep(): Promise<void> {
    const rows = this.running;
    const n = rows.length;
    this.slots.ensure(Math.max(...rows.map((r) => r.length + 1)), rows.map((r) => r.length));
    this.observer.batch?.(n);
    const lora = this.packer.feeds(rows.map((r) => r.set));
    this.reportRows(rows, lora);
    const cache: KvCache = this.model.cacheOver(this.slots.view(0, n), rows.map((r) => r.length), lora.key);
    const t0 = performance.now();
    const res = await this.model.forward({ ids: rows.map((r) => [r.next]), cache, lora, logits: 'last' });
    this.observer.decodeStep?.(n, performance.now() - t0);
    const V = res.dims[2];
    rows.forEach((r, b) => {
      r.length++;
      if (!r.done) this.accept(r, sampleToken(res.logits.subarray(b * V, (b + 1) * V), r.req.sampling, r.rng));
    });
  }

  private reportRows(rows: readonly Row[], lora: LoraFeeds): void {
    if (!this.observer.rows) return;
    const got = this.packer.rowAdapters(lora, rows.length);
    this.observer.rows(rows.map((r, b) => ({ req: r.req, adapters: got[b]! })));
  }

  /** A sampled token: end of sequence, or one more completion token (as `generate` counts them). */
  private accept(r: Row, token: number): void {
    if (r.done) return;
    if (!r.req.ignoreEos && this.eos.has(token)) {
      r.done = 'stop';
      return;
    }
    r.out.push(token);
    const piece = r.stream.push(token);
    if (piece) this.emit(r, piece);
    if (r.done) return;
    if (r.out.length >= r.req.maxTokens || r.length + 1 > this.ctx) r.done = 'length';
    else r.next = token;
  }

  private emit(r: Row, text: string): void {
    const { emit, stopped } = r.stop.push(text);
    if (emit) {
      r.emitted += emit;
      r.req.onText?.(emit);
    }
    if (stopped) {
      r.done = 'stop';
      r.stoppedByString = true;
    }
  }

  /** Takes finished rows out of the batch; the last running row moves into a freed slot. */
  private retire(): void {
    for (let i = this.running.length - 1; i >= 0; i--) {
      const r = this.running[i]!;
      if (!r.done) continue;
      const last = this.running.length - 1;
      if (i !== last) this.slots.move(last, i, this.running[last]!.length);
      this.running[i] = this.running[last]!;
      this.running.pop();
      this.finish(r, r.done);
    }
  }

  private finish(r: Row, reason: FinishReason): void {
    if (!r.stoppedByString) {
      const tail = r.stream.flush();
      if (tail) this.emit(r, tail);
      if (!r.stoppedByString) {
        const held = r.stop.flush();
        if (held) {
          r.emitted += held;
          r.req.onText?.(held);
        }
      }
    }
    // Without a stop string the text is the decode of every token (what `edgelora generate` prints).
    const text = r.stoppedByString ? r.emitted : this.model.tokenizer.decode(r.out, { skipSpecialTokens: true });
    const result: CompletionResult = { text, tokenIds: [...r.out], promptTokens: r.req.promptIds.length, finishReason: r.stoppedByString ? 'stop' : reason, ttftMs: r.ttftMs };
    this.observer.finished?.(result);
    r.resolve(result);
  }
}
