// `edgelora serve`: the long-running OpenAI-compatible HTTP server over one loaded base (src/serve).
import path from 'node:path';
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requireFlag } from '../command.js';
import { PROFILE_FLAGS, PROFILE_HELP, modelMemoryPlan } from '../load.js';
import { parseAdapterSpec } from '../../adapters/manager.js';
import { readManifest } from '../../model/manifest.js';
import { parseHfConfig } from '../../formats/hf-config.js';
import { resolveProfile, parseProfileSets } from '../../profiles/index.js';
import { startServe, readApiKeys } from '../../serve/server.js';
import { EdgeloraError } from '../../util/errors.js';
import { brokerFlags, brokerHelp, brokerOptions } from '../broker-flags.js';
import { loadHubKeys } from '../hub-keys.js';
import type { DefaultAdapterMode } from '../../serve/fleet.js';

const help = `Usage: edgelora serve --model <quantized-dir> [flags]

Serves the OpenAI API (POST /v1/chat/completions, POST /v1/completions, GET /v1/models) plus
GET /health, GET /metrics (Prometheus) and /v1/adapters (GET, POST {id, path, scale?}, DELETE
/v1/adapters/{id}). Requests with different adapters are decoded in one batch. Runs until
SIGTERM/SIGINT, then stops accepting, lets running requests finish for --shutdown-timeout seconds,
cancels the rest and exits 0.

Flags:
  --model DIR              a directory written by \`edgelora quantize\` (required)
  --host ADDR              address to bind (default 127.0.0.1); any non-loopback address
                           requires --api-key-file
  --port N                 TCP port (default 8080; 0 = any free port, printed at start)
  --model-id ID            the base's model id (default: the model directory's name);
                           adapters are "<model-id>:<adapter-id>"
  --adapter ID=DIR[:SCALE] load a PEFT adapter under ID at start, with its default scale
                           (default 1); repeatable
  --max-batch N            rows decoded together at most (default 8)
  --max-queue N            requests waiting for a batch slot at most; more get 429 (default 64)
  --ctx N                  tokens per request, prompt + completion (default: the model's
                           max_position_embeddings); a longer request gets 400
  --api-key-file F         accepted Bearer keys, one per line (at least 16 characters each);
                           every route but /health then needs "Authorization: Bearer <key>"
  --body-limit BYTES       largest request body (default 1048576); larger gets 413
  --shutdown-timeout S     seconds running requests may take to finish on SIGTERM (default 10)
${PROFILE_HELP}
Fleet (with --broker: the device agent runs in this process over the loaded base; pushed adapters
are verified, installed under --state and served as "<model-id>:<adapter-id>", swapped at a token
boundary: a request in flight keeps its adapters; hub commands rollback/activate/deactivate act on
the same set):
  --device-id ID           this device's id (required with --broker)
  --fleet NAME             fleet to follow (required with --broker)
  --group NAME             group to follow (optional)
  --trust FILE             the hub's public key (.pub from \`edgelora keygen\`; required with --broker); a
                           job's upload is sealed to the hub's <prefix>.x25519.pub beside it
  --state DIR              state directory (required with --broker; created when missing): the
                           agent's state, and fine-tuning files and jobs (POST /v1/files,
                           /v1/fine_tuning/jobs; without --state there are no jobs). A job runs in
                           this process; serving queues while it trains (the base is held once)
                           and answers when it ends; a killed server resumes an unfinished job
                           from its checkpoint on the next start
  --default-adapter fleet|none
                           what a request for the bare model id gets: the fleet's active adapter
                           (default fleet) or the base alone; /health and /v1/models say which
${brokerHelp}
  --json-log               one JSON log line per request on stderr; the start line is JSON too
  -h, --help               this text`;

/** Parses "ID=DIR[:SCALE]". */
function parseServeAdapter(spec: string): { id: string; dir: string; scale: number } {
  const eq = spec.indexOf('=');
  if (eq <= 0) throw new EdgeloraError(`--adapter ${spec}: expected ID=DIR[:SCALE]`, { where: '--adapter', hint: 'e.g. --adapter kiosk=./adapters/kiosk:0.8' });
  const { dir, scale } = parseAdapterSpec(spec.slice(eq + 1));
  return { id: spec.slice(0, eq), dir, scale };
}

type Values = Record<string, string | boolean | string[] | undefined>;

/** The in-process agent's options from --broker and friends; null without --broker. All checked before the model loads. */
async function fleetOptions(v: Values, jsonLog: boolean): Promise<NonNullable<Parameters<typeof startServe>[0]['fleet']> | null> {
  const str = (k: string) => v[k] as string | undefined;
  const mode = str('default-adapter') ?? 'fleet';
  if (mode !== 'fleet' && mode !== 'none') throw new EdgeloraError(`--default-adapter ${mode}: expected fleet or none`, { where: '--default-adapter' });
  if (v.broker === undefined) {
    const stray = ['device-id', 'fleet', 'group', 'trust', 'default-adapter'].find((k) => v[k] !== undefined);
    if (stray) throw new EdgeloraError(`--${stray} needs --broker`, { where: `--${stray}`, hint: 'give --broker mqtt://host:1883 to run the fleet agent in this server' });
    return null;
  }
  const deviceId = requireFlag('serve', 'device-id', str('device-id'));
  const fleet = requireFlag('serve', 'fleet', str('fleet'));
  const stateDir = requireFlag('serve', 'state', str('state'));
  // Uploads of fine-tuned adapters are sealed to the hub's X25519 key found beside --trust, as `agent` does.
  const { trustedKey, hubEncKey } = await loadHubKeys(requireFlag('serve', 'trust', str('trust')));
  const broker = brokerOptions('serve', v as Parameters<typeof brokerOptions>[1]);
  const log = (line: string) => process.stderr.write((jsonLog ? JSON.stringify({ event: 'fleet', message: line }) : line) + '\n');
  const group = str('group');
  return { agent: { broker, deviceId, fleet, ...(group ? { group } : {}), stateDir, trustedKey, ...(hubEncKey ? { hubEncKey } : {}), log }, defaultAdapter: mode as DefaultAdapterMode };
}

export const serveCommand: Command = {
  name: 'serve',
  summary: 'serve the OpenAI API over one loaded base, with per-request adapters and mixed-adapter batching',
  help,
  async run(argv) {
    const { values: v, help: h } = parseFlags('serve', argv, {
      model: { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      'model-id': { type: 'string' },
      adapter: { type: 'string', multiple: true },
      'max-batch': { type: 'string' },
      'max-queue': { type: 'string' },
      ctx: { type: 'string' },
      'api-key-file': { type: 'string' },
      'body-limit': { type: 'string' },
      'shutdown-timeout': { type: 'string' },
      ...PROFILE_FLAGS,
      ...brokerFlags,
      'device-id': { type: 'string' },
      fleet: { type: 'string' },
      group: { type: 'string' },
      trust: { type: 'string' },
      state: { type: 'string' },
      'default-adapter': { type: 'string' },
      'json-log': { type: 'boolean' },
    });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const dir = requireFlag('serve', 'model', v.model as string | undefined);
    const port = numberFlag('port', v.port as string | undefined, 8080, { integer: true, min: 0, max: 65535 });
    const maxBatch = numberFlag('max-batch', v['max-batch'] as string | undefined, 8, { integer: true, min: 1, max: 256 });
    const maxQueue = numberFlag('max-queue', v['max-queue'] as string | undefined, 64, { integer: true, min: 0 });
    const bodyLimit = numberFlag('body-limit', v['body-limit'] as string | undefined, 1024 * 1024, { integer: true, min: 1024 });
    const graceS = numberFlag('shutdown-timeout', v['shutdown-timeout'] as string | undefined, 10, { min: 0 });
    const adapters = ((v.adapter as string[] | undefined) ?? []).map(parseServeAdapter);
    const apiKeys = v['api-key-file'] ? await readApiKeys(v['api-key-file'] as string) : [];
    const jsonLog = Boolean(v['json-log']);
    const fleet = await fleetOptions(v, jsonLog);
    const stateDir = v.state as string | undefined;

    const manifest = await readManifest(dir);
    const cfg = parseHfConfig(manifest.sourceConfig, path.join(dir, 'manifest.json'));
    const ctx = numberFlag('ctx', v.ctx as string | undefined, cfg.maxPositionEmbeddings, { integer: true, min: 2, max: cfg.maxPositionEmbeddings });
    const profile = await resolveProfile({ profile: (v.profile as string | undefined) ?? 'auto', modelFormat: manifest.quant.format, overrides: parseProfileSets((v['profile-set'] as string[] | undefined) ?? []) });
    // The batch's KV slots hold max-batch rows of ctx tokens at most: that is the plan to check.
    const servingPlan = modelMemoryPlan(manifest, cfg, { context: ctx, prefillTokens: ctx, batch: maxBatch });
    // A fine-tuning job releases the serving session (serving queues during a job), so what serving
    // keeps then is its plan without the base's weights: the job's training session holds those.
    const servingBytesDuringJob = Math.max(0, servingPlan.bytes - (manifest.bytes.model + manifest.bytes.data));
    profile.checkMemoryPlan(modelMemoryPlan(manifest, cfg, { context: ctx, prefillTokens: ctx, batch: maxBatch }, { what: path.basename(path.resolve(dir)), lower: ['--ctx', '--max-batch'] }));

    const server = await startServe({
      modelDir: dir,
      host: (v.host as string | undefined) ?? '127.0.0.1',
      port,
      ...(v['model-id'] ? { modelId: v['model-id'] as string } : {}),
      adapters,
      maxBatch,
      maxQueue,
      ctx,
      apiKeys,
      bodyLimit,
      jsonLog,
      ...(fleet ? { fleet } : {}),
      ...(stateDir ? { jobs: { stateDir, budgetBytes: profile.memoryBudgetBytes, servingBytes: servingBytesDuringJob, profileId: profile.profile.id, sessionOptions: profile.sessionOptions({ graphOptimizationLevel: 'all', enableCpuMemArena: false }), log: (line: string) => process.stderr.write((jsonLog ? JSON.stringify({ event: 'fine-tuning', message: line }) : line) + '\n') } } : {}),
      sessionOptions: profile.sessionOptions({ graphOptimizationLevel: 'all' }),
    });
    const say = (event: string, fields: Record<string, unknown>, text: string) =>
      process.stdout.write(jsonLog ? JSON.stringify({ event, ...fields }) + '\n' : text + '\n');
    say('listening', { url: server.url }, `edgelora serve: listening on ${server.url} (loading ${dir}…)`);
    let stopping: Promise<void> | null = null;
    const stop = (signal: string) => {
      stopping ??= (async () => {
        say('stopping', { signal, grace_s: graceS }, `edgelora serve: ${signal}: stopping (running requests get ${graceS} s to finish)`);
        await server.close(graceS * 1000);
      })();
      return stopping;
    };
    const signalled = new Promise<string>((resolve) => {
      process.once('SIGTERM', () => resolve('SIGTERM'));
      process.once('SIGINT', () => resolve('SIGINT'));
    });
    try {
      const engine = await Promise.race([server.ready, signalled.then(() => null)]);
      if (engine) {
        const ids = engine.adapterInfo().map((a) => `${engine.modelId}:${a.id}`);
        say('ready', { model: engine.modelId, adapters: ids, max_batch: engine.maxBatch, ctx: engine.ctx },
          `edgelora serve: ready: model ${engine.modelId}${ids.length ? `, adapters ${ids.join(', ')}` : ''} (max batch ${engine.maxBatch}, ctx ${engine.ctx})`);
        // An --adapter trained on another quantization of this source model: allowed, said once.
        for (const a of engine.adapterInfo()) {
          if (a.baseNote) process.stderr.write((jsonLog ? JSON.stringify({ event: 'adapter-note', adapter: a.id, message: a.baseNote }) : `edgelora serve: note: adapter ${a.id}: ${a.baseNote}`) + '\n');
        }
      }
    } catch (err) {
      await server.app.close();
      throw err;
    }
    await stop(await signalled);
    say('stopped', {}, 'edgelora serve: stopped');
    return 0;
  },
};
