// One refusal path and one dispatch for both roles: a message the hub or an agent will not act on is counted, kept
// as the last refusal (reported in the role's retained status), logged with its topic, and emitted
// as a 'refused' event. The sender gets no reply unless the role's protocol step has one (see
// docs/protocol.md, "Refusals"). Inbound messages reach a role's handlers through dispatch(): one
// table per role, one handler per message kind.
import { parseTopic, type ParsedTopic } from './topics.js';

export interface Refusal {
  at: string;
  reason: string;
  topic: string;
}

export class Refusals {
  count = 0;
  last: Refusal | null = null;
  constructor(
    private readonly now: () => Date,
    private readonly onRefused: (r: Refusal) => void,
  ) {}

  refuse(reason: string, topic: string): void {
    this.count++;
    this.last = { at: this.now().toISOString(), reason, topic };
    this.onRefused(this.last);
  }
}

/** A role's handler table: at most one handler per message kind (the kinds of parseTopic). */
export type Handlers<R> = { [K in ParsedTopic['kind']]?: (t: ParsedTopic & { kind: K }, payload: Buffer, topic: string) => R };

/** Routes one inbound message to its kind's handler; topics outside the table (or without a handler) are ignored. */
export function dispatch<R>(handlers: Handlers<R>, topic: string, payload: Buffer): R | undefined {
  const t = parseTopic(topic);
  if (!t) return undefined;
  const h = handlers[t.kind] as ((t: ParsedTopic, payload: Buffer, topic: string) => R) | undefined;
  return h?.(t, payload, topic);
}
