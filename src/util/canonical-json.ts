// The project's one canonical JSON (RFC 8785 / JCS): object keys sorted by UTF-16 code units, no
// whitespace, ECMAScript number and string serialization, undefined members left out. Signatures
// (sync protocol) and fingerprints (models, training runs) hash these bytes, so the same value
// always gives the same bytes; a value JSON cannot carry (NaN, Infinity, a function) throws
// instead of silently turning into "null".

/** Canonical JSON (JCS) of a JSON value; throws on values JSON cannot carry. */
export function canonicalJson(v: unknown): string {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new Error(`canonicalJson: non-finite number ${v}`);
    return JSON.stringify(v);
  }
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>)
      .filter(([, x]) => x !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, x]) => `${JSON.stringify(k)}:${canonicalJson(x)}`).join(',')}}`;
  }
  throw new Error(`canonicalJson: cannot encode ${typeof v}`);
}
