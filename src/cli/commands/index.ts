// The command table: one line per command file. main.ts dispatches on these names.
import type { Command } from '../command.js';

export const commands: Command[] = [];
