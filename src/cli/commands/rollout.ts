// `edgelora rollout start|status|pause|resume|abort`: staged rollouts, through the hub's HTTP API
// (`edgelora hub --http`). Flags become a RolloutSpec here and are validated with its zod schema
// before anything is sent; the hub validates the same schema again.
import { promises as fs } from 'node:fs';
import type { Command } from '../command.js';
import { parseFlags, requireFlag, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { readApiKeys } from '../../util/http-auth.js';
import { HubApi } from '../../sync/hub/api-client.js';
import { RolloutSpecSchema, RolloutStateSchema, countDevices, type RolloutSpecInput, type RolloutState } from '../../sync/hub/rollout-state.js';
import { packAdapterDir } from '../../sync/transfer/pack.js';
import { parseTarget } from '../../sync/protocol/topics.js';
import { sanitizeName } from '../../sync/hub/hub.js';
import path from 'node:path';

const apiFlags = {
  hub: { type: 'string' },
  'token-file': { type: 'string' },
  json: { type: 'boolean' },
} as const;

const apiHelp = `  --hub <url>          the hub's --http address, e.g. http://127.0.0.1:8081 (default $EDGELORA_HUB_URL)
  --token-file <file>  Bearer token file (the hub's --http-token-file)
  --json               print the rollout state as JSON`;

async function api(v: { hub?: string | undefined; 'token-file'?: string | undefined }): Promise<HubApi> {
  const url = v.hub ?? process.env.EDGELORA_HUB_URL;
  if (!url) throw new EdgeloraError('missing --hub', { where: 'edgelora rollout', hint: 'give the address the hub serves with --http, e.g. --hub http://127.0.0.1:8081' });
  if (!/^https?:\/\//.test(url)) throw new EdgeloraError(`bad hub address ${JSON.stringify(url)}`, { where: '--hub', hint: 'write http://HOST:PORT' });
  const token = v['token-file'] ? (await readApiKeys(v['token-file']))[0]! : null;
  return new HubApi(url, token);
}

/** "95%" or "0.95" → 0.95. */
export function shareFlag(flag: string, raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  const m = /^(\d+(?:\.\d+)?)(%?)$/.exec(raw.trim());
  const v = m ? Number(m[1]) / (m[2] ? 100 : 1) : NaN;
  if (!Number.isFinite(v) || v < 0 || v > 1) throw new EdgeloraError(`must be a percentage from 0% to 100% (or a share from 0 to 1), not ${JSON.stringify(raw)}`, { where: `--${flag}` });
  return v;
}

/** "10m", "30s", "1h", "500ms" → milliseconds. */
export function durationFlag(flag: string, raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(raw.trim());
  const ms = m ? Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h'] : NaN;
  if (!Number.isFinite(ms) || ms < 1) throw new EdgeloraError(`must be a duration such as 10m, 30s, 1h or 500ms, not ${JSON.stringify(raw)}`, { where: `--${flag}` });
  return Math.round(ms);
}

function intFlag(flag: string, raw: string | undefined): number | undefined {
  if (raw === undefined) return undefined;
  if (!/^\d+$/.test(raw.trim()) || Number(raw) < 1) throw new EdgeloraError(`must be an integer ≥ 1, not ${JSON.stringify(raw)}`, { where: `--${flag}` });
  return Number(raw);
}

/** The one-screen view `rollout status` prints. */
export function describeRollout(st: RolloutState): string {
  const c = countDevices(st);
  const lines = [
    `${st.id}  ${st.status}  ${st.adapter.id} v${st.adapter.version} (${st.adapter.sha256.slice(0, 12)}) → fleet ${st.spec.fleet}; previous ${st.previous ? `${st.previous.id} v${st.previous.version}` : 'none'}`,
    `  stage ${Math.min(st.stage + 1, st.plan.length)}/${st.plan.length}; ${c.activated} activated, ${c.failed} failed, ${c.sent} in flight, ${c.pending} pending, ${c.rolledBack} rolled back of ${c.planned}`,
  ];
  st.plan.forEach((ids, i) => {
    const s = countDevices(st, i);
    lines.push(`  stage ${i + 1}: ${s.activated}/${ids.length} activated, ${s.failed} failed${i === st.stage && st.status !== 'succeeded' ? '  <' : ''}`);
  });
  if (st.reason) lines.push(`  reason: ${st.reason}`);
  return lines.join('\n');
}

function print(st: RolloutState, json: boolean | undefined): void {
  process.stdout.write(json ? `${JSON.stringify(st)}\n` : `${describeRollout(st)}\n`);
}

const parseState = (data: unknown): RolloutState => RolloutStateSchema.parse(stripView(data));
/** The API adds counts to each rollout; the state schema is strict. */
function stripView(data: unknown): unknown {
  if (typeof data !== 'object' || data === null) return data;
  const { counts: _c, stageCounts: _s, ...rest } = data as Record<string, unknown>;
  return rest;
}

export const rolloutStartCommand: Command = {
  name: 'rollout start',
  summary: 'start a staged rollout of an adapter to a fleet (stages, thresholds, rate)',
  help: `Usage: edgelora rollout start <adapter-dir|sha256> --to fleet:NAME --hub <url> [flags]

The hub publishes the adapter stage by stage to devices it picks deterministically from the fleet's
online devices (each on its own device target); the next stage starts when the current one meets the
success threshold. The fleet target keeps the previous adapter until every stage passed, so devices
that join meanwhile keep it. An adapter directory is uploaded to the hub first.

  --to <fleet:NAME>            the fleet
  --stages <p1%,p2%,...>       cumulative stage sizes, ending at 100% (default 1%,10%,50%,100%)
  --stage-size <n>             or: n devices per stage
  --success-threshold <p%>     share of a stage that must activate before the next starts (default 95%)
  --abort-threshold <p%>       abort when this share of devices with an outcome failed (default 10%)...
  --abort-min <n>              ...and at least n devices have an outcome (default 5)
  --stage-timeout <duration>   a device without an outcome this long after its publication has timed
                               out (a failure), e.g. 10m, 30s (default 10m)
  --max-per-minute <n>         devices sent the adapter per rolling minute (default unlimited)
  --rollback-on-abort          after an abort, send the devices that activated it the previous adapter
  --name <id>                  adapter id to publish under (default: the stored name / directory name)
${apiHelp}
  -h, --help                   this text`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('rollout start', argv, {
      ...apiFlags,
      to: { type: 'string' },
      stages: { type: 'string' },
      'stage-size': { type: 'string' },
      'success-threshold': { type: 'string' },
      'abort-threshold': { type: 'string' },
      'abort-min': { type: 'string' },
      'stage-timeout': { type: 'string' },
      'max-per-minute': { type: 'string' },
      'rollback-on-abort': { type: 'boolean' },
      name: { type: 'string' },
    }, { positionals: ['adapter-dir|sha256'] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const what = requirePositional('rollout start', 'adapter-dir|sha256', positionals[0]);
    const target = parseTarget(requireFlag('rollout start', 'to', v.to));
    if (target.kind !== 'fleet') throw new EdgeloraError(`a rollout goes to a fleet, not a ${target.kind}`, { where: '--to', hint: 'write --to fleet:NAME (use `edgelora publish` for one group or device)' });
    if (v.stages !== undefined && v['stage-size'] !== undefined) throw new EdgeloraError('give --stages or --stage-size, not both', { where: 'edgelora rollout start' });
    let stages: RolloutSpecInput['stages'];
    if (v.stages !== undefined) {
      const values = v.stages.split(',').map((p) => {
        const s = shareFlag('stages', p);
        return Math.round((s ?? NaN) * 100 * 1000) / 1000;
      });
      stages = { kind: 'percent', values };
    } else if (v['stage-size'] !== undefined) stages = { kind: 'size', size: intFlag('stage-size', v['stage-size'])! };
    const successThreshold = shareFlag('success-threshold', v['success-threshold']);
    const abortThreshold = shareFlag('abort-threshold', v['abort-threshold']);
    const abortMin = intFlag('abort-min', v['abort-min']);
    const stageTimeoutMs = durationFlag('stage-timeout', v['stage-timeout']);
    const maxPerMinute = intFlag('max-per-minute', v['max-per-minute']);
    const isDir = await fs.stat(what).then((s) => s.isDirectory(), () => false);
    if (!isDir && !/^[0-9a-f]{8,64}$/.test(what)) throw new EdgeloraError(`${JSON.stringify(what)} is neither an adapter directory nor a sha256 (prefix of at least 8 hex digits)`, { where: '<adapter-dir|sha256>' });
    const spec: RolloutSpecInput = {
      adapter: isDir ? '0'.repeat(64) : what, // replaced by the upload's sha256 below
      fleet: target.name,
      ...(stages ? { stages } : {}),
      ...(successThreshold !== undefined ? { successThreshold } : {}),
      ...(abortThreshold !== undefined ? { abortThreshold } : {}),
      ...(abortMin !== undefined ? { abortMin } : {}),
      ...(stageTimeoutMs !== undefined ? { stageTimeoutMs } : {}),
      ...(maxPerMinute !== undefined ? { maxPerMinute } : {}),
      ...(v['rollback-on-abort'] ? { rollbackOnAbort: true } : {}),
      ...(v.name ? { name: v.name } : {}),
    };
    const checked = RolloutSpecSchema.safeParse(spec);
    if (!checked.success) {
      const i = checked.error.issues[0];
      throw new EdgeloraError(`${i?.message ?? 'invalid'}`, { where: `rollout ${i?.path.join('.') || 'spec'}` });
    }
    const hub = await api(v);
    if (isDir) {
      const blob = await packAdapterDir(what);
      const name = v.name ?? sanitizeName(path.basename(path.resolve(what)));
      const up = (await hub.request('POST', `/api/adapters?name=${encodeURIComponent(name)}`, { bytes: blob })) as { sha256: string };
      spec.adapter = up.sha256;
    }
    print(parseState(await hub.request('POST', '/api/rollouts', { json: spec })), v.json);
    return 0;
  },
};

export const rolloutStatusCommand: Command = {
  name: 'rollout status',
  summary: 'show one rollout (or every rollout): stage, counts, transitions with --json',
  help: `Usage: edgelora rollout status [<id>] --hub <url> [--json]

Without an id: every rollout the hub holds, newest first. --json prints the full state, with every
transition in "events".

${apiHelp}
  -h, --help           this text`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('rollout status', argv, apiFlags, { positionals: ['id?'] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const hub = await api(v);
    if (positionals[0]) {
      print(parseState(await hub.request('GET', `/api/rollouts/${encodeURIComponent(positionals[0])}`)), v.json);
      return 0;
    }
    const all = ((await hub.request('GET', '/api/rollouts')) as { rollouts: unknown[] }).rollouts.map(parseState);
    if (v.json) process.stdout.write(`${JSON.stringify(all)}\n`);
    else process.stdout.write(all.length ? `${all.map(describeRollout).join('\n')}\n` : 'no rollout\n');
    return 0;
  },
};

function actionCommand(action: 'pause' | 'resume' | 'abort', summary: string): Command {
  return {
    name: `rollout ${action}`,
    summary,
    help: `Usage: edgelora rollout ${action} <id> --hub <url> [--json]

${apiHelp}
  -h, --help           this text`,
    async run(argv) {
      const { values: v, positionals, help } = parseFlags(`rollout ${action}`, argv, apiFlags, { positionals: ['id'] });
      if (help) {
        process.stdout.write(`${this.help}\n`);
        return 0;
      }
      const id = requirePositional(`rollout ${action}`, 'id', positionals[0]);
      const hub = await api(v);
      print(parseState(await hub.request('POST', `/api/rollouts/${encodeURIComponent(id)}/${action}`)), v.json);
      return 0;
    },
  };
}

export const rolloutPauseCommand = actionCommand('pause', 'pause a rollout: no new device is sent the adapter');
export const rolloutResumeCommand = actionCommand('resume', 'resume a paused rollout');
export const rolloutAbortCommand = actionCommand('abort', 'abort a rollout (with --rollback-on-abort, activated devices go back)');
