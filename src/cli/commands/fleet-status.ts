// `edgelora fleet status`: every device's retained status (online, active adapter, transfer, last error),
// and with --store how its announced X25519 key compares with its enrolment.
import type { Command } from '../command.js';
import { numberFlag, parseFlags } from '../command.js';
import { Operator } from '../../sync/operator.js';
import { brokerFlags, brokerHelp, brokerOptions } from '../broker-flags.js';
import { keyState, readEnrolments } from '../../sync/hub/enrolment.js';

export const fleetStatusCommand: Command = {
  name: 'fleet status',
  summary: 'show every device: online, active adapter, transfer progress, last error',
  help: `Usage: edgelora fleet status --broker <url> [--store <hub-store>] [--json] [--wait-ms <ms>]

Reads the retained status each agent publishes (and the hub's). A device whose agent died
shows "offline" (its last will).

  --store <dir>      the hub's store: adds KEY (enrolled, UNENROLLED, CHANGED: announces another key
                     than the one enrolled, no-key) and lists enrolled devices that never reported
  --wait-ms <ms>     how long to collect retained statuses (default 1000)
  --timeout-ms <ms>  how long to wait for the broker (default 30000; a refused connection fails at once)
  --client-id <id>   MQTT client id (default: --username, else op-<random>)
  --json             print {"hub", "devices", "invalid"} as JSON
  -h, --help         this text

${brokerHelp}`,
  async run(argv) {
    const { values: v, help } = parseFlags('fleet status', argv, {
      ...brokerFlags,
      'wait-ms': { type: 'string' },
      store: { type: 'string' },
      'timeout-ms': { type: 'string' },
      'client-id': { type: 'string' },
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const op = await Operator.open({
      broker: brokerOptions('fleet status', v),
      ...(v['client-id'] ? { clientId: v['client-id'] } : {}),
      timeoutMs: numberFlag('timeout-ms', v['timeout-ms'], 30_000, { positive: true }),
    });
    try {
      const snap = await op.fleetStatus(numberFlag('wait-ms', v['wait-ms'], 1000, { min: 0 }));
      const enrolled = v.store ? await readEnrolments(v.store) : null;
      const keys = enrolled ? Object.fromEntries(snap.devices.map((d) => [d.deviceId, keyState(d, enrolled)])) : null;
      const silent = enrolled ? [...enrolled.keys()].filter((id) => !snap.devices.some((d) => d.deviceId === id)) : [];
      if (v.json) {
        process.stdout.write(`${JSON.stringify(keys ? { ...snap, keys, enrolledSilent: silent } : snap)}\n`);
        return 0;
      }
      const hub = snap.hub ? `${snap.hub.online ? 'online' : 'offline'} (key ${snap.hub.keyId ?? '?'})` : 'no status';
      const rows = [['DEVICE', 'STATE', 'FLEET/GROUP', 'KEY', 'ACTIVE', 'TRANSFER', 'LAST ERROR']];
      const label = { enrolled: 'enrolled', unenrolled: 'UNENROLLED', changed: 'CHANGED', 'no-key': 'no-key' } as const;
      for (const d of snap.devices) {
        const k = keys?.[d.deviceId];
        rows.push([
          d.deviceId,
          d.online ? d.state : 'offline',
          `${d.fleet ?? '-'}${d.group ? `/${d.group}` : ''}`,
          `${k ? `${label[k]} ` : ''}${d.encKey?.keyId ?? '-'}`,
          d.active ? `${d.active.id} v${d.active.version}` : '-',
          d.transfer ? `${d.transfer.adapter.id} v${d.transfer.adapter.version} ${d.transfer.received}/${d.transfer.total}` : '-',
          d.lastError ? d.lastError.reason.slice(0, 80) : '-',
        ]);
      }
      const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
      process.stdout.write(`hub: ${hub}; ${snap.devices.length} device(s)\n`);
      for (const r of rows) process.stdout.write(`${r.map((c, i) => c.padEnd(w[i] ?? 0)).join('  ').trimEnd()}\n`);
      for (const id of silent) process.stdout.write(`enrolled but no status: ${id}\n`);
      for (const [id, why] of Object.entries(snap.invalid)) process.stdout.write(`invalid status from ${id}: ${why}\n`);
      return 0;
    } finally {
      await op.close();
    }
  },
};
