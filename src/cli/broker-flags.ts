// Broker connection flags shared by every command that talks to the broker (hub, agent, publish,
// fleet status, fleet command, and any daemon that runs an agent): they map one to one onto
// BrokerOptions. `--broker` may be repeated or take a comma list: the URLs are tried in turn.
import type { FlagSpec } from './command.js';
import { numberFlag } from './command.js';
import { EdgeloraError } from '../util/errors.js';
import type { BrokerOptions } from '../sync/transport/mqtt.js';

export const brokerFlags = {
  broker: { type: 'string', multiple: true },
  username: { type: 'string' },
  password: { type: 'string' },
  ca: { type: 'string' },
  cert: { type: 'string' },
  'client-key': { type: 'string' },
  'key-file': { type: 'string' },
  insecure: { type: 'boolean' },
  'mqtt-version': { type: 'string' },
} as const satisfies FlagSpec;

export const brokerHelp = `Broker flags:
  --broker <url>         mqtt://host:port, mqtts://host:port (TLS), ws:// or wss://; repeat the flag
                         (or give a comma list) for a clustered broker: when the node in use is
                         gone the client moves to the next URL, resubscribes and resumes
  --username <name>      MQTT user name (with the shipped ACL: the device id, "hub" or "operator")
  --password <secret>    MQTT password (or set EDGELORA_MQTT_PASSWORD)
  --ca <file>            PEM CA certificate that signed the broker's certificate
  --cert <file>          PEM client certificate (mutual TLS)
  --client-key <file>    PEM client private key (mutual TLS)
  --key-file <file>      the same as --client-key
  --insecure             accept a broker certificate that does not verify (testing only)
  --mqtt-version <4|5>   protocol: 5 (default; falls back to 3.1.1 when the broker refuses 5) or 4`;

type BrokerValues = { [K in Exclude<keyof typeof brokerFlags, 'broker'>]?: (typeof brokerFlags)[K]['type'] extends 'boolean' ? boolean : string } & { broker?: string[] };

/** The broker URLs of repeated and comma-separated `--broker` flags, in order, duplicates dropped. */
export function brokerUrls(values: readonly string[] | undefined): string[] {
  const out: string[] = [];
  for (const v of values ?? []) {
    for (const part of v.split(',')) {
      const url = part.trim();
      if (url === '') continue;
      if (!/^(mqtts?|wss?|tcp|tls):\/\/[^/\s]+/.test(url)) throw new EdgeloraError(`not a broker URL: ${url}`, { where: '--broker', hint: 'write mqtt://host:port or mqtts://host:port (repeat --broker, or separate URLs with commas, for several)' });
      if (!out.includes(url)) out.push(url);
    }
  }
  return out;
}

export function brokerOptions(command: string, v: BrokerValues, fallbackUrl?: string): BrokerOptions {
  const urls = brokerUrls(v.broker);
  if (urls.length === 0 && fallbackUrl !== undefined) urls.push(fallbackUrl);
  if (urls.length === 0) throw new EdgeloraError('missing --broker', { where: `edgelora ${command}`, hint: 'pass --broker mqtt://host:1883 (repeat it for the nodes of a cluster)' });
  const url: string | string[] = urls.length === 1 ? (urls[0] as string) : urls;
  const ver = v['mqtt-version'] === undefined ? undefined : numberFlag('mqtt-version', v['mqtt-version'], 5, { integer: true, min: 4, max: 5 });
  const password = v.password ?? process.env.EDGELORA_MQTT_PASSWORD;
  const keyFile = v['client-key'] ?? v['key-file'];
  return {
    url,
    ...(v.username !== undefined ? { username: v.username } : {}),
    ...(password !== undefined ? { password } : {}),
    ...(v.ca !== undefined ? { caFile: v.ca } : {}),
    ...(v.cert !== undefined ? { certFile: v.cert } : {}),
    ...(keyFile !== undefined ? { keyFile } : {}),
    ...(v.insecure ? { insecure: true } : {}),
    ...(ver === 4 || ver === 5 ? { protocolVersion: ver } : {}),
  };
}

/** Resolves when SIGINT or SIGTERM arrives. */
export function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const on = (s: NodeJS.Signals) => {
      process.off('SIGINT', on);
      process.off('SIGTERM', on);
      resolve(s);
    };
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
}
