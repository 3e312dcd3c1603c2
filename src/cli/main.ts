// edgelora CLI entry point (the bundle's main): runs one invocation and sets the exit code.
// `finetune` re-runs itself once with glibc's malloc tuned (src/runtime/malloc.ts): it lowers a training step's
// peak RSS, and glibc reads the setting only at process start.
import { runCli, formatError } from './run.js';
import { rerunWithMallocTuning, stopOnParentExit, wantsMallocTuning } from '../runtime/malloc.js';

const argv = process.argv.slice(2);
stopOnParentExit();
const help = argv.includes('--help') || argv.includes('-h');
const run = argv[0] === 'finetune' && !help && wantsMallocTuning() ? rerunWithMallocTuning() : runCli(argv);
run.then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`${formatError(err, undefined)}\n`);
    process.exitCode = 1;
  },
);
