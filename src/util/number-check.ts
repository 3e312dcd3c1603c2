// The one numeric range rule: what a number-valued option may be, in words, and the check that throws
// naming the option. CLI flags (src/cli/command.ts `numberFlag`) and library options validated by their
// own modules (e.g. src/train/plan.ts) use it, so a flag and the option it sets cannot drift apart.
import { EdgeloraError } from './errors.js';

export interface NumberCheck {
  integer?: boolean;
  min?: number;
  max?: number;
  /** Greater than 0 (an open lower bound). */
  positive?: boolean;
  /** Less than this (an open upper bound), e.g. a probability below 1. */
  below?: number;
}

/** The allowed range of a numeric flag in words: "an integer ≥ 16", "a number > 0 and ≤ 1". */
export function describeRange(check: NumberCheck): string {
  const kind = check.integer ? 'an integer' : 'a number';
  const bounds: string[] = [];
  if (check.positive && !(check.min !== undefined && check.min > 0)) bounds.push('> 0');
  if (check.min !== undefined && check.max !== undefined && !check.positive && check.below === undefined) return `${kind} from ${check.min} to ${check.max}`;
  if (check.min !== undefined) bounds.push(`≥ ${check.min}`);
  if (check.max !== undefined) bounds.push(`≤ ${check.max}`);
  if (check.below !== undefined) bounds.push(`< ${check.below}`);
  return bounds.length > 0 ? `${kind} ${bounds.join(' and ')}` : kind;
}

/** Whether `v` is a finite number that satisfies `check`. */
export function inRange(v: number, check: NumberCheck): boolean {
  return (
    Number.isFinite(v) &&
    !(check.integer && !Number.isInteger(v)) &&
    !(check.positive && v <= 0) &&
    !(check.min !== undefined && v < check.min) &&
    !(check.max !== undefined && v > check.max) &&
    !(check.below !== undefined && v >= check.below)
  );
}

/**
 * `v` when it satisfies `check`; otherwise an EdgeloraError at `--flag` with the allowed range and what was
 * given (`shown`, default the number itself; the CLI passes the raw text).
 */
export function checkNumber(flag: string, v: number, check: NumberCheck, shown: string = String(v)): number {
  if (!inRange(v, check)) throw new EdgeloraError(`must be ${describeRange(check)}, not ${shown}`, { where: `--${flag}` });
  return v;
}
