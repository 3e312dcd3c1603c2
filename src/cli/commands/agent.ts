// `edgelora agent`: runs the device agent that receives, verifies, installs and activates adapters.
import path from 'node:path';
import type { Command } from '../command.js';
import { numberFlag, parseFlags, requireFlag } from '../command.js';
import { Agent } from '../../sync/agent/agent.js';
import { sanitizeName } from '../../sync/hub/hub.js';
import { loadHubKeys } from '../hub-keys.js';
import { brokerFlags, brokerHelp, brokerOptions, untilSignal } from '../broker-flags.js';
import { ModelRuntime } from '../../runtime/model.js';
import { AdapterManager } from '../../adapters/manager.js';
import { RuntimeActivator } from '../../adapters/activator.js';

export const agentCommand: Command = {
  name: 'agent',
  summary: 'run a device agent: receive, verify, install and activate adapters',
  help: `Usage: edgelora agent --broker <url> --device-id <id> --fleet <name> [--group <name>]
                      --state <dir> --trust <hub-public-key-file> [--model <quantized-dir>] [flags]

Runs until SIGINT/SIGTERM. Installed adapters are PEFT directories under <state>/adapters/; a
killed agent resumes its download from <state>/transfer/. At first start the agent makes its
X25519 key <state>/device.x25519.key (mode 0600) and announces the public key in its status; the
hub seals adapters to it once an operator ran \`edgelora fleet enroll <device-id>\`.

  --device-id <id>           this device's id (with the shipped ACL also its MQTT user name)
  --fleet <name>             fleet to follow
  --group <name>             group to follow (optional)
  --state <dir>              state directory (created when missing)
  --trust <file>             the hub's public key (.pub from \`edgelora keygen\`)
  --hub-enc-key <file>       the hub's X25519 public key, to seal --upload to (default: <trust prefix>.x25519.pub
                             beside --trust, when it exists; upload commands from the hub carry it signed)
  --allow-plaintext          let an upload go in clear when no hub X25519 key is known (default: refused)
  --model <dir>              quantized model directory: adapters for another base model are refused,
                             accepted ones are loaded into this model's runtime
  --upload <adapter-dir>     upload this adapter directory to the hub after connecting
  --upload-name <name>       adapter id for --upload (default: the directory name)
  --quiet-ms <ms>            silence before asking for missing chunks (default 2000)
  --status-interval-ms <ms>  least time between progress status messages (default 1000)
  --quiet                    no log lines on stderr
  -h, --help                 this text

${brokerHelp}`,
  async run(argv) {
    const { values: v, help } = parseFlags('agent', argv, {
      ...brokerFlags,
      'device-id': { type: 'string' },
      fleet: { type: 'string' },
      group: { type: 'string' },
      state: { type: 'string' },
      trust: { type: 'string' },
      'hub-enc-key': { type: 'string' },
      'allow-plaintext': { type: 'boolean' },
      model: { type: 'string' },
      upload: { type: 'string' },
      'upload-name': { type: 'string' },
      'quiet-ms': { type: 'string' },
      'status-interval-ms': { type: 'string' },
      quiet: { type: 'boolean' },
    }, { positionals: [] });
    if (help) {
      process.stdout.write(`${this.help}\n`);
      return 0;
    }
    // Every flag and the trusted key are checked before the model is loaded.
    const deviceId = requireFlag('agent', 'device-id', v['device-id']);
    const fleet = requireFlag('agent', 'fleet', v.fleet);
    const stateDir = requireFlag('agent', 'state', v.state);
    const trustFile = requireFlag('agent', 'trust', v.trust);
    const { trustedKey, hubEncKey } = await loadHubKeys(trustFile, v['hub-enc-key']);
    const broker = brokerOptions('agent', v);
    const quietMs = numberFlag('quiet-ms', v['quiet-ms'], 2000, { min: 10 });
    const statusIntervalMs = numberFlag('status-interval-ms', v['status-interval-ms'], 1000, { min: 0 });
    const log = v.quiet ? undefined : (line: string) => process.stderr.write(`${line}\n`);
    // With --model, accepted adapters are loaded into the runtime (shapes, NaN/Inf and the base
    // fingerprint checked by the adapter loader); a failure there rolls the device back.
    const model = v.model ? await ModelRuntime.load(v.model) : null;
    const agent = new Agent({
      broker,
      deviceId,
      fleet,
      ...(v.group ? { group: v.group } : {}),
      stateDir,
      trustedKey,
      ...(hubEncKey ? { hubEncKey } : {}),
      ...(v['allow-plaintext'] ? { allowPlaintext: true } : {}),
      modelFingerprint: model ? model.manifest.fingerprint : null,
      modelSourceFingerprint: model?.manifest.sourceFingerprint ?? null,
      ...(model ? { activator: new RuntimeActivator(new AdapterManager(model)) } : {}),
      quietMs,
      statusIntervalMs,
      ...(log ? { log } : {}),
    });
    await agent.start();
    if (v.upload) {
      const name = v['upload-name'] ?? sanitizeName(path.basename(path.resolve(v.upload)));
      const sha = await agent.uploadDir(v.upload, name);
      log?.(`[${deviceId}] uploaded ${name}: sha256 ${sha}`);
    }
    const sig = await untilSignal();
    log?.(`[${deviceId}] ${sig}, stopping`);
    await agent.stop();
    await model?.release();
    return 0;
  },
};
