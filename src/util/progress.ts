// Progress reporting for long jobs: a redrawn bar on a terminal, plain periodic lines otherwise,
// nothing when silenced (e.g. --json, where stdout belongs to the final JSON object).
export interface ProgressOptions {
  /** Total number of units (steps, bytes, chunks). */
  total: number;
  /** Short label printed before the bar. */
  label: string;
  /** Stream to draw on (default process.stderr). */
  stream?: NodeJS.WriteStream;
  /** Draw nothing at all. */
  silent?: boolean;
  /** Minimum milliseconds between plain (non-TTY) lines; default 2000. */
  plainIntervalMs?: number;
  /** Clock (ms), injected for tests; default Date.now. */
  now?: () => number;
  /** When the work began, on the `now` clock (default: when the Progress is made). */
  startedAt?: number;
  /** Units already done before `startedAt` (a resumed run): the rate counts only the units done since. */
  from?: number;
}

export class Progress {
  private readonly start: number;
  private lastPlain = -Infinity;
  private readonly stream: NodeJS.WriteStream;
  private readonly tty: boolean;
  private readonly now: () => number;
  constructor(private readonly opts: ProgressOptions) {
    this.now = opts.now ?? Date.now;
    this.start = opts.startedAt ?? this.now();
    this.stream = opts.stream ?? process.stderr;
    this.tty = Boolean(this.stream.isTTY);
  }
  /** Reports `done` units finished, with extra "key value" fields (e.g. loss, tok/s). */
  update(done: number, fields: Record<string, string | number> = {}): void {
    if (this.opts.silent) return;
    const elapsed = (this.now() - this.start) / 1000;
    const frac = this.opts.total > 0 ? Math.min(1, done / this.opts.total) : 1;
    const doneHere = done - (this.opts.from ?? 0);
    const eta = doneHere > 0 && elapsed > 0 ? (elapsed / doneHere) * Math.max(0, this.opts.total - done) : NaN;
    const extra = Object.entries(fields)
      .map(([k, v]) => `${k} ${typeof v === 'number' ? fmt(v) : v}`)
      .join('  ');
    const counts = `${done}/${this.opts.total}`;
    const timing = `${elapsed.toFixed(1)}s` + (Number.isFinite(eta) && frac < 1 ? ` eta ${eta.toFixed(1)}s` : '');
    if (this.tty) {
      const width = 24;
      const filled = Math.round(frac * width);
      const bar = '█'.repeat(filled) + '░'.repeat(width - filled);
      this.stream.write(`\r\x1b[2K${this.opts.label} ${bar} ${counts}  ${extra}  ${timing}`);
      if (done >= this.opts.total) this.stream.write('\n');
    } else {
      const t = this.now();
      if (done >= this.opts.total || t - this.lastPlain >= (this.opts.plainIntervalMs ?? 2000)) {
        this.lastPlain = t;
        this.stream.write(`${this.opts.label} ${counts}  ${extra}  ${timing}\n`);
      }
    }
  }
}

function fmt(v: number): string {
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(1) : a >= 1 ? v.toFixed(3) : v.toPrecision(4);
}
