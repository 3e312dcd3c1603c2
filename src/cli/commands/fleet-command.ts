// `edgelora fleet command`: has the hub send a signed command to one device (rollback, activate,
// deactivate, upload) and prints the device's result.
import type { Command } from '../command.js';
import { numberFlag, parseFlags, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { Operator } from '../../sync/operator.js';
import { CommandAction } from '../../sync/protocol/messages.js';
import { checkName } from '../../sync/protocol/topics.js';
import { brokerFlags, brokerHelp, brokerOptions } from '../broker-flags.js';

/** Parses --adapter ID or ID@VERSION. */
function adapterSpec(raw: string): { id: string; version?: number } {
  const m = /^([^@]+)(?:@(\d+))?$/.exec(raw);
  if (!m) throw new EdgeloraError(`--adapter ${raw}: expected ID or ID@VERSION`, { where: '--adapter' });
  const id = checkName('adapter id', m[1] ?? '');
  return m[2] === undefined ? { id } : { id, version: numberFlag('adapter', m[2], 1, { integer: true, min: 1 }) };
}

export const fleetCommandCommand: Command = {
  name: 'fleet command',
  summary: 'send a device a command through the hub: rollback, activate, deactivate, upload',
  help: `Usage: edgelora fleet command <device-id> rollback|activate|deactivate|upload --broker <url>
                              [--adapter <id>[@<version>]] [--timeout-ms <ms>] [--json]

The hub signs the command and relays the device's result. Exits 0 when the device reports success.

  rollback               re-activate the previous adapter
  activate               activate an installed adapter (needs --adapter; without @version: the newest)
  deactivate             run the base model without an adapter
  upload                 upload an installed adapter (default: the active one) to the hub's store;
                         the result names its sha256 (publish it with \`edgelora publish <sha256>\`)
  --adapter <id>[@<v>]   which installed adapter (activate, upload)
  --client-id <id>       MQTT client id (default: --username, else op-<random>)
  --timeout-ms <ms>      how long to wait for the broker and the hub's reply (default 30000)
  --json                 print the hub's reply as JSON

${brokerHelp}`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('fleet command', argv, {
      ...brokerFlags,
      adapter: { type: 'string' },
      'client-id': { type: 'string' },
      'timeout-ms': { type: 'string' },
      json: { type: 'boolean' },
    });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const deviceId = checkName('device id', requirePositional('fleet command', 'device-id', positionals[0]));
    const rawAction = requirePositional('fleet command', 'rollback|activate|deactivate|upload', positionals[1]);
    const parsed = CommandAction.safeParse(rawAction);
    if (!parsed.success) throw new EdgeloraError(`unknown action "${rawAction}"`, { where: 'edgelora fleet command', hint: 'use rollback, activate, deactivate or upload' });
    const action = parsed.data;
    const adapter = v.adapter === undefined ? undefined : adapterSpec(v.adapter);
    if (action === 'activate' && !adapter) throw new EdgeloraError('activate needs --adapter <id>[@<version>]', { where: 'edgelora fleet command' });
    const op = await Operator.open({
      broker: brokerOptions('fleet command', v),
      ...(v['client-id'] ? { clientId: v['client-id'] } : {}),
      timeoutMs: numberFlag('timeout-ms', v['timeout-ms'], 30_000, { positive: true }),
    });
    try {
      const reply = await op.command(deviceId, action, adapter);
      if (v.json) process.stdout.write(`${JSON.stringify(reply)}\n`);
      else {
        const r = reply.result;
        const active = r?.active ? `${r.active.id} v${r.active.version}` : 'none';
        if (reply.ok) process.stdout.write(`${deviceId}: ${action} done; active: ${active}${r?.uploaded ? `; uploaded sha256 ${r.uploaded}` : ''}\n`);
        else process.stderr.write(`edgelora fleet command: ${deviceId}: ${action} failed: ${reply.error ?? 'no reason given'}${r ? ` (active: ${active})` : ''}\n`);
      }
      return reply.ok ? 0 : 1;
    } finally {
      await op.close();
    }
  },
};
