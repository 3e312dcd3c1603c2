// How an agent hands an accepted adapter to the runtime. The agent calls `activate` only with a
// complete, verified adapter directory; a throw means "this adapter does not work here" and the
// agent rolls back to the last adapter that worked. The default only validates the files; the
// runtime plugs its own loader in (see src/adapters/).
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';

export interface ActivationInfo {
  adapterId: string;
  version: number;
  sha256: string;
}

export interface AdapterActivator {
  /** Loads the PEFT adapter directory `dir` into the runtime (replacing the active one). */
  activate(dir: string, info: ActivationInfo): Promise<void>;
  /** Runs the base model without any adapter. */
  deactivate(): Promise<void>;
}

const PeftSchema = z.looseObject({ peft_type: z.literal('LORA'), r: z.number().int().positive().optional() });

/** Parses a safetensors header (u64 LE length + JSON) and checks every tensor's offsets fit the file. */
export async function checkSafetensors(file: string): Promise<void> {
  const bad = (why: string) => new EdgeloraError(`not a valid safetensors file: ${why}`, { where: file });
  const fh = await fs.open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    if (size < 8) throw bad('shorter than 8 bytes');
    const head = Buffer.alloc(8);
    await fh.read(head, 0, 8, 0);
    const n = head.readBigUInt64LE(0);
    if (n > BigInt(Math.min(size - 8, 100 * 1024 * 1024))) throw bad('header length runs past the end');
    const hbuf = Buffer.alloc(Number(n));
    await fh.read(hbuf, 0, hbuf.length, 8);
    let header: unknown;
    try {
      header = JSON.parse(hbuf.toString('utf8'));
    } catch (err) {
      throw bad(`header is not JSON (${(err as Error).message})`);
    }
    if (typeof header !== 'object' || header === null || Array.isArray(header)) throw bad('header is not an object');
    const body = size - 8 - Number(n);
    for (const [name, t] of Object.entries(header as Record<string, unknown>)) {
      if (name === '__metadata__') continue;
      const r = z.looseObject({ dtype: z.string(), shape: z.array(z.number().int().nonnegative()), data_offsets: z.tuple([z.number().int(), z.number().int()]) }).safeParse(t);
      if (!r.success) throw bad(`tensor ${name}: ${r.error.issues[0]?.message ?? 'invalid entry'}`);
      const [a, b] = r.data.data_offsets;
      if (a < 0 || b < a || b > body) throw bad(`tensor ${name}: data_offsets [${a}, ${b}] outside the ${body}-byte body`);
    }
  } finally {
    await fh.close();
  }
}

/** Checks that `dir` is a loadable PEFT LoRA directory; throws EdgeloraError otherwise. */
export async function validateAdapterDir(dir: string): Promise<void> {
  const cfgFile = path.join(dir, 'adapter_config.json');
  let raw: unknown;
  try {
    raw = JSON.parse(await fs.readFile(cfgFile, 'utf8'));
  } catch (err) {
    throw new EdgeloraError(`cannot read adapter config: ${(err as Error).message}`, { where: cfgFile });
  }
  const r = PeftSchema.safeParse(raw);
  if (!r.success) throw new EdgeloraError(`not a PEFT LoRA config: ${r.error.issues[0]?.message ?? ''}`, { where: `${cfgFile} ${r.error.issues[0]?.path.join('.') ?? ''}` });
  await checkSafetensors(path.join(dir, 'adapter_model.safetensors'));
}

/** The default activator: validates the files and remembers which directory is active. */
export class ValidatingActivator implements AdapterActivator {
  active: string | null = null;
  async activate(dir: string): Promise<void> {
    await validateAdapterDir(dir);
    this.active = dir;
  }
  async deactivate(): Promise<void> {
    this.active = null;
  }
}
