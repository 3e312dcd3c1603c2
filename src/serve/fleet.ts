// The fleet agent's activation seam inside `edgelora serve`: an AdapterActivator that installs the
// adapter the hub pushed into the ServeEngine (the one loaded base), so it appears in /v1/models as
// "<base>:<adapter-id>" and, with --default-adapter fleet, is what a request for the bare base id
// gets. Validation (config, shapes, NaN/Inf, base fingerprint) happens before anything changes; the
// swap itself runs in engine.between(), at a token boundary: rows in flight keep the adapter set
// they resolved at submit, the next request gets the new one. A throw tells the agent to roll back,
// and serving stays on the last good adapter because nothing was touched.
import type { AdapterActivator, ActivationInfo } from '../sync/agent/activator.js';
import { baseOf, loadAdapter } from '../adapters/peft.js';
import { EdgeloraError } from '../util/errors.js';
import type { ServeEngine } from './engine.js';

/** What a request for the bare base id gets: the fleet's active adapter, or the base alone. */
export type DefaultAdapterMode = 'fleet' | 'none';

export interface FleetInfo {
  readonly default_adapter: DefaultAdapterMode;
  /** The fleet's active adapter as a model id ("<base>:<adapter-id>"), or null. */
  readonly fleet_active: string | null;
  readonly fleet_version: number | null;
  /** What a request for the bare base id is served with ("<base>:<adapter-id>"), or null: the base alone. */
  readonly base_serves: string | null;
  /** Activations done, and of those how many found rows in flight (which kept their old set). */
  readonly activations: number;
  readonly swaps_with_rows_in_flight: number;
}

export class EngineActivator implements AdapterActivator {
  private current: { id: string; version: number; sha256: string } | null = null;
  private activations = 0;
  private swapsInFlight = 0;

  constructor(
    private readonly engine: ServeEngine,
    readonly mode: DefaultAdapterMode = 'fleet',
    private readonly log: (line: string) => void = () => undefined,
  ) {}

  async activate(dir: string, info: ActivationInfo): Promise<void> {
    const id = info.adapterId;
    const cur = this.current;
    if (cur && cur.sha256 === info.sha256 && this.engine.adapters.has(id)) {
      // The agent re-activating what is active (a rollback to it after a failed push): only the default.
      await this.engine.between(() => this.point(id));
      return;
    }
    if (this.engine.adapters.has(id) && cur?.id !== id) {
      throw new EdgeloraError(`the fleet pushed adapter "${id}", but an adapter loaded with --adapter or POST /v1/adapters already has that id`, {
        where: dir,
        hint: 'unload that one (DELETE /v1/adapters/{id}) or publish under another name',
      });
    }
    // Everything the runtime checks, before serving changes at all.
    // (The agent already logged the note for another quantization of this source model.)
    await loadAdapter(dir, { cfg: this.engine.model.cfg, ...baseOf(this.engine.model.manifest) });
    await this.engine.between(async () => {
      const inFlight = this.engine.runningRows;
      // The new adapter is in place before the old one goes: requests resolving the bare id while it
      // loads (HTTP runs during this await) still get the old adapter, never the base alone. (Unloading
      // first left that window open: streams in it got the base's text.)
      await this.engine.loadAdapter(id, dir, 1, { replace: cur?.id === id });
      this.point(id);
      if (cur && cur.id !== id && this.engine.adapters.has(cur.id)) this.engine.unloadAdapter(cur.id);
      this.current = { id, version: info.version, sha256: info.sha256 };
      this.activations++;
      if (inFlight > 0) this.swapsInFlight++;
      this.log(`fleet: activated ${this.engine.modelId}:${id} v${info.version} at a token boundary (${inFlight} rows in flight keep their adapters)`);
    });
  }

  async deactivate(): Promise<void> {
    await this.engine.between(() => {
      const cur = this.current;
      if (cur && this.engine.adapters.has(cur.id)) this.engine.unloadAdapter(cur.id);
      this.current = null;
      this.point(null);
      this.log('fleet: deactivated; the base id serves the base alone');
    });
  }

  private point(id: string | null): void {
    this.engine.setBaseDefault(this.mode === 'fleet' ? id : null);
  }

  info(): FleetInfo {
    const base = this.engine.baseDefaultAdapter;
    return {
      default_adapter: this.mode,
      fleet_active: this.current ? `${this.engine.modelId}:${this.current.id}` : null,
      fleet_version: this.current?.version ?? null,
      base_serves: base === null ? null : `${this.engine.modelId}:${base}`,
      activations: this.activations,
      swaps_with_rows_in_flight: this.swapsInFlight,
    };
  }
}
