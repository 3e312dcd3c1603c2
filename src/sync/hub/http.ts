// The hub's HTTP shell (`edgelora hub --http`): a JSON API over the hub and its rollouts, a live
// event stream (server-sent events), and the dashboard's static files. Routes validate with zod
// and call the library (Hub, Rollouts); bind and token rules are serve's (util/http-auth.ts).
import Fastify, { type FastifyInstance } from 'fastify';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import { bearerToken, checkBind, keyMatches } from '../../util/http-auth.js';
import { NAME_RE } from '../protocol/topics.js';
import type { Status } from '../protocol/messages.js';
import type { Hub } from './hub.js';
import type { Rollouts } from './rollout.js';
import { RolloutSpecSchema, countDevices, type RolloutState } from './rollout-state.js';

export interface HubHttpOptions {
  hub: Hub;
  rollouts: Rollouts;
  /** Default 127.0.0.1; any other address requires tokens. */
  host?: string;
  /** 0 picks a free port. */
  port: number;
  /** Accepted Bearer tokens; empty: no authentication (loopback only). */
  tokens?: readonly string[];
  /** Largest adapter upload (POST /api/adapters), bytes; default 1 GiB. */
  maxUploadBytes?: number;
  /** Directory of the dashboard's static files; default: ./dashboard next to this module (dist/dashboard in the bundle). */
  dashboardDir?: string;
}

export interface HubHttp {
  readonly url: string;
  readonly app: FastifyInstance;
  close(): Promise<void>;
}

const STATIC: Readonly<Record<string, string>> = {
  '/': 'index.html',
  '/index.html': 'index.html',
  '/app.js': 'app.js',
  '/style.css': 'style.css',
};
const MIME: Readonly<Record<string, string>> = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };

const idParam = z.strictObject({ id: z.string().regex(NAME_RE, 'expected a rollout id such as r1') });
const uploadQuery = z.strictObject({ name: z.string().regex(NAME_RE, 'expected an adapter name: 1-64 characters A-Z a-z 0-9 . _ -') });

/** A rollout as the API shows it: the state plus counts per stage and overall. */
export function rolloutView(st: RolloutState) {
  return { ...st, counts: countDevices(st), stageCounts: st.plan.map((_, i) => countDevices(st, i)) };
}

/** The fleet as the dashboard and `fleet status` read it: the devices' retained statuses. */
function devicesView(hub: Hub): Status[] {
  return [...hub.devices.values()].sort((a, b) => (a.deviceId < b.deviceId ? -1 : 1));
}

/** HTTP status for a library error: unknown ids are 404, conflicts with the current state 409, the rest 400. */
function statusFor(err: EdgeloraError): number {
  if (/^no (rollout|stored adapter) /.test(err.message)) return 404;
  if (/ is (still )?(running|paused|succeeded|aborted)/.test(err.message)) return 409;
  return 400;
}

function zodMessage(where: string, e: z.ZodError): EdgeloraError {
  const i = e.issues[0];
  return new EdgeloraError(`${i?.path.join('.') || '(root)'}: ${i?.message ?? 'invalid'}`, { where });
}

export async function startHubHttp(o: HubHttpOptions): Promise<HubHttp> {
  const host = o.host ?? '127.0.0.1';
  const tokens = o.tokens ?? [];
  checkBind(host, tokens, { host: '--http', keyFile: '--http-token-file' });
  const dashboardDir = o.dashboardDir ?? fileURLToPath(new URL('./dashboard/', import.meta.url));
  const { hub, rollouts } = o;
  const app = Fastify({ logger: false, return503OnClosing: true });
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer', bodyLimit: o.maxUploadBytes ?? 2 ** 30 }, (_req, body, done) => done(null, body));

  // The static page holds no data: it is served to anyone who may connect; every /api route needs the token.
  app.addHook('onRequest', async (req, reply) => {
    if (tokens.length === 0 || !req.url.startsWith('/api/')) return;
    const t = bearerToken(req.headers.authorization);
    if (t === null || !keyMatches(t, tokens)) return reply.code(401).send({ error: { message: t === null ? 'missing token: send "Authorization: Bearer <token>"' : 'incorrect token' } });
  });
  app.setErrorHandler((err: unknown, _req, reply) => {
    if (err instanceof EdgeloraError) return reply.code(statusFor(err)).send({ error: { message: err.message, where: err.where ?? null, hint: err.hint ?? null } });
    const e = err as { statusCode?: number; message?: string };
    const status = e.statusCode ?? 500;
    return reply.code(status).send({ error: { message: status >= 500 ? `internal error: ${e.message ?? String(err)}` : (e.message ?? 'bad request') } });
  });

  for (const [route, file] of Object.entries(STATIC)) {
    app.get(route, async (_req, reply) => {
      const body = await fs.readFile(path.join(dashboardDir, file));
      return reply.type(MIME[path.extname(file)] ?? 'application/octet-stream').header('cache-control', 'no-cache').send(body);
    });
  }

  app.get('/api/devices', async () => ({ devices: devicesView(hub) }));
  app.get('/api/adapters', async () => {
    const store = hub.hubStore;
    return {
      adapters: store.listBlobs().map((b) => ({ sha256: b.sha256, name: b.name, size: b.size, source: b.source, storedAt: b.storedAt, versions: store.versionsOf(b.sha256) })),
      targets: store.targets().map((m) => ({ target: m.target, adapter: m.adapter, sha256: m.blob.sha256, seq: m.seq, createdAt: m.createdAt })),
    };
  });
  app.post('/api/adapters', async (req, reply) => {
    const q = uploadQuery.safeParse(req.query);
    if (!q.success) throw zodMessage('POST /api/adapters ?name', q.error);
    if (!Buffer.isBuffer(req.body)) throw new EdgeloraError('the body must be an adapter pack (application/octet-stream)', { where: 'POST /api/adapters' });
    const entry = await hub.hubStore.putBlob(req.body, { name: q.data.name, source: 'http' });
    return reply.code(201).send({ sha256: entry.sha256, name: entry.name, size: entry.size });
  });
  app.get('/api/rollouts', async () => ({ rollouts: rollouts.list().map(rolloutView) }));
  app.get('/api/rollouts/:id', async (req) => {
    const p = idParam.safeParse(req.params);
    if (!p.success) throw zodMessage('rollout id', p.error);
    return rolloutView(rollouts.get(p.data.id));
  });
  app.post('/api/rollouts', async (req, reply) => {
    const b = RolloutSpecSchema.safeParse(req.body);
    if (!b.success) throw zodMessage('POST /api/rollouts', b.error);
    return reply.code(201).send(rolloutView(await rollouts.start(b.data)));
  });
  for (const action of ['pause', 'resume', 'abort'] as const) {
    app.post(`/api/rollouts/:id/${action}`, async (req) => {
      const p = idParam.safeParse(req.params);
      if (!p.success) throw zodMessage('rollout id', p.error);
      return rolloutView(await rollouts[action](p.data.id));
    });
  }

  // Server-sent events: "device" (a status) and "rollout" (a rollout's new state), after one "hello" with both lists.
  const streams = new Set<(event: string, data: unknown) => void>();
  const onStatus = (s: Status) => streams.forEach((w) => w('device', s));
  const onRollout = (st: RolloutState) => streams.forEach((w) => w('rollout', rolloutView(st)));
  hub.on('status', onStatus);
  rollouts.on('change', onRollout);
  app.get('/api/events', (req, reply) => {
    reply.hijack();
    const raw = reply.raw;
    raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
    const write = (event: string, data: unknown) => {
      if (!raw.destroyed) raw.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    };
    write('hello', { devices: devicesView(hub), rollouts: rollouts.list().map(rolloutView) });
    const ping = setInterval(() => !raw.destroyed && raw.write(': ping\n\n'), 15_000);
    streams.add(write);
    req.raw.on('close', () => {
      clearInterval(ping);
      streams.delete(write);
    });
  });

  await app.listen({ host, port: o.port });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : o.port;
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    app,
    async close() {
      hub.off('status', onStatus);
      rollouts.off('change', onRollout);
      await app.close();
    },
  };
}
