// One error type for everything a user can cause: it says what went wrong, where, and what to do.
export class EdgeloraError extends Error {
  /** Where the problem is: a file, tensor, flag, topic or line. */
  readonly where: string | undefined;
  /** What the user can do about it. */
  readonly hint: string | undefined;
  constructor(message: string, opts: { where?: string; hint?: string; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'EdgeloraError';
    this.where = opts.where;
    this.hint = opts.hint;
  }
  /** The full text a CLI prints: "where: message (hint)". */
  describe(): string {
    const head = this.where ? `${this.where}: ${this.message}` : this.message;
    return this.hint ? `${head}\n  hint: ${this.hint}` : head;
  }
}

export function describeError(err: unknown): string {
  if (err instanceof EdgeloraError) return err.describe();
  if (err instanceof Error) return err.message;
  return String(err);
}
