// edgelora CLI entry point (the bundle's main): runs one invocation and sets the exit code.
import { runCli, formatError } from './run.js';

runCli(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`${formatError(err, undefined)}\n`);
    process.exitCode = 1;
  },
);
