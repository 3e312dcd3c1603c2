// The shape of a CLI command and the shared flag parser. Every command file in commands/ exports
// one Command; main.ts dispatches on its name. Commands are thin layers over the library API.
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { EdgeloraError } from '../util/errors.js';

export interface Command {
  /** Words that select the command, e.g. "generate" or "adapter merge". */
  name: string;
  /** One line for the command list. */
  summary: string;
  /** Full --help text (usage line, flags with unit and default). */
  help: string;
  /** Runs the command; returns the process exit code. */
  run(argv: string[]): Promise<number>;
}

export type FlagSpec = NonNullable<ParseArgsConfig['options']>;

/**
 * Parses argv against `options` strictly (unknown flags are errors naming the flag and command).
 * `--help`/`-h` is always accepted and reported through `help`.
 */
export function parseFlags<O extends FlagSpec>(
  command: string,
  argv: string[],
  options: O,
  opts: { allowPositionals?: boolean } = {},
) {
  try {
    const parsed = parseArgs({
      args: argv,
      options: { ...options, help: { type: 'boolean', short: 'h' } },
      allowPositionals: opts.allowPositionals ?? true,
      strict: true,
    });
    return { values: parsed.values, positionals: parsed.positionals, help: (parsed.values as Record<string, unknown>).help === true };
  } catch (err) {
    throw new EdgeloraError((err as Error).message, {
      where: `edgelora ${command}`,
      hint: `run \`edgelora ${command} --help\` for the flags it takes`,
    });
  }
}

/** Parses a numeric flag, naming the flag on error. */
export function numberFlag(
  flag: string,
  raw: string | undefined,
  def: number,
  check: { integer?: boolean; min?: number; max?: number; positive?: boolean } = {},
): number {
  if (raw === undefined) return def;
  const v = Number(raw);
  const bad = (why: string) => new EdgeloraError(`--${flag} ${raw}: ${why}`, { where: `--${flag}` });
  if (!Number.isFinite(v)) throw bad('not a number');
  if (check.integer && !Number.isInteger(v)) throw bad('must be an integer');
  if (check.positive && v <= 0) throw bad('must be greater than 0');
  if (check.min !== undefined && v < check.min) throw bad(`must be at least ${check.min}`);
  if (check.max !== undefined && v > check.max) throw bad(`must be at most ${check.max}`);
  return v;
}

/** Requires a flag, naming it and the command on error. */
export function requireFlag(command: string, flag: string, v: string | undefined): string {
  if (v === undefined || v === '') {
    throw new EdgeloraError(`missing --${flag}`, { where: `edgelora ${command}`, hint: `run \`edgelora ${command} --help\`` });
  }
  return v;
}

export function requirePositional(command: string, name: string, v: string | undefined): string {
  if (v === undefined || v === '') {
    throw new EdgeloraError(`missing <${name}>`, { where: `edgelora ${command}`, hint: `run \`edgelora ${command} --help\`` });
  }
  return v;
}
