// `edgelora keygen <out-prefix>`: makes the hub's Ed25519 signing key pair.
import { existsSync } from 'node:fs';
import type { Command } from '../command.js';
import { parseFlags, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { writeKeyPair } from '../../sync/protocol/signing.js';

export const keygenCommand: Command = {
  name: 'keygen',
  summary: 'make an Ed25519 key pair for signing adapter manifests (hub)',
  help: `Usage: edgelora keygen <out-prefix> [--force] [--json]

Writes <out-prefix>.key (PKCS#8 PEM private key, mode 0600: give it to \`edgelora hub --key\`)
and <out-prefix>.pub (SPKI PEM public key: give it to every \`edgelora agent --trust\`).

  --force   overwrite existing files
  --json    print {"key", "pub", "keyId"} as JSON`,
  async run(argv) {
    const { values, positionals, help } = parseFlags('keygen', argv, { force: { type: 'boolean' }, json: { type: 'boolean' } });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const prefix = requirePositional('keygen', 'out-prefix', positionals[0]);
    for (const f of [`${prefix}.key`, `${prefix}.pub`]) {
      if (existsSync(f) && !values.force) throw new EdgeloraError(`${f} exists`, { where: f, hint: 'pass --force to overwrite it' });
    }
    const r = await writeKeyPair(prefix);
    if (values.json) process.stdout.write(`${JSON.stringify({ key: r.keyFile, pub: r.pubFile, keyId: r.keyId })}\n`);
    else process.stdout.write(`wrote ${r.keyFile} (private, mode 0600) and ${r.pubFile}; key id ${r.keyId}\n`);
    return 0;
  },
};
