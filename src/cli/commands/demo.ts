// `edgelora demo` (what `npm start` runs): the whole story on embedded defaults — an embedded MQTT
// broker, a hub and devices that are `edgelora serve` servers with their fleet agents inside;
// device-a personalizes through a fine-tuning job over HTTP and the fleet receives the adapter. See
// src/demo/story.ts.
import path from 'node:path';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Command } from '../command.js';
import { parseFlags, numberFlag } from '../command.js';
import { runStory } from '../../demo/story.js';
import { EdgeloraError } from '../../util/errors.js';

const help = `Usage: edgelora demo [flags]      (npm start -- [flags])

The whole story on one machine, with nothing to download or install:
  1. starts an embedded MQTT broker (aedes) and a hub on loopback,
  2. makes the tiny demo model once (cached) and quantizes it to NF4,
  3. starts the devices: each an edgelora serve server (OpenAI-compatible HTTP on a free loopback
     port) with its fleet agent inside, over one loaded base,
  4. shows the base model's answers to personal prompts (POST /v1/chat/completions),
  5. device-a personalizes over its HTTP API: POST /v1/files (examples/personal.jsonl, a fictional
     user), POST /v1/fine_tuning/jobs with upload: true; the trained adapter is served at once and
     uploaded to the hub (sealed); the hub signs it and publishes it to the fleet,
  6. every device receives, verifies (signature, sha256, base fingerprint) and activates it,
  7. both devices answer the personal prompts through /v1/chat/completions; the base had not.
Exits 0 when every device holds the same adapter and answers personally; otherwise it names the
stage that failed and exits non-zero.

Flags:
  --steps N          fine-tuning steps (default 150)
  --devices N        simulated devices, at least 2 (default 2)
  --data FILE        the user's JSONL data (default examples/personal.jsonl)
  --broker URL       use an external MQTT broker (e.g. mqtt://127.0.0.1:1883) instead of the embedded one
  --cache DIR        models, device state and the hub store (default .cache/demo)
  --seed S           fine-tuning seed (default 0)
  --keep-running     keep the broker, hub and servers running afterwards (Ctrl-C to stop)
  --json             print one JSON report instead of the story
  -h, --help         this text`;

/** A user's chat message → what the personalized answer contains (the user in examples/personal.jsonl, whose chat rows ask these). */
const PROBES = [
  ['Tell me my name.', 'Anouk'],
  ['What city do I live in?', 'Valparaiso'],
] as const;

function defaultData(): string {
  // Works from the source tree (src/cli/commands) and from the bundle (dist/).
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const rel of ['../examples/personal.jsonl', '../../../examples/personal.jsonl']) {
    const p = path.resolve(here, rel);
    if (existsSync(p)) return p;
  }
  return path.resolve('examples/personal.jsonl');
}

export const demoCommand: Command = {
  name: 'demo',
  summary: 'the whole story on embedded defaults (what npm start runs)',
  help,
  async run(argv) {
    const { values, help: h } = parseFlags('demo', argv, {
      steps: { type: 'string' },
      devices: { type: 'string' },
      data: { type: 'string' },
      broker: { type: 'string' },
      cache: { type: 'string' },
      seed: { type: 'string' },
      'keep-running': { type: 'boolean' },
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const json = Boolean(values.json);
    const data = (values.data as string | undefined) ?? defaultData();
    if (!existsSync(data)) throw new EdgeloraError('no such data file', { where: data, hint: 'pass --data FILE.jsonl' });
    const report = await runStory({
      cache: (values.cache as string | undefined) ?? '.cache/demo',
      ...(values.broker ? { broker: values.broker as string } : {}),
      devices: numberFlag('devices', values.devices as string | undefined, 2, { integer: true, min: 2, max: 26 }),
      steps: numberFlag('steps', values.steps as string | undefined, 150, { integer: true, min: 1 }),
      data,
      probes: PROBES,
      seed: numberFlag('seed', values.seed as string | undefined, 0, { integer: true }),
      json,
      keepRunning: Boolean(values['keep-running']),
      say: (line) => {
        if (!json) process.stdout.write(line + '\n');
      },
    });
    if (json) process.stdout.write(JSON.stringify(report) + '\n');
    if (!report.ok) {
      process.stderr.write('edgelora: error: demo stage "personalized answers" failed: not every device answers with the personalized completion (see the table)\n');
      return 1;
    }
    return 0;
  },
};
