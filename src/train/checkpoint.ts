// Training checkpoints: LoRA tensors + optimizer state + step + data-order/RNG description + the
// log so far, written atomically (temporary directory, fsync, rename) next to the output as
// `<out>.checkpoint/`. Resuming restores exactly this state; data order and dropout masks are derived
// from (seed, micro-batch index), so the step number is the whole RNG position.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { SafetensorsReader, writeSafetensors, type WriteEntry } from '../formats/safetensors.js';
import { writeDirAtomic } from '../util/atomic.js';
import { EdgeloraError } from '../util/errors.js';
import type { LoraParam } from './session.js';
import type { TensorState } from './optim.js';

export const CHECKPOINT_FORMAT = 'edgelora-finetune-checkpoint/1';
const STATE_FILE = 'state.json';
const TENSORS_FILE = 'tensors.safetensors';

export const logEntrySchema = z.object({
  step: z.number().int().positive(),
  loss: z.number(),
  lr: z.number(),
  grad_norm: z.number(),
  tokens: z.number().int().nonnegative(),
  seconds: z.number(),
});
export type LogEntry = z.infer<typeof logEntrySchema>;

const stateSchema = z.object({
  format: z.literal(CHECKPOINT_FORMAT),
  /** Optimizer steps completed. */
  step: z.number().int().nonnegative(),
  totalSteps: z.number().int().positive(),
  /** Hash of every option that changes the result; resume refuses a different plan. */
  planHash: z.string(),
  /** Data order: epoch e shuffles rows with Rng(seed, e); micro-batch m = rows of chunk m mod batchesPerEpoch. */
  dataOrder: z.object({ seed: z.number().int(), rows: z.number().int().positive(), batchSize: z.number().int().positive(), batchesPerEpoch: z.number().int().positive() }),
  /** Dropout masks come from Rng(seed, micro-batch index): no hidden generator state to save. */
  rng: z.object({ kind: z.literal('derived-per-micro-batch'), seed: z.number().int(), nextMicroBatch: z.number().int().nonnegative() }),
  tokens: z.number().int().nonnegative(),
  log: z.array(logEntrySchema),
  modules: z.array(z.string()),
});
export type CheckpointState = z.infer<typeof stateSchema>;

export function checkpointDir(outDir: string): string {
  return `${path.resolve(outDir).replace(/\/$/, '')}.checkpoint`;
}

export async function saveCheckpoint(dir: string, state: CheckpointState, params: ReadonlyMap<string, LoraParam>, opt: ReadonlyMap<string, TensorState>): Promise<void> {
  await writeDirAtomic(
    dir,
    async (tmp) => {
      const entries: WriteEntry[] = [];
      for (const [key, p] of params) {
        entries.push({ name: `${key}.a`, dtype: 'F32', shape: [p.r, p.K], data: p.a });
        entries.push({ name: `${key}.b`, dtype: 'F32', shape: [p.N, p.r], data: p.b });
        for (const which of ['a', 'b'] as const) {
          const s = opt.get(`${key}.${which}`);
          if (!s) continue;
          entries.push({ name: `${key}.${which}.m`, dtype: 'F32', shape: [s.m.length], data: s.m });
          entries.push({ name: `${key}.${which}.v`, dtype: 'F32', shape: [s.v.length], data: s.v });
        }
      }
      await writeSafetensors(path.join(tmp, TENSORS_FILE), entries);
      await fs.writeFile(path.join(tmp, STATE_FILE), JSON.stringify(state) + '\n');
    },
    { replace: true },
  );
}

export async function hasCheckpoint(dir: string): Promise<boolean> {
  return fs.stat(path.join(dir, STATE_FILE)).then(() => true, () => false);
}

/** Loads a checkpoint into `params` and `opt` (which must already hold tensors of the right sizes). */
export async function loadCheckpoint(dir: string, params: Map<string, LoraParam>, opt: Map<string, TensorState>): Promise<CheckpointState> {
  const file = path.join(dir, STATE_FILE);
  let json: unknown;
  try {
    json = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (err) {
    throw new EdgeloraError(`cannot read the checkpoint: ${(err as Error).message}`, { where: file, hint: 'remove the checkpoint directory to start over' });
  }
  const r = stateSchema.safeParse(json);
  if (!r.success) throw new EdgeloraError(`invalid checkpoint: ${r.error.issues[0]!.message}`, { where: file, hint: 'remove the checkpoint directory to start over' });
  const reader = await SafetensorsReader.open(path.join(dir, TENSORS_FILE));
  try {
    const read = async (name: string, into: Float32Array) => {
      if (!reader.has(name)) throw new EdgeloraError(`checkpoint lacks tensor ${name}`, { where: dir, hint: 'was it written for another plan?' });
      const v = await reader.readF32(name);
      if (v.length !== into.length) throw new EdgeloraError(`checkpoint tensor ${name} has ${v.length} values, expected ${into.length}`, { where: dir });
      into.set(v);
    };
    for (const [key, p] of params) {
      await read(`${key}.a`, p.a);
      await read(`${key}.b`, p.b);
      for (const which of ['a', 'b'] as const) {
        const s = opt.get(`${key}.${which}`);
        if (!s) continue;
        await read(`${key}.${which}.m`, s.m);
        await read(`${key}.${which}.v`, s.v);
      }
    }
  } finally {
    await reader.close();
  }
  return r.data;
}
