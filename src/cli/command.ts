// The shape of a CLI command and the one flag parser every command uses: a thin layer over node's
// parseArgs that suggests the closest flag for a typo, takes negative numbers as values, refuses
// stray positional arguments, and names the flag once (with its allowed range) in every message.
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { promises as fs } from 'node:fs';
import { closest, distance } from 'fastest-levenshtein';
import { EdgeloraError } from '../util/errors.js';
import { checkNumber, type NumberCheck } from '../util/number-check.js';

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

export interface ParseFlagsOptions {
  /**
   * Whether positional arguments are allowed at all (default true). Prefer `positionals`, which
   * also bounds how many.
   */
  allowPositionals?: boolean;
  /**
   * Names of the positional arguments the command takes, in order, as its usage line writes them
   * (e.g. ["hf-dir", "out-dir"]); one more is an "unexpected argument" error. [] takes none.
   * Absent: any number (commands that check their own).
   */
  positionals?: readonly string[];
}

/** A value that looks like a flag but is a number: `--temperature -1`, `--scale -.5`, `-1e-3`. */
const NEGATIVE_NUMBER = /^-(\d|\.\d)/;

const helpHint = (command: string) => `run \`edgelora ${command} --help\` for the flags it takes`;

/** The known flag closest to `name` by edit distance, when it is close enough to be a likely typo. */
export function suggestFlag(name: string, known: readonly string[]): string | undefined {
  if (known.length === 0) return undefined;
  // A prefix of exactly one flag (`--max-new`) is that flag; otherwise the nearest by edits.
  const prefixed = known.filter((k) => k.startsWith(name));
  if (prefixed.length === 1) return prefixed[0];
  const best = closest(name, [...known]);
  return distance(name, best) <= Math.max(2, Math.floor(best.length / 3)) ? best : undefined;
}

/**
 * Parses argv against `options`. Unknown flags are errors that name the closest known flag; a
 * string flag takes the next argument even when it is a negative number; positional arguments
 * beyond `opts.positionals` are errors. `--help`/`-h` is always accepted and reported through
 * `help` (flags are still checked, so a typo next to --help is reported; positionals are not).
 */
export function parseFlags<O extends FlagSpec>(command: string, argv: string[], options: O, opts: ParseFlagsOptions = {}) {
  const spec = { ...options, help: { type: 'boolean', short: 'h' } } as const satisfies FlagSpec;
  const where = `edgelora ${command}`;
  const shorts = new Map(Object.entries(spec).flatMap(([name, o]) => (o.short ? [[o.short, name] as const] : [])));
  // First pass, non-strict: see every token as written, so that each error can be our own.
  const loose = parseArgs({ args: argv, options: spec, strict: false, allowPositionals: true, tokens: true });
  const rebuilt: string[] = [];
  const positionals: string[] = [];
  let help = false;
  for (const t of loose.tokens) {
    if (t.kind === 'option-terminator') continue;
    if (t.kind === 'positional') {
      positionals.push(t.value);
      continue;
    }
    const name = t.rawName.startsWith('--') ? t.name : (shorts.get(t.name) ?? t.name);
    const o = Object.prototype.hasOwnProperty.call(spec, name) ? spec[name as keyof typeof spec] : undefined;
    if (o === undefined) {
      const known = Object.keys(spec).map((k) => `--${k}`);
      const guess = t.rawName.startsWith('--') ? suggestFlag(t.rawName, known) : undefined;
      throw new EdgeloraError(`unknown flag ${t.rawName}`, {
        where,
        hint: guess ? `did you mean ${guess}? (${helpHint(command)})` : helpHint(command),
      });
    }
    if (name === 'help') {
      help = true;
      continue;
    }
    if (o.type === 'boolean') {
      if (t.inlineValue) throw new EdgeloraError(`--${name} takes no value (got "${t.value}")`, { where, hint: `write --${name} alone` });
      rebuilt.push(`--${name}`);
      continue;
    }
    // A string flag: parseArgs (non-strict) took the next argument whatever it was. Refuse a flag
    // as a value (`--model --json`: the value was forgotten), but take negative numbers and "-" (stdin).
    if (t.value === undefined || (!t.inlineValue && t.value.startsWith('-') && t.value !== '-' && !NEGATIVE_NUMBER.test(t.value))) {
      throw new EdgeloraError(`--${name} needs a value${t.value === undefined ? '' : ` (it is followed by the flag ${t.value})`}`, {
        where,
        hint: `write --${name} VALUE or --${name}=VALUE`,
      });
    }
    rebuilt.push(`--${name}=${t.value}`);
  }
  if (!help) {
    const allowed = opts.positionals?.length ?? (opts.allowPositionals === false ? 0 : Infinity);
    if (positionals.length > allowed) {
      const takes = opts.positionals && opts.positionals.length > 0 ? `it takes ${opts.positionals.map((p) => `<${p}>`).join(' ')}` : 'it takes no positional arguments';
      throw new EdgeloraError(`unexpected argument "${positionals[allowed]}"`, {
        where,
        hint: `${takes}; a value belongs after its flag, and a text with spaces in quotes (${helpHint(command)})`,
      });
    }
  }
  // Second pass, strict, on the checked arguments (every value now written --name=value): it gives
  // the typed values, and cannot fail on anything the first pass let through.
  const args = [...rebuilt, '--', ...positionals];
  try {
    const parsed = parseArgs({ args, options: spec, strict: true, allowPositionals: true });
    return { values: parsed.values, positionals: parsed.positionals, help };
  } catch (err) {
    throw new EdgeloraError((err as Error).message, { where, hint: helpHint(command) });
  }
}

export { type NumberCheck, describeRange } from '../util/number-check.js';

/** Parses a numeric flag; the error names the flag once, with the allowed range and what was given. */
export function numberFlag(flag: string, raw: string | undefined, def: number, check: NumberCheck = {}): number {
  if (raw === undefined) return def;
  return checkNumber(flag, raw.trim() === '' ? NaN : Number(raw), check, JSON.stringify(raw));
}

/** One of a fixed set of words; the error lists them and suggests the closest. */
export function choiceFlag<T extends string>(flag: string, raw: string | undefined, choices: readonly T[]): T | undefined {
  if (raw === undefined) return undefined;
  if ((choices as readonly string[]).includes(raw)) return raw as T;
  const guess = choices.length > 0 ? closest(raw, [...choices]) : undefined;
  throw new EdgeloraError(`must be one of ${choices.join(', ')}, not ${JSON.stringify(raw)}`, {
    where: `--${flag}`,
    ...(guess && distance(raw, guess) <= 2 ? { hint: `did you mean --${flag} ${guess}?` } : {}),
  });
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

/**
 * Refuses an existing output path before any work starts (a 7B quantization should not run for
 * an hour to fail at the rename); the error names the flag that replaces it.
 */
export async function checkOutputPath(target: string, opts: { force?: boolean; what?: string; hint?: string } = {}): Promise<void> {
  if (opts.force) return;
  const exists = await fs.lstat(target).then(() => true, () => false);
  if (exists) {
    throw new EdgeloraError(`${opts.what ?? 'the output'} already exists`, {
      where: target,
      hint: opts.hint ?? 'pass --force to replace it, or choose a new path',
    });
  }
}
