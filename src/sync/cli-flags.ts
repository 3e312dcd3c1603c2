// Broker connection flags shared by the hub, agent, publish and fleet status commands: they map
// one to one onto BrokerOptions (and so onto mqtt.js's credentials and TLS options).
import type { FlagSpec } from '../cli/command.js';
import { numberFlag } from '../cli/command.js';
import { EdgeloraError } from '../util/errors.js';
import type { BrokerOptions } from './mqtt.js';

export const brokerFlags = {
  broker: { type: 'string' },
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
  --broker <url>         mqtt://host:port, mqtts://host:port (TLS), ws:// or wss://
  --username <name>      MQTT user name (with the shipped ACL: the device id, "hub" or "operator")
  --password <secret>    MQTT password (or set EDGELORA_MQTT_PASSWORD)
  --ca <file>            PEM CA certificate that signed the broker's certificate
  --cert <file>          PEM client certificate (mutual TLS)
  --client-key <file>    PEM client private key (mutual TLS)
  --key-file <file>      the same as --client-key
  --insecure             accept a broker certificate that does not verify (testing only)
  --mqtt-version <4|5>   protocol: 5 (default; falls back to 3.1.1 when the broker refuses 5) or 4`;

type BrokerValues = { [K in keyof typeof brokerFlags]?: (typeof brokerFlags)[K]['type'] extends 'boolean' ? boolean : string };

export function brokerOptions(command: string, v: BrokerValues, fallbackUrl?: string): BrokerOptions {
  const url = v.broker ?? fallbackUrl;
  if (!url) throw new EdgeloraError('missing --broker', { where: `edgelora ${command}`, hint: 'pass --broker mqtt://host:1883' });
  if (!/^(mqtts?|wss?|tcp|tls):\/\//.test(url)) throw new EdgeloraError(`not a broker URL: ${url}`, { where: '--broker', hint: 'write mqtt://host:port or mqtts://host:port' });
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
