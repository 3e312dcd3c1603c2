// The command table: one line per command file. main.ts dispatches on these names.
import type { Command } from '../command.js';
import { doctorCommand } from './doctor.js';
import { demoCommand } from './demo.js';
import { quantizeCommand } from './quantize.js';
import { generateCommand } from './generate.js';
import { evalCommand } from './eval.js';
import { demoModelCommand } from './demo-model.js';
import { finetuneCommand } from './finetune.js';
import { adapterInspectCommand, adapterMergeCommand } from './adapter.js';
import { hubCommand } from './hub.js';
import { agentCommand } from './agent.js';
import { publishCommand } from './publish.js';
import { fleetStatusCommand } from './fleet-status.js';
import { fleetCommandCommand } from './fleet-command.js';
import { fleetEnrollCommand, fleetRemoveCommand } from './fleet-enroll.js';
import { keygenCommand } from './keygen.js';
import { serveCommand } from './serve.js';
import { importGgufCommand, exportGgufCommand, adapterExportGgufCommand } from './gguf.js';
import { rolloutStartCommand, rolloutStatusCommand, rolloutPauseCommand, rolloutResumeCommand, rolloutAbortCommand } from './rollout.js';

export const commands: Command[] = [
  demoCommand,
  doctorCommand,
  quantizeCommand,
  generateCommand,
  evalCommand,
  demoModelCommand,
  finetuneCommand,
  adapterInspectCommand,
  adapterMergeCommand,
  hubCommand,
  agentCommand,
  publishCommand,
  fleetStatusCommand,
  fleetCommandCommand,
  fleetEnrollCommand,
  fleetRemoveCommand,
  keygenCommand,
  serveCommand,
  importGgufCommand,
  exportGgufCommand,
  adapterExportGgufCommand,
  rolloutStartCommand,
  rolloutStatusCommand,
  rolloutPauseCommand,
  rolloutResumeCommand,
  rolloutAbortCommand,
];
