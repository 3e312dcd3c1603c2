// Device detection: reads the device-tree model, the L4T release, /proc/meminfo, the CPU count and the arch, all
// under an injectable root directory (tests fake an Orin Nano or a Raspberry Pi with a temp dir), and picks a profile.
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { DeviceProfile } from './schema.js';

export interface DeviceFacts {
  /** The root the files were read under ("/" on a real device). */
  root: string;
  /** /proc/device-tree/model without its trailing NUL, or null when absent (x86 hosts). */
  model: string | null;
  /** First line of /etc/nv_tegra_release, or null when not a Jetson (or not L4T). */
  tegraRelease: string | null;
  /** L4T major release ("R36" → 36) and revision ("REVISION: 4.3" → "4.3"). */
  l4t: { major: number; revision: string | null } | null;
  /** MemTotal / MemAvailable from /proc/meminfo in bytes, null when unreadable. */
  memTotalBytes: number | null;
  memAvailableBytes: number | null;
  /** Logical CPUs (os.availableParallelism() unless injected). */
  cpus: number;
  /** Node's process.arch unless injected: "arm64", "x64", … */
  arch: string;
}

export interface DetectOptions {
  /** Directory standing in for "/"; default "/". */
  root?: string;
  cpus?: number;
  arch?: string;
}

function readText(file: string): string | null {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return null;
  }
}

/** Parses a /proc/meminfo field ("MemTotal:  7620000 kB") into bytes. */
export function meminfoBytes(text: string, field: string): number | null {
  const m = new RegExp(`^${field}:\\s+(\\d+)\\s*(kB)?\\s*$`, 'm').exec(text);
  if (!m || m[1] === undefined) return null;
  return Number(m[1]) * (m[2] ? 1024 : 1);
}

/** Parses "# R36 (release), REVISION: 4.3, GCID: …" into { major: 36, revision: "4.3" }. */
export function parseTegraRelease(line: string): { major: number; revision: string | null } | null {
  const m = /R(\d+)\s*\(release\)(?:,\s*REVISION:\s*([0-9.]+))?/.exec(line);
  if (!m || m[1] === undefined) return null;
  return { major: Number(m[1]), revision: m[2] ?? null };
}

export function readDeviceFacts(opts: DetectOptions = {}): DeviceFacts {
  const root = path.resolve(opts.root ?? '/');
  const model = readText(path.join(root, 'proc/device-tree/model'));
  const tegra = readText(path.join(root, 'etc/nv_tegra_release'));
  const meminfo = readText(path.join(root, 'proc/meminfo'));
  const tegraLine = tegra === null ? null : (tegra.split('\n').find((l) => l.trim() !== '') ?? '').trim();
  return {
    root,
    model: model === null ? null : model.replace(/\0/g, '').trim(),
    tegraRelease: tegraLine,
    l4t: tegraLine === null ? null : parseTegraRelease(tegraLine),
    memTotalBytes: meminfo === null ? null : meminfoBytes(meminfo, 'MemTotal'),
    memAvailableBytes: meminfo === null ? null : meminfoBytes(meminfo, 'MemAvailable'),
    cpus: opts.cpus ?? os.availableParallelism(),
    arch: opts.arch ?? process.arch,
  };
}

export interface RuleCheck {
  /** How many rules the profile states (its specificity). */
  rules: number;
  /** One line per rule: what held or what did not. */
  reasons: string[];
  /** The lines of `reasons` for rules that did not hold. */
  failed: string[];
  /** Names of the rules that held ("model", "arch", "tegra", "l4tMajor", "memTotalBytes"). */
  held: string[];
  matched: boolean;
}

function gb(bytes: number): string {
  return `${(bytes / 1e9).toFixed(1)} GB`;
}

/** Checks one profile's match rules against the facts, saying why for each rule. */
export function checkRules(profile: DeviceProfile, facts: DeviceFacts): RuleCheck {
  const m = profile.match;
  const reasons: string[] = [];
  const failed: string[] = [];
  const held: string[] = [];
  let rules = 0;
  const note = (rule: string, holds: boolean, yes: string, no: string) => {
    rules++;
    reasons.push(holds ? yes : no);
    if (holds) held.push(rule);
    else failed.push(no);
  };
  const l4tName = facts.l4t ? `L4T R${facts.l4t.major}${facts.l4t.revision ? `.${facts.l4t.revision}` : ''}` : `L4T (${facts.tegraRelease})`;
  if (m.model) {
    const model = facts.model?.toLowerCase() ?? null;
    const hit = model === null ? undefined : m.model.find((s) => model.includes(s.toLowerCase()));
    note(
      'model',
      hit !== undefined,
      `device-tree model "${facts.model}" contains "${hit}"`,
      facts.model === null ? 'no /proc/device-tree/model' : `device-tree model "${facts.model}" contains none of ${m.model.map((s) => `"${s}"`).join(', ')}`,
    );
  }
  if (m.arch) note('arch', m.arch.includes(facts.arch), `arch ${facts.arch}`, `arch ${facts.arch} is not ${m.arch.join('/')}`);
  if (m.tegra !== undefined) {
    const present = facts.tegraRelease !== null;
    note('tegra', present === m.tegra, present ? l4tName : 'no /etc/nv_tegra_release (not L4T)', present ? `${l4tName} present but the profile is for non-Jetson hosts` : 'no /etc/nv_tegra_release');
  }
  if (m.l4tMajor) {
    const major = facts.l4t?.major;
    note('l4tMajor', major !== undefined && m.l4tMajor.includes(major), `L4T R${major}`, major === undefined ? 'L4T release unknown' : `L4T R${major} is not R${m.l4tMajor.join('/R')}`);
  }
  if (m.memTotalBytes) {
    const t = facts.memTotalBytes;
    const { min, max } = m.memTotalBytes;
    const inRange = t !== null && (min === undefined || t >= min) && (max === undefined || t <= max);
    const range = `${min === undefined ? '' : gb(min)}–${max === undefined ? '' : gb(max)}`;
    note('memTotalBytes', inRange, `MemTotal ${t === null ? '?' : gb(t)} within ${range}`, t === null ? 'MemTotal unknown' : `MemTotal ${gb(t)} outside ${range}`);
  }
  return { rules, reasons, failed, held, matched: failed.length === 0 && rules > 0 };
}

export interface ProfileChoice<P extends { profile: DeviceProfile }> {
  chosen: P;
  /** Why it was chosen (its rule reasons), plus a note when nothing specific matched. */
  why: string[];
  /** Every candidate with its verdict, for `doctor`. */
  candidates: { id: string; matched: boolean; rules: number; reasons: string[]; failed: string[]; held: string[] }[];
}

/**
 * Picks the matching profile that states the most rules (a Jetson profile with model + memory rules beats a
 * generic arch-only one). Returns null when nothing matches.
 */
export function chooseProfile<P extends { profile: DeviceProfile }>(facts: DeviceFacts, profiles: readonly P[]): ProfileChoice<P> | null {
  const candidates = profiles.map((p) => ({ p, check: checkRules(p.profile, facts) }));
  const matched = candidates.filter((c) => c.check.matched).sort((a, b) => b.check.rules - a.check.rules);
  const best = matched[0];
  const list = candidates.map((c) => ({ id: c.p.profile.id, ...c.check }));
  if (!best) return null;
  return { chosen: best.p, why: best.check.reasons, candidates: list };
}
