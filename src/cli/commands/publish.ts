// `edgelora publish`: sends an adapter to a fleet, group or device through the hub (the hub signs).
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Command } from '../command.js';
import { numberFlag, parseFlags, requireFlag, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { Operator } from '../../sync/operator.js';
import { sanitizeName } from '../../sync/hub/hub.js';
import { parseTarget } from '../../sync/protocol/topics.js';
import { brokerFlags, brokerHelp, brokerOptions } from '../broker-flags.js';

export const publishCommand: Command = {
  name: 'publish',
  summary: 'publish an adapter (a directory, or one the hub stored) to a fleet, group or device',
  help: `Usage: edgelora publish <adapter-dir | stored-sha256> --broker <url> --to fleet:<name>|group:<name>|device:<id>
                        [--name <adapter-name>] [--json]

An adapter directory is uploaded to the hub first (resumable, acknowledged segments); a sha256 (or
a unique prefix of at least 8 hex digits, e.g. from a device upload) names a blob the hub already
stores. The hub signs the manifest with its key and broadcasts the adapter; this command returns
once the hub has published it (devices then download in the background: see \`edgelora fleet status\`).

  --to <target>          fleet:<name>, group:<name> or device:<id>; a device the broker holds no
                         status of (it never connected) is refused unless --force
  --name <adapter-name>  adapter id (default: the directory name, or the name the blob was stored with)
  --client-id <id>       MQTT client id (default: --username, else op-<random>)
  --timeout-ms <ms>      how long to wait for the broker and each reply of the hub (default 30000);
                         fails at once when the broker refuses the connection or the hub's status says offline
  --force                publish to a device target even if no such device has reported
  --json                 print the hub's reply as JSON
  -h, --help             this text

${brokerHelp}`,
  async run(argv) {
    const { values: v, positionals, help } = parseFlags('publish', argv, {
      ...brokerFlags,
      to: { type: 'string' },
      name: { type: 'string' },
      'client-id': { type: 'string' },
      'timeout-ms': { type: 'string' },
      json: { type: 'boolean' },
      force: { type: 'boolean' },
    }, { positionals: ['adapter-dir | stored-sha256'] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const source = requirePositional('publish', 'adapter-dir | stored-sha256', positionals[0]);
    const target = parseTarget(requireFlag('publish', 'to', v.to));
    const isDir = await fs.stat(source).then((s) => s.isDirectory(), () => false);
    const id = source.replace(/^sha256:/, '');
    if (!isDir && !/^[0-9a-f]{8,64}$/.test(id)) {
      throw new EdgeloraError(`${source} is neither a directory nor a sha256`, { where: 'publish', hint: 'pass an adapter directory or the sha256 the hub reported for an upload' });
    }
    const op = await Operator.open({
      broker: brokerOptions('publish', v),
      ...(v['client-id'] ? { clientId: v['client-id'] } : {}),
      timeoutMs: numberFlag('timeout-ms', v['timeout-ms'], 30_000, { positive: true }),
    });
    try {
      if (target.kind === 'device' && !v.force && (await op.deviceStatus(target.name, 1000)) === null) {
        throw new EdgeloraError(`no device "${target.name}" has ever reported to this broker`, {
          where: '--to',
          hint: 'check the device id (see `edgelora fleet status`), or pass --force to publish for a device that has not connected yet',
        });
      }
      let sha = id;
      if (isDir) {
        const name = v.name ?? sanitizeName(path.basename(path.resolve(source)));
        sha = await op.uploadDir(source, name);
        if (!v.json) process.stderr.write(`uploaded ${source} to the hub: sha256 ${sha}\n`);
      }
      const reply = await op.publish(sha, target, v.name);
      if (v.json) process.stdout.write(`${JSON.stringify(reply)}\n`);
      else if (reply.ok && reply.manifest) {
        const m = reply.manifest;
        process.stdout.write(`published ${m.adapter.id} v${m.adapter.version} (seq ${m.seq}, sha256 ${m.sha256.slice(0, 12)}) to ${m.target.kind}:${m.target.name}\n`);
      } else process.stderr.write(`edgelora publish: the hub refused: ${reply.error ?? 'no reason given'}\n`);
      return reply.ok ? 0 : 1;
    } finally {
      await op.close();
    }
  },
};
