// glibc malloc tuning for the processes that run a training step. Without ORT's arena (the train kind in
// sessions.ts), every intermediate tensor of a step is malloc'd and freed; glibc's dynamic mmap threshold then
// rises to the size of the largest freed block (up to 32 MiB), so most activations land in the heap, where freed
// memory is neither returned nor reusable for the next, differently sized tensor. A fixed threshold keeps every
// block of 128 KiB or more in its own mapping, returned to the system when freed. Measured on Qwen2.5-0.5B
// (int4 + int8 table, r16 all-linear, 8 layers, 128 tokens): step peak 962 → 799 MiB; MALLOC_ARENA_MAX=2 alone
// changed nothing. glibc reads the variable once at process start, so the command re-runs itself with it set.
import { spawn } from 'node:child_process';

/** The environment variable, and the value that was measured (128 KiB, glibc's default starting threshold). */
export const MALLOC_ENV = { name: 'MALLOC_MMAP_THRESHOLD_', value: String(128 * 1024) } as const;

/** Whether this process runs on glibc (Linux) without the variable set: only then does a re-run change anything. */
export function wantsMallocTuning(env: NodeJS.ProcessEnv = process.env): boolean {
  if (process.platform !== 'linux' || env[MALLOC_ENV.name] !== undefined) return false;
  const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
  return typeof header?.glibcVersionRuntime === 'string';
}

/**
 * Runs this same command line again in a child process with MALLOC_ENV set, stdio shared, and returns its exit
 * code. The child gets its own process group, so a terminal's Ctrl-C reaches it once, forwarded from here, like a
 * SIGTERM sent to this process (the fine-tune's "stop at the next step" handler counts signals).
 */
export function rerunWithMallocTuning(): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
      // The IPC channel is the child's lifeline: if this process dies without forwarding a signal (SIGKILL,
      // a closed terminal), the channel disconnects and the child stops as on SIGTERM (stopOnParentExit).
      stdio: ['inherit', 'inherit', 'inherit', 'ipc'],
      env: { ...process.env, [MALLOC_ENV.name]: MALLOC_ENV.value },
      detached: true,
    });
    const forward = (sig: NodeJS.Signals) => child.kill(sig);
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    const done = () => {
      process.off('SIGINT', forward);
      process.off('SIGTERM', forward);
    };
    child.on('error', (err) => {
      done();
      reject(err);
    });
    child.on('exit', (code, signal) => {
      done();
      resolve(code ?? (signal === 'SIGTERM' ? 143 : signal === 'SIGINT' ? 130 : 1));
    });
  });
}

/**
 * In the re-run child (it has the IPC channel rerunWithMallocTuning opens): when the parent goes away without
 * forwarding a signal (killed with SIGKILL, say), stop like on SIGTERM, checkpoint included, instead of training
 * on as an orphan. The channel is unref'd so it never keeps the child alive by itself.
 */
export function stopOnParentExit(): void {
  if (typeof process.send !== 'function') return;
  process.channel?.unref();
  process.once('disconnect', () => process.kill(process.pid, 'SIGTERM'));
}
