// The CLI dispatcher: finds the command (one or two words), lists a group's subcommands for
// `edgelora <group> [--help]`, suggests the closest command for a typo, and prints errors once as
// "edgelora <command>: error: <what>" with the hint below. main.ts calls it; tests call it in process.
import { closest, distance } from 'fastest-levenshtein';
import type { Command } from './command.js';
import { commands as registered } from './commands/index.js';
import { EdgeloraError, describeError } from '../util/errors.js';

export const VERSION = '0.1.0';

/** Command groups: the first word of every two-word command ("adapter", "fleet"). */
export function groups(commands: readonly Command[] = registered): string[] {
  return [...new Set(commands.filter((c) => c.name.includes(' ')).map((c) => c.name.split(' ')[0]!))];
}

function table(cmds: readonly Command[]): string[] {
  const width = Math.max(...cmds.map((c) => c.name.length), 8);
  return cmds.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
}

export function usage(commands: readonly Command[] = registered): string {
  return [
    'edgelora — 4-bit LLMs, LoRA adapters, on-device fine-tuning and MQTT fleet sync',
    '',
    'Usage: edgelora <command> [flags]   (edgelora <command> --help for its flags)',
    '',
    'Commands:',
    ...table(commands),
    '',
    'Flags:',
    '  -h, --help   this text (`edgelora help <command>` for a command)',
    '  --version    the version',
  ].join('\n');
}

export function groupUsage(group: string, commands: readonly Command[] = registered): string {
  const subs = commands.filter((c) => c.name.startsWith(`${group} `));
  return [
    `Usage: edgelora ${group} <subcommand> [flags]   (edgelora ${group} <subcommand> --help for its flags)`,
    '',
    'Subcommands:',
    ...table(subs),
    '',
    'Flags:',
    '  -h, --help   this text',
  ].join('\n');
}

/** The registered command `argv` starts with, longest name first ("adapter merge" before "adapter"). */
function find(argv: readonly string[], commands: readonly Command[]): Command | undefined {
  const sorted = [...commands].sort((a, b) => b.name.split(' ').length - a.name.split(' ').length);
  return sorted.find((c) => c.name.split(' ').every((w, i) => argv[i] === w));
}

function suggestCommand(words: string, names: readonly string[]): string | undefined {
  if (names.length === 0) return undefined;
  const best = closest(words, [...names]);
  return distance(words, best) <= Math.max(2, Math.floor(best.length / 3)) ? best : undefined;
}

/** "edgelora generate: error: --top-p: must be …" (the command named once, where it is the place). */
export function formatError(err: unknown, command: string | undefined): string {
  const prefix = command ? `edgelora ${command}: error: ` : 'edgelora: error: ';
  if (err instanceof EdgeloraError) {
    const self = err.where === undefined || err.where === 'edgelora' || err.where === `edgelora ${command}` || err.where === command;
    const head = self ? err.message : `${err.where}: ${err.message}`;
    return `${prefix}${head}${err.hint ? `\n  hint: ${err.hint}` : ''}`;
  }
  return `${prefix}${describeError(err)}`;
}

export interface CliIo {
  out(text: string): void;
  err(text: string): void;
}

const processIo: CliIo = { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t) };

/** Runs one CLI invocation; returns the exit code (0 ok, 1 failed, 2 usage error: no such command). */
export async function runCli(argv: string[], io: CliIo = processIo, commands: readonly Command[] = registered): Promise<number> {
  const first = argv[0];
  if (first === undefined || first === '--help' || first === '-h') {
    (first === undefined ? io.err : io.out)(usage(commands) + '\n');
    return first === undefined ? 1 : 0;
  }
  if (first === '--version' || first === '-V') {
    io.out(`edgelora ${VERSION}\n`);
    return 0;
  }
  // `edgelora help [<command>]`, as git and npm take it.
  if (first === 'help') {
    const rest = argv.slice(1);
    if (rest.length === 0) {
      io.out(usage(commands) + '\n');
      return 0;
    }
    const cmd = find(rest, commands);
    if (cmd && cmd.name.split(' ').length === rest.length) {
      io.out(cmd.help + '\n');
      return 0;
    }
    if (rest.length === 1 && groups(commands).includes(rest[0]!)) {
      io.out(groupUsage(rest[0]!, commands) + '\n');
      return 0;
    }
    return unknown(rest, io, commands);
  }
  const cmd = find(argv, commands);
  if (cmd === undefined) {
    if (groups(commands).includes(first)) {
      const next = argv[1];
      if (next === undefined || next === '--help' || next === '-h') {
        (next === undefined ? io.err : io.out)(groupUsage(first, commands) + '\n');
        return next === undefined ? 1 : 0;
      }
    }
    return unknown(argv, io, commands);
  }
  try {
    return await cmd.run(argv.slice(cmd.name.split(' ').length));
  } catch (err) {
    io.err(formatError(err, cmd.name) + '\n');
    if (process.env.EDGELORA_DEBUG && err instanceof Error) io.err(`${err.stack}\n`);
    return 1;
  }
}

function unknown(argv: readonly string[], io: CliIo, commands: readonly Command[]): number {
  const inGroup = argv[0] !== undefined && groups(commands).includes(argv[0]);
  const words = argv.slice(0, inGroup ? 2 : 1).join(' ');
  const names = inGroup ? commands.filter((c) => c.name.startsWith(`${argv[0]} `)).map((c) => c.name) : [...commands.map((c) => c.name.split(' ')[0]!), 'help'];
  const guess = suggestCommand(words, [...new Set(names)]);
  const list = inGroup ? `edgelora ${argv[0]} --help` : 'edgelora --help';
  io.err(`edgelora: error: unknown command "${words}"\n  hint: ${guess ? `did you mean \`edgelora ${guess}\`? (\`${list}\` lists them)` : `\`${list}\` lists the commands`}\n`);
  return 2;
}
