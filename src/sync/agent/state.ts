// The agent's persistent state (<state>/state.json): the highest manifest seq acted on, the active
// and previous adapter, and every installed adapter (directories under <state>/adapters/). Written
// atomically; an unreadable file starts the device empty (it downloads again) rather than stuck.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../../util/atomic.js';

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);
const InstalledSchema = z.strictObject({
  id: z.string(),
  version: z.number().int().positive(),
  sha256: hex64,
  seq: z.number().int().nonnegative(),
  /** Directory name under <state>/adapters/. */
  dir: z.string().regex(/^[A-Za-z0-9._@-]+$/),
  installedAt: z.iso.datetime(),
});
export type Installed = z.infer<typeof InstalledSchema>;
export const StateSchema = z.strictObject({
  format: z.literal('edgelora-agent-state/1'),
  deviceId: z.string(),
  /** Highest manifest seq already acted on (installed, or refused after download): older ones are ignored. */
  appliedSeq: z.number().int().nonnegative(),
  active: hex64.nullable(),
  previous: hex64.nullable(),
  installed: z.array(InstalledSchema),
});
export type State = z.infer<typeof StateSchema>;

export class AgentStore {
  state: State;
  constructor(
    readonly dir: string,
    deviceId: string,
    private readonly log: (line: string) => void,
  ) {
    this.state = { format: 'edgelora-agent-state/1', deviceId, appliedSeq: 0, active: null, previous: null, installed: [] };
  }

  private get file(): string {
    return path.join(this.dir, 'state.json');
  }

  async load(): Promise<void> {
    const raw = await fs.readFile(this.file, 'utf8').catch(() => null);
    if (raw === null) return;
    try {
      const r = StateSchema.safeParse(JSON.parse(raw));
      if (r.success) this.state = r.data;
      else this.log(`state.json invalid (${r.error.issues[0]?.message ?? ''}); starting empty`);
    } catch (err) {
      this.log(`state.json unreadable (${(err as Error).message}); starting empty`);
    }
  }

  async save(): Promise<void> {
    await writeFileAtomic(this.file, JSON.stringify(this.state, null, 1));
  }

  installed(sha: string | null): Installed | undefined {
    return sha === null ? undefined : this.state.installed.find((i) => i.sha256 === sha);
  }

  adapterDir(i: Installed): string {
    return path.join(this.dir, 'adapters', i.dir);
  }

  /** An installed adapter by id (and version; without: the newest); no spec: the active one. */
  find(spec: { id: string; version?: number } | undefined): Installed | undefined {
    if (!spec) return this.installed(this.state.active);
    const hits = this.state.installed.filter((i) => i.id === spec.id && (spec.version === undefined || i.version === spec.version));
    return hits.sort((a, b) => b.version - a.version)[0];
  }

  /** Removes the oldest installed adapters beyond `keep`, never the active or previous one. */
  async prune(keep: number): Promise<void> {
    const pinned = new Set([this.state.active, this.state.previous]);
    const others = this.state.installed.filter((i) => !pinned.has(i.sha256));
    const drop = others.slice(0, Math.max(0, others.length - keep));
    for (const d of drop) {
      this.state.installed = this.state.installed.filter((i) => i !== d);
      await fs.rm(this.adapterDir(d), { recursive: true, force: true });
    }
  }
}
