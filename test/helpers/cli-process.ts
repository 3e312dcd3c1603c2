// An `edgelora` CLI process a test starts (hub, serve, agent…) with its output collected, and stops by SIGTERM.
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';

export const CLI = path.resolve('src/cli/main.ts');

export interface CliProcess {
  readonly child: ChildProcess;
  out: string;
  err: string;
}

/** Starts `edgelora <args>` from the sources (tsx), collecting stdout and stderr. */
export function startCli(args: string[]): CliProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const p: CliProcess = { child, out: '', err: '' };
  child.stdout?.on('data', (d: Buffer) => (p.out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (p.err += d.toString()));
  return p;
}

/** SIGTERM and wait for the exit (nothing to do if it never started or already exited). */
export async function stopCli(p: CliProcess | undefined): Promise<void> {
  if (!p || p.child.exitCode !== null) return;
  const gone = new Promise((r) => p.child.once('exit', r));
  p.child.kill('SIGTERM');
  await gone;
}

/** Runs `edgelora <args>` to completion from the sources (tsx): its exit code and output. */
export function runCli(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
