// `edgelora hub`: runs the fleet hub (adapter store, signed manifests, chunk broadcast, uploads),
// optionally with an embedded MQTT 3.1.1 broker (aedes) in the same process.
import { existsSync } from 'node:fs';
import { loadEncKey } from '../../sync/protocol/envelope.js';
import type { Command } from '../command.js';
import { numberFlag, parseFlags, requireFlag } from '../command.js';
import { Hub } from '../../sync/hub/hub.js';
import { loadSigningKey } from '../../sync/protocol/signing.js';
import { startEmbeddedBroker, type EmbeddedBroker } from '../../sync/transport/embedded-broker.js';
import { brokerFlags, brokerHelp, brokerOptions, untilSignal } from '../broker-flags.js';
import { Rollouts } from '../../sync/hub/rollout.js';
import { startHubHttp, type HubHttp } from '../../sync/hub/http.js';
import { checkBind, readApiKeys } from '../../util/http-auth.js';
import { EdgeloraError } from '../../util/errors.js';

/** "HOST:PORT", "[v6]:PORT" or "PORT" (loopback). */
export function parseHttpAddr(spec: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(spec) ?? /^()()(\d{1,5})$/.exec(spec);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new EdgeloraError(`bad address ${JSON.stringify(spec)}`, { where: '--http', hint: 'write HOST:PORT, e.g. 127.0.0.1:8081 (port 0 picks a free one)' });
  return { host: m[1] || m[2] || '127.0.0.1', port };
}

export const hubCommand: Command = {
  name: 'hub',
  summary: 'run the fleet hub: store, sign and distribute adapters over MQTT',
  help: `Usage: edgelora hub --broker <url> --store <dir> --key <signing-key-file> [flags]
       edgelora hub --embedded-broker [port] --store <dir> --key <signing-key-file>

Runs until SIGINT/SIGTERM (and then exits within a few seconds, even with its broker gone). One hub
per --store: a second one is refused. Operators publish with \`edgelora publish\`; devices run \`edgelora agent\`.

  --store <dir>              adapter store (content-addressed blobs + index.json); created when missing
  --key <file>               Ed25519 private key from \`edgelora keygen\`
  --enc-key <file>           X25519 private key to open sealed uploads (default: <key prefix>.x25519.key
                             beside --key, when it exists)
  --allow-plaintext          publish in clear (signed only) to targets with no enrolled device, or with
                             devices whose key is not enrolled: a migration aid; without it such a
                             publication fails, or leaves those devices out (enrol: \`edgelora fleet enroll\`)
  --embedded-broker [port]   start an MQTT 3.1.1 broker (aedes) in process on 127.0.0.1:port (default 1883)
                             and connect to it; --broker is then optional
  --host <addr>              address the embedded broker listens on (default 127.0.0.1)
  --client-id <id>           MQTT client id (default edgelora-hub); one per hub on a broker
  --chunk-size <bytes>       chunk payload size for new publications (default 262144)
  --coalesce-ms <ms>         gather missing-chunk requests this long before one repair pass (default 250)
  --repair-broadcast-share <0..1>
                             broadcast a repaired chunk when more than this share of the target's
                             online devices asked for it, else send it to each asker alone (default 0.5;
                             0 broadcasts every repair)
  --rate <bytes/s>           cap on broadcast chunk bytes per second (default unlimited)
  --http <host:port>         serve the JSON API, the event stream and the dashboard (http://host:port/);
                             staged rollouts (\`edgelora rollout\`) go through it. Loopback unless
                             --http-token-file is given
  --http-token-file <file>   accepted Bearer tokens, one per line (at least 16 characters); every /api
                             route then needs "Authorization: Bearer <token>" (the page: #token=<token>)
  --quiet                    no log lines on stderr
  -h, --help                 this text

${brokerHelp}`,
  async run(argv) {
    const args = [...argv];
    const i = args.indexOf('--embedded-broker');
    if (i >= 0 && (args[i + 1] === undefined || args[i + 1]?.startsWith('-'))) args[i] = '--embedded-broker=1883';
    const { values: v, help } = parseFlags('hub', args, {
      ...brokerFlags,
      store: { type: 'string' },
      key: { type: 'string' },
      'enc-key': { type: 'string' },
      'allow-plaintext': { type: 'boolean' },
      'embedded-broker': { type: 'string' },
      host: { type: 'string' },
      'client-id': { type: 'string' },
      'chunk-size': { type: 'string' },
      'coalesce-ms': { type: 'string' },
      'repair-broadcast-share': { type: 'string' },
      rate: { type: 'string' },
      http: { type: 'string' },
      'http-token-file': { type: 'string' },
      quiet: { type: 'boolean' },
    }, { positionals: [] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const store = requireFlag('hub', 'store', v.store);
    const keyFile = requireFlag('hub', 'key', v.key);
    const key = await loadSigningKey(keyFile);
    const besideKey = `${keyFile.replace(/\.key$/, '')}.x25519.key`;
    const encFile = v['enc-key'] ?? (existsSync(besideKey) ? besideKey : undefined);
    const encKey = encFile ? await loadEncKey(encFile) : undefined;
    const log = v.quiet ? undefined : (line: string) => process.stderr.write(`${line}\n`);
    // Every flag is checked before the embedded broker starts listening.
    const rate = v.rate === undefined ? undefined : numberFlag('rate', v.rate, 0, { positive: true });
    const chunkSize = numberFlag('chunk-size', v['chunk-size'], 256 * 1024, { integer: true, min: 1024, max: 16 * 1024 * 1024 });
    const coalesceMs = numberFlag('coalesce-ms', v['coalesce-ms'], 250, { min: 0 });
    const repairBroadcastShare = numberFlag('repair-broadcast-share', v['repair-broadcast-share'], 0.5, { min: 0, max: 1 });
    const port = v['embedded-broker'] === undefined ? undefined : numberFlag('embedded-broker', v['embedded-broker'], 1883, { integer: true, min: 0, max: 65535 });
    const httpAddr = v.http === undefined ? undefined : parseHttpAddr(v.http);
    const tokens = v['http-token-file'] ? await readApiKeys(v['http-token-file']) : [];
    if (httpAddr) checkBind(httpAddr.host, tokens, { host: '--http', keyFile: '--http-token-file' });
    if (port === undefined) brokerOptions('hub', v); // throws on a missing or bad --broker now; with the embedded broker its URL is known only once it listens
    let embedded: EmbeddedBroker | null = null;
    if (port !== undefined) {
      embedded = await startEmbeddedBroker(port, v.host ?? '127.0.0.1');
      log?.(`hub: embedded MQTT 3.1.1 broker on ${embedded.url}`);
    }
    const hub = new Hub({
      broker: brokerOptions('hub', v, embedded?.url),
      storeDir: store,
      key,
      ...(encKey ? { encKey } : {}),
      ...(v['allow-plaintext'] ? { allowPlaintext: true } : {}),
      ...(v['client-id'] ? { clientId: v['client-id'] } : {}),
      chunkSize,
      coalesceMs,
      repairBroadcastShare,
      ...(rate !== undefined ? { rateBytesPerSec: rate } : {}),
      ...(log ? { log } : {}),
    });
    await hub.start();
    log?.(`hub: connected, key id ${hub.keyId}, X25519 key ${encKey ? `${encKey.keyId} (${encFile})` : 'none (sealed uploads refused)'}, store ${store}${v['allow-plaintext'] ? ', --allow-plaintext' : ''}`);
    // Persisted rollouts resume whether or not --http is given; starting new ones needs the API.
    const rollouts = new Rollouts({ hub, storeDir: store, ...(log ? { log } : {}) });
    let http: HubHttp | null = null;
    try {
      await rollouts.open();
      if (httpAddr) {
        http = await startHubHttp({ hub, rollouts, ...httpAddr, tokens });
        log?.(`hub: dashboard and API on ${http.url}/`);
        process.stdout.write(`${JSON.stringify({ event: 'http', url: http.url })}\n`);
      }
    } catch (err) {
      await rollouts.close();
      await hub.stop();
      await embedded?.close();
      throw err;
    }
    const sig = await untilSignal();
    log?.(`hub: ${sig}, stopping`);
    await http?.close();
    await rollouts.close();
    await hub.stop();
    await embedded?.close();
    return 0;
  },
};
