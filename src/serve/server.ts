// Starts `edgelora serve`: listens first (GET /health says "loading"), then loads the base once and
// the --adapter list, then says "ok". Closing stops accepting, lets rows finish within a bound,
// cancels the rest and releases the model. The CLI, the tests and bench:serve all start it here.
import type ort from 'onnxruntime-node';
import type { FastifyInstance } from 'fastify';
import { ServeEngine, type EngineObserver } from './engine.js';
import { ServeMetrics } from './metrics.js';
import { buildApp, type ServeState } from './http.js';
import { checkBind } from '../util/http-auth.js';

export interface ServeOptions {
  readonly modelDir: string;
  /** Default 127.0.0.1. Any other address requires API keys. */
  readonly host?: string;
  /** Default 8080; 0 picks a free port. */
  readonly port?: number;
  /** The base's model id (default: the model directory's name). */
  readonly modelId?: string;
  readonly adapters?: readonly { id: string; dir: string; scale: number }[];
  readonly maxBatch?: number;
  readonly maxQueue?: number;
  /** Tokens per request, prompt + completion (default: the model's max_position_embeddings). */
  readonly ctx?: number;
  readonly apiKeys?: readonly string[];
  readonly bodyLimit?: number;
  readonly jsonLog?: boolean;
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
  /** Also told what the scheduler reports (besides the metrics), e.g. by bench:serve. */
  readonly observer?: EngineObserver;
}

export interface RunningServer {
  /** e.g. http://127.0.0.1:43211 */
  readonly url: string;
  readonly app: FastifyInstance;
  /** Resolves once the base and the --adapter list are loaded (rejects if loading failed). */
  readonly ready: Promise<ServeEngine>;
  readonly metrics: ServeMetrics;
  /** Stops accepting, finishes or cancels rows within `graceMs` (default 10 s), releases the model. */
  close(graceMs?: number): Promise<void>;
}

export { isLoopback, readApiKeys } from '../util/http-auth.js';

export async function startServe(o: ServeOptions): Promise<RunningServer> {
  const host = o.host ?? '127.0.0.1';
  const apiKeys = o.apiKeys ?? [];
  checkBind(host, apiKeys, { host: '--host', keyFile: '--api-key-file' });
  const state: ServeState = { engine: null, failed: null, created: Math.floor(Date.now() / 1000) };
  const metrics = new ServeMetrics({
    queueDepth: () => state.engine?.queueDepth ?? 0,
    running: () => state.engine?.runningRows ?? 0,
    adapters: () => state.engine?.adapterInfo() ?? [],
  });
  const app = buildApp({ state, metrics, apiKeys, ...(o.bodyLimit !== undefined ? { bodyLimit: o.bodyLimit } : {}), ...(o.jsonLog ? { jsonLog: true } : {}) });
  await app.listen({ host, port: o.port ?? 8080 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : (o.port ?? 8080);
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  const ready = (async () => {
    const engine = await ServeEngine.start(o.modelDir, {
      ...(o.modelId !== undefined ? { modelId: o.modelId } : {}),
      ...(o.maxBatch !== undefined ? { maxBatch: o.maxBatch } : {}),
      ...(o.maxQueue !== undefined ? { maxQueue: o.maxQueue } : {}),
      ...(o.ctx !== undefined ? { ctx: o.ctx } : {}),
      ...(o.sessionOptions ? { sessionOptions: o.sessionOptions } : {}),
      observer: o.observer ? chain(metrics, o.observer) : metrics,
    });
    try {
      for (const a of o.adapters ?? []) await engine.loadAdapter(a.id, a.dir, a.scale);
    } catch (err) {
      await engine.shutdown(0);
      throw err;
    }
    state.engine = engine;
    return engine;
  })();
  ready.catch((err: unknown) => {
    state.failed = err instanceof Error ? err : new Error(String(err));
  });
  return {
    url,
    app,
    ready,
    metrics,
    async close(graceMs = 10_000) {
      const closing = app.close(); // stops accepting now; resolves when the last response ends
      const engine = await ready.catch(() => null);
      await engine?.shutdown(graceMs);
      await closing;
    },
  };
}

/** One observer that tells both. */
function chain(a: EngineObserver, b: EngineObserver): EngineObserver {
  return {
    batch: (n) => (a.batch?.(n), b.batch?.(n)),
    firstToken: (ms) => (a.firstToken?.(ms), b.firstToken?.(ms)),
    decodeStep: (n, ms) => (a.decodeStep?.(n, ms), b.decodeStep?.(n, ms)),
    finished: (r) => (a.finished?.(r), b.finished?.(r)),
    queueDepth: (n) => (a.queueDepth?.(n), b.queueDepth?.(n)),
  };
}
