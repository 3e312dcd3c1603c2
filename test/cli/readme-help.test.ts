// The README and the commands agree: every registered command (and group) has a README row, every
// flag its --help lists is in that row, every flag the README shows (table and example commands)
// is in the command's --help and is accepted by its parser. Commands added later are checked too.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { commands } from '../../src/cli/commands/index.ts';
import { runCli, groups } from '../../src/cli/run.ts';
import type { Command } from '../../src/cli/command.ts';

const README = readFileSync('README.md', 'utf8');
const FLAG = /--[a-z][a-z0-9-]*/g;

/** The flags a help text lists: at the start of an indented line, or in its usage lines. */
function helpFlags(help: string): Set<string> {
  const out = new Set<string>();
  let inUsage = false;
  for (const line of help.split('\n')) {
    if (line.startsWith('Usage:')) inUsage = true;
    else if (line.trim() === '') inUsage = false;
    if (inUsage) for (const f of line.match(FLAG) ?? []) out.add(f);
    const m = /^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)/.exec(line);
    if (m) out.add(m[1]!);
  }
  out.delete('--help');
  return out;
}

/** The section "## CLI reference" up to the next "## " heading. */
function referenceSection(): string {
  const start = README.indexOf('## CLI reference');
  assert.ok(start >= 0, 'README.md has a "## CLI reference" section');
  const next = README.indexOf('\n## ', start + 3);
  return README.slice(start, next < 0 ? undefined : next);
}

/** Table cells, split on pipes that are not escaped (`\|` inside code spans). */
const cells = (row: string) => row.split(/(?<!\\)\|/).slice(1, -1).map((c) => c.trim());
const firstCode = (cell: string) => /`([^`]+)`/.exec(cell)?.[1] ?? '';

/** The registered command a command line starts with (longest name first), or undefined. */
function commandOf(words: string[]): Command | undefined {
  return [...commands].sort((a, b) => b.name.split(' ').length - a.name.split(' ').length).find((c) => c.name.split(' ').every((w, i) => words[i] === w));
}

/** Shared flag sets from the "flags | for" table: "broker flags" → its flags. */
function sharedFlags(section: string): Map<string, Set<string>> {
  const m = new Map<string, Set<string>>();
  for (const row of section.split('\n').filter((l) => l.startsWith('| `'))) {
    const [first] = cells(row);
    const name = /^`([a-z]+ flags)`:/.exec(first ?? '')?.[1];
    if (name) m.set(name, new Set(first!.match(FLAG) ?? []));
  }
  return m;
}

/** command name → flags its README row shows ([broker flags] and the like expanded). */
function readmeRows(): Map<string, Set<string>> {
  const section = referenceSection();
  const shared = sharedFlags(section);
  const rows = new Map<string, Set<string>>();
  for (const row of section.split('\n').filter((l) => l.startsWith('| `edgelora '))) {
    const code = firstCode(cells(row)[0] ?? '');
    const words = code.split(/\s+/).slice(1);
    const cmd = commandOf(words);
    assert.ok(cmd, `README CLI reference row "${code}" names no registered command`);
    assert.ok(!rows.has(cmd.name), `README CLI reference has two rows for ${cmd.name}`);
    const flags = new Set(code.match(FLAG) ?? []);
    for (const [, group] of code.matchAll(/\[([a-z]+ flags)\]/g)) {
      const set = shared.get(group!);
      assert.ok(set, `README row for ${cmd.name} refers to [${group}], which the shared-flags table does not define`);
      for (const f of set) flags.add(f);
    }
    rows.set(cmd.name, flags);
  }
  return rows;
}

/** Every example command line in the README's sh blocks: `npx edgelora …`, `edgelora …`, `npm start -- …`. */
function exampleLines(): { line: string; cmd: Command | undefined; flags: string[] }[] {
  const out: { line: string; cmd: Command | undefined; flags: string[] }[] = [];
  for (const [, block] of README.matchAll(/```sh\n([\s\S]*?)```/g)) {
    for (const raw of block!.split('\n')) {
      const line = raw.replace(/\s+#.*$/, '').trim();
      const m = /^(?:npx edgelora|edgelora|npm start --)\s+(.*)$/.exec(line) ?? (/^npm start$/.test(line) ? ['', ''] : null);
      if (!m) continue;
      const rest = m[1]!.split(/\s+/).filter(Boolean);
      const words = line.startsWith('npm start') ? ['demo', ...rest] : rest;
      out.push({ line, cmd: commandOf(words), flags: words.filter((w) => /^--[a-z]/.test(w)).map((w) => w.split('=')[0]!) });
    }
  }
  return out;
}

/** Runs a command in process with stdout and stderr held (so that help texts do not reach the test reporter). */
async function quietly<T>(fn: () => Promise<T>): Promise<{ result: T; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const o = process.stdout.write.bind(process.stdout);
  const e = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((chunk: string | Uint8Array) => (out.push(String(chunk)), true)) as typeof process.stdout.write;
  process.stderr.write = ((chunk: string | Uint8Array) => (err.push(String(chunk)), true)) as typeof process.stderr.write;
  try {
    return { result: await fn(), out: out.join(''), err: err.join('') };
  } finally {
    process.stdout.write = o;
    process.stderr.write = e;
  }
}

/** Whether the command's parser takes `flag` (with a value when it wants one); --help stops it before any work. */
async function accepts(cmd: Command, flag: string): Promise<{ ok: boolean; why: string }> {
  const r = await quietly(() => cmd.run([flag, 'x', '--help']).then((code) => ({ code, error: '' }), (e: Error) => ({ code: -1, error: e.message })));
  return { ok: r.result.code === 0, why: r.result.error || r.err };
}

test('every registered command has one row in the README CLI reference', () => {
  const rows = readmeRows();
  const missing = commands.filter((c) => !rows.has(c.name)).map((c) => c.name);
  assert.deepEqual(missing, [], `add a row "| \`edgelora <command> [flags]\` | … |" to README.md's CLI reference for: ${missing.join(', ')}`);
});

test("every flag in a command's --help is in its README row, and every flag of the row is in --help", () => {
  const rows = readmeRows();
  const problems: string[] = [];
  for (const c of commands) {
    const inHelp = helpFlags(c.help);
    const inReadme = rows.get(c.name) ?? new Set<string>();
    for (const f of inHelp) if (!inReadme.has(f)) problems.push(`${c.name}: ${f} is in --help but not in the README row`);
    for (const f of inReadme) if (!inHelp.has(f)) problems.push(`${c.name}: ${f} is in the README row but not in --help`);
  }
  assert.deepEqual(problems, []);
});

test("every flag the README shows is accepted by the command's parser", async () => {
  const rows = readmeRows();
  const problems: string[] = [];
  for (const c of commands) {
    for (const f of rows.get(c.name) ?? []) {
      const r = await accepts(c, f);
      if (!r.ok) problems.push(`${c.name} ${f}: ${r.why}`);
    }
  }
  // The flag that is not there is refused, so the check above can fail.
  const probe = await accepts(commands[0]!, '--no-such-flag-anywhere');
  assert.equal(probe.ok, false);
  assert.match(probe.why, /unknown flag --no-such-flag-anywhere/);
  assert.deepEqual(problems, []);
});

test("every example command line in the README names a command, and its flags are in that command's --help and accepted", async () => {
  const lines = exampleLines();
  assert.ok(lines.length >= 10, `found only ${lines.length} example lines`);
  const problems: string[] = [];
  for (const { line, cmd, flags } of lines) {
    if (!cmd) {
      problems.push(`"${line}": no such command`);
      continue;
    }
    const inHelp = helpFlags(cmd.help);
    for (const f of flags) {
      if (!inHelp.has(f)) problems.push(`"${line}": ${f} is not in \`edgelora ${cmd.name} --help\``);
      else if (!(await accepts(cmd, f)).ok) problems.push(`"${line}": ${f} is not accepted`);
    }
  }
  assert.deepEqual(problems, []);
});

test('every group answers --help with its subcommands (exit 0), and `edgelora help <command>` prints the help', async () => {
  const gs = groups(commands);
  assert.ok(gs.includes('adapter') && gs.includes('fleet'), `groups: ${gs.join(', ')}`);
  for (const g of gs) {
    const out: string[] = [];
    const code = await runCli([g, '--help'], { out: (t) => out.push(t), err: (t) => out.push(t) });
    assert.equal(code, 0, `edgelora ${g} --help exited ${code}`);
    for (const c of commands.filter((c) => c.name.startsWith(`${g} `))) assert.ok(out.join('').includes(c.name), `edgelora ${g} --help lists ${c.name}`);
    // A bare group lists them too, but on stderr with exit 1: no subcommand was run.
    const err: string[] = [];
    assert.equal(await runCli([g], { out: () => assert.fail('stdout'), err: (t) => err.push(t) }), 1);
    assert.match(err.join(''), /Subcommands:/);
  }
  for (const c of commands) {
    const out: string[] = [];
    assert.equal(await runCli(['help', ...c.name.split(' ')], { out: (t) => out.push(t), err: (t) => out.push(t) }), 0);
    assert.equal(out.join(''), `${c.help}\n`);
  }
});
