// Starts `edgelora serve`: listens first (GET /health says "loading"), then loads the base once and
// the --adapter list, then says "ok". Closing stops accepting, lets rows finish within a bound,
// cancels the rest and releases the model. The CLI, the tests and bench:serve all start it here.
import type ort from 'onnxruntime-node';
import type { FastifyInstance } from 'fastify';
import { ServeEngine, type EngineObserver } from './engine.js';
import { ServeMetrics } from './metrics.js';
import { buildApp, type ServeState } from './http.js';
import { EdgeloraError } from '../util/errors.js';
import { Agent, type AgentOptions } from '../sync/agent/agent.js';
import { EngineActivator, type DefaultAdapterMode } from './fleet.js';
import { FineTuningJobs, type JobsOptions } from './jobs.js';
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
  /**
   * Runs the fleet agent in this process over the loaded base: pushed adapters are installed into
   * the engine (src/serve/fleet.ts). `defaultAdapter` (default "fleet") says what a request for the
   * bare base id gets: the fleet's active adapter, or the base alone.
   */
  readonly fleet?: { readonly agent: Omit<AgentOptions, 'activator' | 'modelFingerprint' | 'modelSourceFingerprint'>; readonly defaultAdapter?: DefaultAdapterMode };
  /**
   * Fine-tuning jobs over HTTP, persisted under `stateDir` (the fleet agent's state directory when
   * both run); the job trains over this process's base model directory.
   */
  readonly jobs?: Omit<JobsOptions, 'modelDir' | 'upload'>;
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
  /** The in-process fleet agent once ready (with the `fleet` option), else null. */
  agent(): Agent | null;
  /** Stops accepting, finishes or cancels rows within `graceMs` (default 10 s), releases the model. */
  close(graceMs?: number): Promise<void>;
}

export { isLoopback, readApiKeys } from '../util/http-auth.js';

export async function startServe(o: ServeOptions): Promise<RunningServer> {
  const host = o.host ?? '127.0.0.1';
  const apiKeys = o.apiKeys ?? [];
  checkBind(host, apiKeys, { host: '--host', keyFile: '--api-key-file' });
  const state: ServeState = { engine: null, failed: null, created: Math.floor(Date.now() / 1000), fleet: null, jobs: null };
  let agent: Agent | null = null;
  let closed = false;
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
    if (o.fleet) {
      const activator = new EngineActivator(engine, o.fleet.defaultAdapter ?? 'fleet', o.fleet.agent.log);
      const fleet = o.fleet;
      // start() re-activates the adapter that was active before a restart, then connects. A device
      // must keep serving while its broker is unreachable: on failure the agent is retried in the
      // background (every 5 s) and serving starts on the adapter re-activated from --state.
      const tryStart = async (): Promise<boolean> => {
        const a = new Agent({ ...fleet.agent, activator, modelFingerprint: engine.model.manifest.fingerprint, modelSourceFingerprint: engine.model.manifest.sourceFingerprint ?? null });
        try {
          await a.start();
          agent = a;
          return true;
        } catch (err) {
          await a.stop().catch(() => undefined);
          fleet.agent.log?.(`fleet agent: ${err instanceof EdgeloraError ? err.describe() : (err as Error).message}; serving continues, retrying in 5 s`);
          return false;
        }
      };
      if (!(await tryStart())) {
        void (async () => {
          while (!closed && !(await tryStart())) await new Promise((r) => setTimeout(r, 5000));
        })();
      }
      state.fleet = () => activator.info();
    }
    if (o.jobs) {
      const upload = async (dir: string, name: string): Promise<string> => {
        const a = agent as Agent | null; // set by tryStart, maybe later than now
        if (!a) throw new EdgeloraError('the fleet agent is not connected to the broker yet', { hint: 'check --broker; the agent retries every 5 s' });
        return a.uploadDir(dir, name);
      };
      state.jobs = await FineTuningJobs.open(engine, { ...o.jobs, modelDir: o.modelDir, upload: o.fleet ? upload : null });
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
    agent: () => agent,
    async close(graceMs = 10_000) {
      closed = true;
      const closing = app.close(); // stops accepting now; resolves when the last response ends
      const engine = await ready.catch(() => null);
      await state.jobs?.stop();
      await agent?.stop();
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
