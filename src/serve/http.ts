// The HTTP shell over ServeEngine (fastify): OpenAI-compatible routes, zod-validated bodies, the
// OpenAI error body for every refusal, server-sent events for streams, Bearer API keys compared in
// constant time, Prometheus metrics. Routes translate; the engine decides.
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { randomBytes } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import { z } from 'zod';
import { ServeEngine, ServeError, type CompletionRequest, type CompletionResult } from './engine.js';
import type { ServeMetrics } from './metrics.js';
import { chatCompletionBody, completionBody, loadAdapterBody, messageText, describeZodError, type ChatCompletionBody, type CompletionBody } from './schemas.js';
import { EdgeloraError } from '../util/errors.js';
import type { FleetInfo } from './fleet.js';
import type { FineTuningJobs } from './jobs.js';
import { registerJobRoutes } from './jobs-routes.js';
import { keyMatches } from '../util/http-auth.js';

/** What the routes see of the process: the engine once the base is loaded, or why it is not. */
export interface ServeState {
  engine: ServeEngine | null;
  failed: Error | null;
  readonly created: number; // unix seconds, for the model objects
  /** With the in-process fleet agent: which adapter is active and what the bare base id serves. */
  fleet: (() => FleetInfo) | null;
  /** Fine-tuning jobs (with --state), once the base is loaded. */
  jobs: FineTuningJobs | null;
}

export interface AppOptions {
  readonly state: ServeState;
  readonly metrics: ServeMetrics;
  /** Accepted Bearer tokens; empty: no authentication. */
  readonly apiKeys: readonly string[];
  /** Largest request body in bytes (default 1 MiB). */
  readonly bodyLimit?: number;
  /** One JSON log line per request on stderr (fastify's pino logger). */
  readonly jsonLog?: boolean;
}

const ERROR_TYPE: Readonly<Record<number, string>> = {
  400: 'invalid_request_error',
  401: 'invalid_request_error',
  404: 'invalid_request_error',
  409: 'invalid_request_error',
  413: 'invalid_request_error',
  415: 'invalid_request_error',
  429: 'rate_limit_error',
  500: 'server_error',
  503: 'server_error',
};

function errorBody(status: number, message: string, code: string | null, param: string | null = null) {
  return { error: { message, type: ERROR_TYPE[status] ?? (status < 500 ? 'invalid_request_error' : 'server_error'), param, code } };
}

function serveErrorBody(e: ServeError) {
  return errorBody(e.status, e.hint ? `${e.message} (${e.hint})` : e.message, e.code, e.param);
}

export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.infer<S> {
  const r = schema.safeParse(body);
  if (!r.success) {
    const { message, param } = describeZodError(r.error);
    throw new ServeError(message, 400, 'invalid_value', param);
  }
  return r.data;
}

const id = (prefix: string) => `${prefix}-${randomBytes(12).toString('hex')}`;

export function buildApp(opts: AppOptions): FastifyInstance {
  const { state, metrics } = opts;
  const bodyLimit = opts.bodyLimit ?? 1024 * 1024;
  const app = Fastify({ bodyLimit, logger: opts.jsonLog ? { level: 'info', stream: process.stderr } : false, return503OnClosing: true });

  const ready = (): ServeEngine => {
    if (state.engine) return state.engine;
    if (state.failed) throw new ServeError(`the model failed to load: ${state.failed.message}`, 503, 'model_load_failed');
    throw new ServeError('the model is still loading', 503, 'model_loading', null, { hint: 'poll GET /health until it says ok' });
  };

  app.addHook('onRequest', async (req, reply) => {
    if (opts.apiKeys.length === 0 || req.url === '/health') return;
    const h = req.headers.authorization;
    const m = typeof h === 'string' ? /^Bearer\s+(.+)$/i.exec(h) : null;
    if (!m || !keyMatches(m[1]!.trim(), opts.apiKeys)) {
      return reply.code(401).send(errorBody(401, m ? 'Incorrect API key provided' : 'Missing API key: send "Authorization: Bearer <key>"', 'invalid_api_key'));
    }
  });
  // A stream counts its own status when it ends (its HTTP status is 200 even when it ends in an error event).
  const streamed = new WeakSet<FastifyRequest>();
  app.addHook('onResponse', async (req, reply) => {
    if (!streamed.has(req)) metrics.request(req.routeOptions.url ?? 'unmatched', reply.statusCode);
  });

  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send(errorBody(404, `no route ${req.method} ${req.url}`, 'not_found'));
  });
  app.setErrorHandler((err: unknown, req, reply) => {
    if (err instanceof ServeError) return reply.code(err.status).send(serveErrorBody(err));
    if (err instanceof EdgeloraError) return reply.code(400).send(errorBody(400, err.describe(), 'invalid_request'));
    const e = err as { statusCode?: number; code?: string; message?: string };
    const status = e.statusCode ?? 500;
    if (status === 413) return reply.code(413).send(errorBody(413, `the request body is larger than the limit of ${bodyLimit} bytes`, 'body_too_large'));
    if (e.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || (status === 400 && err instanceof SyntaxError)) {
      return reply.code(400).send(errorBody(400, `the request body is not valid JSON: ${e.message}`, 'invalid_json'));
    }
    if (e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return reply.code(415).send(errorBody(415, 'the request body must be application/json', 'unsupported_media_type'));
    if (status >= 400 && status < 500) return reply.code(status).send(errorBody(status, e.message ?? 'bad request', e.code ?? null));
    req.log.error(err);
    return reply.code(500).send(errorBody(500, `internal error: ${e.message ?? String(err)}`, 'internal_error'));
  });

  app.get('/health', async (_req, reply) => {
    // While a fine-tuning job trains, serving is paused (requests queue): say so, with the queue's depth.
    if (state.engine) return { status: 'ok', ...(state.engine.paused ? { serving: 'paused for a fine-tuning job; requests queue until it ends', queue_depth: state.engine.queueDepth } : {}), ...(state.fleet ? { fleet: state.fleet() } : {}) };
    if (state.failed) return reply.code(503).send({ status: 'error', message: state.failed.message });
    return reply.code(503).send({ status: 'loading' });
  });

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  const modelObjects = (engine: ServeEngine) => [
    { id: engine.modelId, object: 'model', created: state.created, owned_by: 'edgelora', root: engine.modelId, parent: null },
    ...engine.adapterInfo().map((a) => ({ id: `${engine.modelId}:${a.id}`, object: 'model', created: state.created, owned_by: 'edgelora', root: engine.modelId, parent: engine.modelId })),
  ];
  // Extension: with the fleet agent, the list also says which adapter the bare base id serves.
  app.get('/v1/models', async () => ({ object: 'list', data: modelObjects(ready()), ...(state.fleet ? { fleet: state.fleet() } : {}) }));
  app.get<{ Params: { id: string } }>('/v1/models/:id', async (req) => {
    const m = modelObjects(ready()).find((x) => x.id === req.params.id);
    if (!m) throw new ServeError(`the model "${req.params.id}" does not exist`, 404, 'model_not_found', 'model');
    return m;
  });

  const adapterObject = (engine: ServeEngine, a: ReturnType<ServeEngine['adapterInfo']>[number]) => ({
    id: a.id,
    object: 'adapter',
    model: `${engine.modelId}:${a.id}`,
    path: a.dir,
    scale: a.defaultScale,
    rank: a.rank,
    targets: a.targets,
    parameters: a.parameters,
    bytes: a.bytes,
    base_fingerprint: a.baseFingerprint,
    source_fingerprint: a.sourceFingerprint,
    /** Set when the adapter was trained on another quantization of this base's source model. */
    base_note: a.baseNote,
  });
  app.get('/v1/adapters', async () => {
    const engine = ready();
    return { object: 'list', data: engine.adapterInfo().map((a) => adapterObject(engine, a)) };
  });
  app.post('/v1/adapters', async (req, reply) => {
    const engine = ready();
    const b = parseBody(loadAdapterBody, req.body);
    const { created, info } = await engine.loadAdapter(b.id, b.path, b.scale ?? 1);
    return reply.code(created ? 201 : 200).send(adapterObject(engine, info));
  });
  app.delete<{ Params: { id: string } }>('/v1/adapters/:id', async (req) => {
    ready().unloadAdapter(req.params.id);
    return { id: req.params.id, object: 'adapter', deleted: true };
  });

  registerJobRoutes(app, () => {
    ready();
    if (state.jobs) return state.jobs;
    throw new ServeError('fine-tuning jobs need a state directory', 404, 'fine_tuning_unavailable', null, { hint: 'start serve with --state DIR' });
  });
  app.post('/v1/chat/completions', (req, reply) => completion('chat', req, reply));
  app.post('/v1/completions', (req, reply) => completion('text', req, reply));

  /** Both completion endpoints: parse, build the engine request, then answer whole or as a stream. */
  async function completion(kind: 'chat' | 'text', req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
    const engine = ready();
    const chat: ChatCompletionBody | null = kind === 'chat' ? parseBody(chatCompletionBody, req.body) : null;
    const text: CompletionBody | null = kind === 'text' ? parseBody(completionBody, req.body) : null;
    const b = (chat ?? text)!;
    if (b.n != null && b.n !== 1) throw new ServeError(`n ${b.n}: only n = 1 is supported`, 400, 'invalid_value', 'n');
    if (b.logprobs != null && b.logprobs !== false) throw new ServeError('logprobs are not supported', 400, 'unsupported_parameter', 'logprobs');
    if (Array.isArray(b.tools) && b.tools.length > 0) throw new ServeError('tools are not supported', 400, 'unsupported_parameter', 'tools');
    if (b.echo != null && b.echo !== false) throw new ServeError('echo is not supported', 400, 'unsupported_parameter', 'echo');
    const adapters = engine.resolveAdapters(b.model, b.adapters ?? []);
    const tok = engine.model.tokenizer;
    let promptIds: number[];
    if (chat) {
      // A chat/instruct template may not know OpenAI's newer "developer" role: it is the system role.
      const messages = chat.messages.map((m) => ({ role: m.role === 'developer' ? 'system' : m.role, content: messageText(m.content) }));
      promptIds = tok.encode(tok.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });
    } else {
      // As `edgelora generate` encodes a plain prompt: with the tokenizer's special tokens (BOS).
      const prompt = text!.prompt;
      promptIds = tok.encode(typeof prompt === 'string' ? prompt : prompt[0]!, { addSpecialTokens: true });
    }
    const maxTokens = b.max_completion_tokens ?? b.max_tokens ?? (kind === 'text' ? 16 : Math.max(1, engine.ctx - promptIds.length));
    const stop = b.stop == null ? [] : typeof b.stop === 'string' ? [b.stop] : b.stop;
    const base: Omit<CompletionRequest, 'signal' | 'onText'> = {
      promptIds,
      adapters,
      maxTokens,
      sampling: { temperature: b.temperature ?? 1, topP: b.top_p ?? 1, topK: b.top_k == null || b.top_k < 0 ? 0 : b.top_k },
      seed: b.seed ?? randomBytes(4).readUInt32LE(0),
      stop,
      ignoreEos: b.ignore_eos ?? false,
    };
    engine.check(base, kind === 'chat' ? 'messages' : 'prompt');
    const meta = { id: id(kind === 'chat' ? 'chatcmpl' : 'cmpl'), created: Math.floor(Date.now() / 1000), model: b.model };
    const usage = (r: CompletionResult) => ({ prompt_tokens: r.promptTokens, completion_tokens: r.tokenIds.length, total_tokens: r.promptTokens + r.tokenIds.length });
    const ac = new AbortController();
    const raw: ServerResponse = reply.raw;
    raw.on('close', () => {
      if (!raw.writableFinished) ac.abort();
    });

    if (!b.stream) {
      const r = await engine.submit({ ...base, signal: ac.signal });
      if (r.finishReason === 'cancelled') {
        if (raw.destroyed) return reply.hijack(); // the client is gone: nothing to send
        throw new ServeError('the server is shutting down; the request was cancelled', 503, 'shutting_down');
      }
      const choice = kind === 'chat'
        ? { index: 0, message: { role: 'assistant', content: r.text }, logprobs: null, finish_reason: r.finishReason }
        : { index: 0, text: r.text, logprobs: null, finish_reason: r.finishReason };
      return { ...meta, object: kind === 'chat' ? 'chat.completion' : 'text_completion', choices: [choice], usage: usage(r) };
    }

    // Server-sent events: the headers go out only after check() passed, so refusals stay JSON errors.
    const includeUsage = b.stream_options?.include_usage === true;
    const object = kind === 'chat' ? 'chat.completion.chunk' : 'text_completion';
    const chunk = (choice: Record<string, unknown> | null, extra: Record<string, unknown> = {}) => ({
      ...meta,
      object,
      choices: choice ? [choice] : [],
      ...(includeUsage ? { usage: null } : {}),
      ...extra,
    });
    const send = (data: unknown) => {
      if (!raw.destroyed) raw.write(`data: ${JSON.stringify(data)}\n\n`);
    };
    const delta = (text: string | null, finish: string | null) =>
      kind === 'chat'
        ? { index: 0, delta: text === null ? {} : { content: text }, logprobs: null, finish_reason: finish }
        : { index: 0, text: text ?? '', logprobs: null, finish_reason: finish };
    streamed.add(req);
    reply.hijack();
    raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
    if (kind === 'chat') send(chunk({ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }));
    let status = 200;
    try {
      const r = await engine.submit({ ...base, signal: ac.signal, onText: (t) => send(chunk(delta(t, null))) });
      if (r.finishReason === 'cancelled') {
        status = raw.destroyed ? 499 : 503;
        send(errorBody(503, 'the server is shutting down; the request was cancelled', 'shutting_down'));
      } else {
        send(chunk(delta(null, r.finishReason)));
        if (includeUsage) send({ ...meta, object, choices: [], usage: usage(r) });
      }
    } catch (err) {
      const e = err instanceof ServeError ? err : new ServeError(`internal error: ${(err as Error).message}`, 500, 'internal_error');
      status = e.status;
      send(serveErrorBody(e));
    }
    if (!raw.destroyed) raw.end('data: [DONE]\n\n');
    metrics.request(req.routeOptions.url ?? 'unmatched', status);
    return reply;
  }

  return app;
}
