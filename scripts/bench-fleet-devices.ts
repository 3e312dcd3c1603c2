// Device worker of `npm run bench:fleet`: runs many light devices in one process: real edgelora
// Agents (their own MQTT connection each, chunks received, sha256-checked, written to a part file
// and installed), with no model (the default ValidatingActivator checks the files only). Driven by
// the parent over IPC: start a set of devices, report each activation's wall-clock time, stop.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createPublicKey } from 'node:crypto';
import { z } from 'zod';
import { Agent } from '../src/sync/agent/agent.ts';
import type { InboundHook } from '../src/sync/transport/mqtt.ts';
import { Rng } from '../src/util/rng.ts';

export const WorkerCommand = z.discriminatedUnion('cmd', [
  z.object({
    cmd: z.literal('start'),
    url: z.string(),
    fleet: z.string(),
    ids: z.array(z.string()),
    stateRoot: z.string(),
    trustedKeyPem: z.string(),
    fingerprint: z.string(),
    quietMs: z.number(),
    drop: z.number(),
    seed: z.number(),
  }),
  z.object({ cmd: z.literal('stop') }),
]);
export type WorkerCommand = z.infer<typeof WorkerCommand>;
export type WorkerEvent =
  | { ev: 'started'; n: number }
  | { ev: 'activated'; id: string; at: number }
  | { ev: 'stopped'; counters: { chunksReceived: number; chunksDuplicate: number; missingRequests: number } }
  | { ev: 'error'; message: string };

/** Drops each chunk message with probability `p` (seeded): a lossy last hop. */
function dropper(seed: number, p: number): InboundHook {
  const rng = new Rng(seed);
  return (topic, payload, deliver) => {
    if (topic.endsWith('/chunk') && rng.next() < p) return;
    deliver(topic, payload);
  };
}

const send = (e: WorkerEvent) => process.send?.(e);
let agents: Agent[] = [];

async function start(c: Extract<WorkerCommand, { cmd: 'start' }>): Promise<void> {
  const trustedKey = createPublicKey(c.trustedKeyPem);
  const fresh = c.ids.map(
    (id, i) =>
      new Agent({
        broker: { url: c.url, reconnectMs: 500 },
        deviceId: id,
        fleet: c.fleet,
        stateDir: path.join(c.stateRoot, id),
        trustedKey,
        modelFingerprint: c.fingerprint,
        quietMs: c.quietMs,
        statusIntervalMs: 5000,
        ...(c.drop > 0 ? { inbound: dropper(c.seed + i, c.drop) } : {}),
      }),
  );
  for (const a of fresh) a.on('activated', () => send({ ev: 'activated', id: a.deviceId, at: Date.now() }));
  // Connect in batches: a thousand CONNECTs at once only measures the accept queue.
  for (let i = 0; i < fresh.length; i += 50) await Promise.all(fresh.slice(i, i + 50).map((a) => a.start()));
  agents.push(...fresh);
  send({ ev: 'started', n: fresh.length });
}

async function stop(): Promise<void> {
  const counters = { chunksReceived: 0, chunksDuplicate: 0, missingRequests: 0 };
  for (const a of agents) {
    counters.chunksReceived += a.counters.chunksReceived;
    counters.chunksDuplicate += a.counters.chunksDuplicate;
    counters.missingRequests += a.counters.missingRequests;
  }
  await Promise.all(agents.map((a) => a.stop()));
  await Promise.all(agents.map((a) => fs.rm(a.opts.stateDir, { recursive: true, force: true })));
  agents = [];
  send({ ev: 'stopped', counters });
}

process.on('message', (raw: unknown) => {
  const r = WorkerCommand.safeParse(raw);
  if (!r.success) return send({ ev: 'error', message: `bad command: ${r.error.issues[0]?.message ?? ''}` });
  const c = r.data;
  (c.cmd === 'start' ? start(c) : stop()).catch((err: unknown) => send({ ev: 'error', message: (err as Error).message }));
  if (c.cmd === 'stop') process.once('disconnect', () => process.exit(0));
});
