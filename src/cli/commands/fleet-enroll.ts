// `edgelora fleet enroll <device-id>` and `edgelora fleet remove <device-id>`: the operator's say
// over which device keys the hub seals adapters to (<store>/enrolled.json). Enrol records the key
// the device announces in its retained status (checked against --expect-key-id when given) or
// imports a key file; remove leaves the device out of every later publication.
import type { Command } from '../command.js';
import { numberFlag, parseFlags, requireFlag, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { Operator } from '../../sync/operator.js';
import { brokerFlags, brokerHelp, brokerOptions } from '../broker-flags.js';
import { enroll, enrolmentFromStatus, EnrolmentSchema, readEnrolments, unenroll, type Enrolment } from '../../sync/hub/enrolment.js';
import { loadEncPublicKey } from '../../sync/protocol/envelope.js';
import { checkName } from '../../sync/protocol/topics.js';

export const fleetEnrollCommand: Command = {
  name: 'fleet enroll',
  summary: "trust a device's X25519 key: the hub seals adapters for its fleet to it",
  help: `Usage: edgelora fleet enroll <device-id> --store <hub-store> --broker <url> [--expect-key-id <id>] [flags]
       edgelora fleet enroll <device-id> --store <hub-store> --device-key <file.pub> --fleet <name> [--group <name>]

Records the device's key in <hub-store>/enrolled.json (the hub re-reads it at every publication).
With --broker it takes the key the device announces in its retained status; compare its key id
with the one the device's own log printed (or pass --expect-key-id) before you trust it. With
--device-key it imports an X25519 public key file instead, e.g. one provisioned at manufacture.
  --store <dir>            the hub's store directory
  --expect-key-id <id>     refuse unless the announced key has this id (16 hex digits)
  --device-key <file>      import this SPKI PEM X25519 public key instead of the announced one
  --fleet <name>           fleet to enrol it into (default: the fleet its status names)
  --group <name>           group (default: the group its status names)
  --wait-ms <ms>           how long to wait for the retained status (default 2000)
  --timeout-ms <ms>        how long to wait for the broker (default 30000)
  --client-id <id>         MQTT client id (default: --username, else op-<random>)
  --json                   print the enrolment as JSON
  -h, --help               this text
${brokerHelp}`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('fleet enroll', argv, {
      ...brokerFlags,
      store: { type: 'string' },
      'expect-key-id': { type: 'string' },
      'device-key': { type: 'string' },
      fleet: { type: 'string' },
      group: { type: 'string' },
      'wait-ms': { type: 'string' },
      'timeout-ms': { type: 'string' },
      'client-id': { type: 'string' },
      json: { type: 'boolean' },
    }, { positionals: ['device-id'] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const deviceId = checkName('device id', requirePositional('fleet enroll', 'device-id', positionals[0]));
    const store = requireFlag('fleet enroll', 'store', v.store);
    let e: Enrolment;
    if (v['device-key']) {
      const k = await loadEncPublicKey(v['device-key']);
      e = EnrolmentSchema.parse({
        deviceId,
        key: { alg: 'x25519', keyId: k.keyId, pub: k.raw.toString('base64') },
        fleet: checkName('fleet name', requireFlag('fleet enroll', 'fleet', v.fleet)),
        group: v.group ? checkName('group name', v.group) : null,
        enrolledAt: new Date().toISOString(),
        source: `file:${v['device-key']}`,
      });
    } else {
      const op = await Operator.open({
        broker: brokerOptions('fleet enroll', v),
        ...(v['client-id'] ? { clientId: v['client-id'] } : {}),
        timeoutMs: numberFlag('timeout-ms', v['timeout-ms'], 30_000, { positive: true }),
      });
      try {
        const st = await op.deviceStatus(deviceId, numberFlag('wait-ms', v['wait-ms'], 2000, { min: 0 }));
        if (!st) throw new EdgeloraError(`no retained status from device ${deviceId}`, { where: op.link.url, hint: 'start its agent once (it announces its key), or import its key with --device-key' });
        e = enrolmentFromStatus(st, { ...(v.fleet ? { fleet: checkName('fleet name', v.fleet) } : {}), ...(v.group ? { group: checkName('group name', v.group) } : {}) });
      } finally {
        await op.close();
      }
    }
    if (v['expect-key-id'] && v['expect-key-id'] !== e.key.keyId) {
      throw new EdgeloraError(`device ${deviceId} announces key ${e.key.keyId}, not ${v['expect-key-id']}`, { where: deviceId, hint: 'someone else may be publishing as this device: check the key id its agent logged at start' });
    }
    const before = (await readEnrolments(store)).get(deviceId);
    await enroll(store, e);
    if (v.json) process.stdout.write(`${JSON.stringify(e)}\n`);
    else {
      const was = before ? (before.key.keyId === e.key.keyId ? ' (again, same key)' : ` (replacing key ${before.key.keyId})`) : '';
      process.stdout.write(`enrolled ${deviceId} in fleet ${e.fleet}${e.group ? `/${e.group}` : ''} with X25519 key ${e.key.keyId}${was}; publications from now on are sealed for it\n`);
    }
    return 0;
  },
};

export const fleetRemoveCommand: Command = {
  name: 'fleet remove',
  summary: 'revoke a device: later publications are no longer sealed for it',
  help: `Usage: edgelora fleet remove <device-id> --store <hub-store>

Removes the device from <hub-store>/enrolled.json. What it already received stays readable to it;
the next publication to each of its targets leaves it out: publish again to revoke now.
  --store <dir>   the hub's store directory
  -h, --help      this text`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('fleet remove', argv, { store: { type: 'string' } }, { positionals: ['device-id'] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const deviceId = checkName('device id', requirePositional('fleet remove', 'device-id', positionals[0]));
    const had = await unenroll(requireFlag('fleet remove', 'store', v.store), deviceId);
    if (!had) throw new EdgeloraError(`device ${deviceId} is not enrolled`, { where: v.store, hint: 'see `edgelora fleet status --store <dir>`' });
    process.stdout.write(`removed ${deviceId}; publish again to its fleet/group so that it is left out of the current adapter\n`);
    return 0;
  },
};
