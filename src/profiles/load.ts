// Loading device profiles: the shipped ones in device-profiles/, a user's own file, and single-field overrides.
import { readFileSync, readdirSync, existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { EdgeloraError } from '../util/errors.js';
import { validateProfile, type DeviceProfile } from './schema.js';

export interface LoadedProfile {
  profile: DeviceProfile;
  /** The file it came from (shipped profiles too), for error messages and `doctor`. */
  file: string;
}

/**
 * The shipped profiles directory: the nearest `device-profiles/` above this module. That is the repository root
 * when running from src/ (tsx) and the package root when running the bundle from dist/.
 */
export function builtinProfilesDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = path.join(dir, 'device-profiles');
    if (existsSync(candidate) && statSync(candidate).isDirectory()) return candidate;
    const up = path.dirname(dir);
    if (up === dir) {
      throw new EdgeloraError('cannot find the device-profiles/ directory shipped with edgelora', {
        where: fileURLToPath(import.meta.url),
        hint: 'reinstall edgelora, or pass a profile file with --profile ./my-device.json',
      });
    }
    dir = up;
  }
}

/** Reads and validates one profile file; errors name the file and the field. */
export function loadProfileFile(file: string): LoadedProfile {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new EdgeloraError(`cannot read device profile: ${(err as Error).message}`, { where: file, cause: err });
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`device profile is not valid JSON: ${(err as Error).message}`, { where: file, cause: err });
  }
  return { profile: validateProfile(raw, file), file };
}

/** Every shipped profile, sorted by id; a shipped file whose id differs from its name is an error. */
export function loadBuiltinProfiles(dir: string = builtinProfilesDir()): LoadedProfile[] {
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  return files.map((f) => {
    const loaded = loadProfileFile(path.join(dir, f));
    if (`${loaded.profile.id}.json` !== f) {
      throw new EdgeloraError(`field "id": "${loaded.profile.id}" does not match the file name`, {
        where: loaded.file,
        hint: `name the file ${loaded.profile.id}.json or change the id`,
      });
    }
    return loaded;
  });
}

/** True when a --profile value names a file rather than a shipped id. */
export function looksLikeFile(spec: string): boolean {
  return spec.endsWith('.json') || spec.includes('/') || spec.includes(path.sep);
}

/** A shipped profile by id, or a file by path. */
export function findProfile(spec: string, builtins: LoadedProfile[]): LoadedProfile {
  if (looksLikeFile(spec)) return loadProfileFile(path.resolve(spec));
  const hit = builtins.find((b) => b.profile.id === spec);
  if (!hit) {
    throw new EdgeloraError(`unknown device profile "${spec}"`, {
      where: '--profile',
      hint: `use auto, a file (./my-device.json) or one of: ${builtins.map((b) => b.profile.id).join(', ')}`,
    });
  }
  return hit;
}

/** Short names for the overrides people reach for most; any dotted path into the profile works too. */
export const OVERRIDE_ALIASES: Readonly<Record<string, string>> = {
  budget: 'memoryBudgetBytes',
  format: 'defaultFormat',
  context: 'maxContext',
  batchSize: 'finetune.batchSize',
  seqLen: 'finetune.seqLen',
  rank: 'finetune.rank',
  recompute: 'finetune.recompute',
};

/**
 * Parses `--profile-set KEY=VALUE` flags into an overrides object. VALUE is read as JSON when it parses
 * (4e9, true, ["q_proj","v_proj"]), else as a plain string (int4); a comma list without brackets becomes an array.
 */
export function parseProfileSets(sets: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const s of sets) {
    const eq = s.indexOf('=');
    if (eq <= 0) {
      throw new EdgeloraError(`expected KEY=VALUE, not ${JSON.stringify(s)}`, { where: '--profile-set', hint: 'e.g. --profile-set memoryBudgetBytes=4e9' });
    }
    const key = s.slice(0, eq).trim();
    const text = s.slice(eq + 1).trim();
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      value = text.includes(',') ? text.split(',').map((t) => t.trim()).filter((t) => t !== '') : text;
    }
    out[key] = value;
  }
  return out;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Applies overrides (dotted paths such as `memoryBudgetBytes`, `finetune.seqLen`, `executionProviders.0.fp16`, or an
 * alias from OVERRIDE_ALIASES) to a copy of the profile and validates the result; an error names the override.
 * A budget override in bytes replaces a fraction-of-MemTotal budget and vice versa.
 */
export function applyOverrides(profile: DeviceProfile, overrides: Record<string, unknown>, where = '--profile-set'): DeviceProfile {
  const copy = structuredClone(profile) as unknown as Record<string, unknown>;
  for (const [rawKey, value] of Object.entries(overrides)) {
    const key = OVERRIDE_ALIASES[rawKey] ?? rawKey;
    const parts = key.split('.');
    if (parts.some((p) => p === '' || p === '__proto__' || p === 'constructor' || p === 'prototype')) {
      throw new EdgeloraError(`bad override key "${rawKey}"`, { where });
    }
    if (parts[0] === 'id') throw new EdgeloraError('the profile id cannot be overridden', { where: `${where} ${rawKey}` });
    let node: unknown = copy;
    for (const p of parts.slice(0, -1)) {
      const next: unknown = Array.isArray(node) ? node[Number(p)] : isRecord(node) ? node[p] : undefined;
      if (!isRecord(next) && !Array.isArray(next)) {
        throw new EdgeloraError(`override "${rawKey}": the profile has no object at "${p}"`, {
          where: `${where} ${rawKey}`,
          hint: 'see docs/device-profiles.md for the fields a profile has',
        });
      }
      node = next;
    }
    const last = parts[parts.length - 1] as string;
    if (Array.isArray(node)) node[Number(last)] = value;
    else if (isRecord(node)) node[last] = value;
    if (parts.length === 1 && last === 'memoryBudgetBytes') delete copy.memoryBudgetFraction;
    if (parts.length === 1 && last === 'memoryBudgetFraction') delete copy.memoryBudgetBytes;
  }
  const keys = Object.keys(overrides).join(', ');
  return validateProfile(copy, `${where} ${keys} (on profile ${profile.id})`);
}
