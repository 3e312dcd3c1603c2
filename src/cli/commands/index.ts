// The command table: one line per command file. main.ts dispatches on these names.
import type { Command } from '../command.js';
import { doctorCommand } from './doctor.js';
import { demoCommand } from './demo.js';
import { quantizeCommand } from './quantize.js';
import { generateCommand } from './generate.js';
import { evalCommand } from './eval.js';
import { demoModelCommand } from './demo-model.js';
import { adapterInspectCommand, adapterMergeCommand } from './adapter.js';

export const commands: Command[] = [
  demoCommand,
  doctorCommand,
  quantizeCommand,
  generateCommand,
  evalCommand,
  demoModelCommand,
  adapterInspectCommand,
  adapterMergeCommand,
];
