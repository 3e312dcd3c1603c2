// `edgelora keygen <out-prefix>`: makes the hub's Ed25519 signing key pair and its X25519
// encryption key pair (devices seal uploads to it), refusing to leave a private key where
// `git add .` would pick it up.
import { existsSync, promises as fs } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import type { Command } from '../command.js';
import { parseFlags, requirePositional } from '../command.js';
import { EdgeloraError } from '../../util/errors.js';
import { writeKeyPair } from '../../sync/protocol/signing.js';
import { writeEncKeyPair } from '../../sync/protocol/envelope.js';

/** The git work tree `dir` lies in (the nearest ancestor holding .git), or null. */
function gitWorkTree(dir: string): string | null {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    if (existsSync(path.join(d, '.git'))) return d;
    if (path.dirname(d) === d) return null;
  }
}

/**
 * Whether git ignores `file` (any .gitignore, .git/info/exclude or global excludes). Without a
 * git binary to ask, nothing counts as ignored: the caller then refuses, which is the safe side.
 */
function gitIgnores(file: string): boolean {
  try {
    execFileSync('git', ['check-ignore', '-q', '--', path.basename(file)], { cwd: path.dirname(file), stdio: 'ignore' });
    return true; // exit 0: ignored
  } catch {
    return false; // exit 1: not ignored; 128 or no git: unknown
  }
}

export const keygenCommand: Command = {
  name: 'keygen',
  summary: "make the hub's keys: Ed25519 for signing manifests, X25519 for sealed uploads",
  help: `Usage: edgelora keygen <out-prefix> [--force] [--allow-work-tree] [--json]

Writes <out-prefix>.key (PKCS#8 PEM private key, mode 0600: give it to \`edgelora hub --key\`)
and <out-prefix>.pub (SPKI PEM public key: give it to every \`edgelora agent --trust\`), and the
hub's X25519 pair <out-prefix>.x25519.key (0600, \`edgelora hub\` finds it beside --key) and
<out-prefix>.x25519.pub (agents find it beside --trust): devices seal their uploads to it.
The directory of <out-prefix> is created (mode 0700) when missing, e.g. \`edgelora keygen keys/hub\`.
Inside a git work tree the private key is written only where .gitignore covers it (e.g. *.key),
so that it is never committed by accident.

  --force             overwrite existing files
  --allow-work-tree   write the private key inside a git work tree even where git does not ignore it
  --json              print {"key", "pub", "keyId", "encKey", "encPub", "encKeyId"} as JSON
  -h, --help          this text`,
  async run(argv) {
    const { values, positionals, help } = parseFlags(
      'keygen',
      argv,
      { force: { type: 'boolean' }, 'allow-work-tree': { type: 'boolean' }, json: { type: 'boolean' } },
      { positionals: ['out-prefix'] },
    );
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    const prefix = requirePositional('keygen', 'out-prefix', positionals[0]);
    const keyFile = `${prefix}.key`;
    for (const f of [keyFile, `${prefix}.pub`, `${prefix}.x25519.key`, `${prefix}.x25519.pub`]) {
      if (existsSync(f) && !values.force) throw new EdgeloraError(`${f} exists`, { where: f, hint: 'pass --force to overwrite it' });
    }
    const dir = path.dirname(path.resolve(keyFile));
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const tree = gitWorkTree(dir);
    const unignored = tree === null ? undefined : [keyFile, `${prefix}.x25519.key`].find((f) => !gitIgnores(path.resolve(f)));
    if (tree !== null && !values['allow-work-tree'] && unignored !== undefined) {
      throw new EdgeloraError(`would write the hub's private key inside the git work tree ${tree}, where git does not ignore it`, {
        where: unignored,
        hint: 'write it outside the repository (e.g. ~/.config/edgelora/hub), add *.key to .gitignore, or pass --allow-work-tree',
      });
    }
    const r = await writeKeyPair(prefix);
    const e = await writeEncKeyPair(`${prefix}.x25519`);
    if (values.json) process.stdout.write(`${JSON.stringify({ key: r.keyFile, pub: r.pubFile, keyId: r.keyId, encKey: e.keyFile, encPub: e.pubFile, encKeyId: e.keyId })}\n`);
    else process.stdout.write(`wrote ${r.keyFile} (private, mode 0600) and ${r.pubFile}; key id ${r.keyId}\nwrote ${e.keyFile} (private, mode 0600) and ${e.pubFile}; X25519 key id ${e.keyId}\n`);
    return 0;
  },
};
