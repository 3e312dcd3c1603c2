// The runtime's AdapterActivator for the sync agent: an accepted adapter is loaded into the
// AdapterManager of a loaded base (full validation: config, shapes, NaN/Inf, base fingerprint) and
// becomes the one active adapter. A throw tells the agent to roll back; on failure the previously
// active adapter stays active, untouched.
import type { AdapterActivator, ActivationInfo } from '../sync/agent/activator.js';
import type { AdapterManager } from './manager.js';

export class RuntimeActivator implements AdapterActivator {
  private current: string | null = null;
  constructor(private readonly adapters: AdapterManager) {}

  async activate(dir: string, info: ActivationInfo): Promise<void> {
    const id = `${info.adapterId}@${info.version}#${info.sha256.slice(0, 12)}`;
    if (this.current === id) return;
    if (!this.adapters.list().some((a) => a.id === id)) await this.adapters.load(dir, { id });
    const previous = this.current;
    if (previous) this.adapters.deactivate(previous);
    this.adapters.activate(id);
    this.current = id;
    if (previous && previous !== id) this.adapters.unload(previous);
  }

  async deactivate(): Promise<void> {
    if (!this.current) return;
    this.adapters.deactivate(this.current);
    this.adapters.unload(this.current);
    this.current = null;
  }

  /** The active adapter's id in the manager, or null. */
  get active(): string | null {
    return this.current;
  }
}
