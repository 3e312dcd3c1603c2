// edgelora CLI entry point: finds the command (one or two words) and runs it.
import { commands } from './commands/index.js';
import { describeError } from '../util/errors.js';

function usage(): string {
  const width = Math.max(...commands.map((c) => c.name.length), 8);
  const lines = commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
  return [
    'edgelora — 4-bit LLMs, LoRA adapters, on-device fine-tuning and MQTT fleet sync',
    '',
    'Usage: edgelora <command> [flags]   (edgelora <command> --help for its flags)',
    '',
    'Commands:',
    ...lines,
  ].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h' || argv[0] === 'help') {
    process.stdout.write(usage() + '\n');
    return argv.length === 0 ? 1 : 0;
  }
  if (argv[0] === '--version') {
    process.stdout.write('edgelora 0.1.0\n');
    return 0;
  }
  // Longest match first, so "adapter merge" wins over a hypothetical "adapter".
  const sorted = [...commands].sort((a, b) => b.name.split(' ').length - a.name.split(' ').length);
  for (const cmd of sorted) {
    const words = cmd.name.split(' ');
    if (words.every((w, i) => argv[i] === w)) {
      return cmd.run(argv.slice(words.length));
    }
  }
  process.stderr.write(`edgelora: unknown command "${argv.slice(0, 2).join(' ')}"\n\n${usage()}\n`);
  return 2;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`edgelora: error: ${describeError(err)}\n`);
    if (process.env.EDGELORA_DEBUG && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    process.exitCode = 1;
  },
);
