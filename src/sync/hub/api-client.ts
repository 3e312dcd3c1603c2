// A client of the hub's HTTP API (src/sync/hub/http.ts), used by `edgelora rollout`: Bearer token,
// JSON in and out, the server's { error: { message, where, hint } } turned back into an EdgeloraError.
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';

const ErrorBody = z.looseObject({ error: z.looseObject({ message: z.string(), where: z.string().nullable().optional(), hint: z.string().nullable().optional() }) });

export class HubApi {
  constructor(
    readonly baseUrl: string,
    private readonly token: string | null = null,
  ) {}

  async request(method: 'GET' | 'POST', route: string, body?: { json: unknown } | { bytes: Uint8Array }): Promise<unknown> {
    const headers: Record<string, string> = this.token ? { authorization: `Bearer ${this.token}` } : {};
    let payload: string | Uint8Array | undefined;
    if (body && 'json' in body) {
      headers['content-type'] = 'application/json';
      payload = JSON.stringify(body.json);
    } else if (body) {
      headers['content-type'] = 'application/octet-stream';
      payload = body.bytes;
    }
    const url = new URL(route, this.baseUrl);
    let res: Response;
    try {
      res = await fetch(url, { method, headers, ...(payload !== undefined ? { body: payload } : {}) });
    } catch (err) {
      throw new EdgeloraError(`cannot reach the hub's HTTP API: ${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}`, { where: url.origin, hint: 'start the hub with --http HOST:PORT and give that address as --hub http://HOST:PORT' });
    }
    const text = await res.text();
    let data: unknown = null;
    try {
      data = text === '' ? null : JSON.parse(text);
    } catch {
      data = null;
    }
    if (!res.ok) {
      const e = ErrorBody.safeParse(data);
      throw new EdgeloraError(e.success ? e.data.error.message : `HTTP ${res.status} from ${method} ${route}`, {
        where: e.success && e.data.error.where ? e.data.error.where : `${method} ${url.pathname}`,
        ...(e.success && e.data.error.hint ? { hint: e.data.error.hint } : res.status === 401 ? { hint: 'give the hub\'s token with --token-file' } : {}),
      });
    }
    return data;
  }
}
