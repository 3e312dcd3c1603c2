// The HTTP routes of fine-tuning (OpenAI's /v1/files and /v1/fine_tuning/jobs shapes): validate the
// body with zod and call FineTuningJobs (src/serve/jobs.ts); no logic of their own. Files come as
// multipart/form-data (what the official clients send: fields "file" and "purpose") or as JSON
// {purpose, filename?, content} with the JSONL text in `content`.
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { CreateJobBody, type FineTuningJobs } from './jobs.js';
import { parseBody } from './http.js';
import { ServeError } from './engine.js';

const JsonFileBody = z.strictObject({ purpose: z.string(), filename: z.string().min(1).max(255).optional(), content: z.string() });
const ListQuery = z.looseObject({ limit: z.coerce.number().int().min(1).max(10_000).optional() });

async function fileFromRequest(req: FastifyRequest): Promise<{ filename: string; purpose: string; text: string }> {
  if (Buffer.isBuffer(req.body)) {
    const form = await new Response(req.body, { headers: { 'content-type': String(req.headers['content-type']) } }).formData().catch((err: unknown) => {
      throw new ServeError(`the multipart body does not parse: ${(err as Error).message}`, 400, 'invalid_multipart');
    });
    const file = form.get('file');
    const purpose = form.get('purpose');
    if (file === null || typeof file === 'string') throw new ServeError('the multipart body has no "file" part', 400, 'missing_file', 'file');
    if (typeof purpose !== 'string') throw new ServeError('the multipart body has no "purpose" field', 400, 'missing_purpose', 'purpose');
    return { filename: file.name || 'upload.jsonl', purpose, text: await file.text() };
  }
  const b = parseBody(JsonFileBody, req.body);
  return { filename: b.filename ?? 'upload.jsonl', purpose: b.purpose, text: b.content };
}

export function registerJobRoutes(app: FastifyInstance, jobs: () => FineTuningJobs): void {
  app.addContentTypeParser('multipart/form-data', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));

  app.post('/v1/files', async (req) => {
    const j = jobs();
    const f = await fileFromRequest(req);
    return j.addFile(f.filename, f.purpose, f.text);
  });
  app.get('/v1/files', async () => ({ object: 'list', data: jobs().listFiles(), has_more: false }));
  app.get<{ Params: { id: string } }>('/v1/files/:id', async (req) => jobs().getFile(req.params.id));

  app.post('/v1/fine_tuning/jobs', async (req) => {
    const j = jobs();
    return j.create(parseBody(CreateJobBody, req.body ?? {}));
  });
  app.get('/v1/fine_tuning/jobs', async (req) => {
    const q = parseBody(ListQuery, req.query);
    const all = jobs().list();
    const data = all.slice(0, q.limit ?? 20);
    return { object: 'list', data, has_more: data.length < all.length };
  });
  app.get<{ Params: { id: string } }>('/v1/fine_tuning/jobs/:id', async (req) => jobs().get(req.params.id));
  app.get<{ Params: { id: string } }>('/v1/fine_tuning/jobs/:id/events', async (req) => {
    const q = parseBody(ListQuery, req.query);
    const all = await jobs().events(req.params.id);
    const data = all.slice(0, q.limit ?? 100);
    return { object: 'list', data, has_more: data.length < all.length };
  });
  app.post<{ Params: { id: string } }>('/v1/fine_tuning/jobs/:id/cancel', async (req) => jobs().cancel(req.params.id));
}
