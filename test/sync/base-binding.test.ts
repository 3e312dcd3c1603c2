// The fleet's base check follows the adapter rule (src/model/base-identity.ts): a device takes a
// publication for its source model trained on another quantization (and logs a note), refuses one for
// another source model and one from before source binding for another quantization, each naming its
// case; the manifest carries `baseSourceFingerprint` from the adapter's edgelora_adapter.json. Real
// Mosquitto, real hub and agent.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Agent } from '../../src/sync/agent/agent.ts';
import { Hub } from '../../src/sync/hub/hub.ts';
import { generateSigningKey } from '../../src/sync/protocol/signing.ts';
import { ManifestSchema } from '../../src/sync/protocol/messages.ts';
import { Mosquitto, RecordingActivator, makeAdapter, testAgentOptions, tmpDir, waitFor } from './helpers.ts';

const key = generateSigningKey();
let mosq: Mosquitto;
const work = tmpDir('base-binding');

// This device runs the int4 quantization (INT4) of source model SRC.
const SRC = 'c'.repeat(64);
const INT4 = 'a'.repeat(64);
const NF4 = 'b'.repeat(64);

before(async () => {
  mosq = await Mosquitto.start();
});
after(async () => {
  await mosq.stop();
  await fs.rm(work, { recursive: true, force: true });
});

/** A small adapter bound like one finetune wrote on a base with these fingerprints. */
async function boundAdapter(name: string, seed: number, base: string, source: string | null): Promise<string> {
  const dir = await makeAdapter(path.join(work, 'src', name), { seed, baseFingerprint: base });
  if (source) {
    await fs.writeFile(
      path.join(dir, 'edgelora_adapter.json'),
      JSON.stringify({ format: 'edgelora-adapter/1', base_fingerprint: base, source_fingerprint: source, quantization: 'nf4, block 64, float table' }),
    );
  }
  return dir;
}

test('an agent accepts a publication for its source model at another quantization and refuses another source model', async () => {
  const hub = new Hub({ allowPlaintext: true, broker: { url: mosq.url }, storeDir: path.join(work, 'store'), key, chunkSize: 2048, coalesceMs: 50 });
  await hub.start();
  const lines: string[] = [];
  const activator = new RecordingActivator();
  const agent = new Agent(
    testAgentOptions({ url: mosq.url, stateRoot: work, trustedKey: key.publicKey }, 'dev1', 'fb', { modelFingerprint: INT4, modelSourceFingerprint: SRC, activator, log: (l) => lines.push(l) }),
  );
  try {
    await agent.start();
    const fleet = { kind: 'fleet', name: 'fb' } as const;

    // Trained on nf4 of the same source: the manifest names the source, the device takes it with a note.
    const sameSource = await hub.publishDir(await boundAdapter('same-source', 1, NF4, SRC), fleet, 'style');
    assert.equal(sameSource.baseFingerprint, NF4);
    assert.equal(sameSource.baseSourceFingerprint, SRC);
    await waitFor('dev1 activated the nf4-trained adapter', () => agent.active?.sha256 === sameSource.blob.sha256);
    const notes = lines.filter((l) => l.includes('note:'));
    assert.equal(notes.length, 1, `one note line: ${lines.join('\n')}`);
    assert.match(notes[0]!, /note: adapter style v1 was trained on .*bbbbbbbbbbbbbbbb.* same source model cccccccccccccccc/);
    assert.equal(activator.activations.length, 1);

    // Another source model: refused, naming the case; the active adapter stays.
    const rejected = agent.counters.rejected;
    await hub.publishDir(await boundAdapter('other-source', 2, 'd'.repeat(64), 'e'.repeat(64)), fleet, 'other');
    await waitFor('refusal of another source model', () => agent.counters.rejected > rejected);
    assert.match(agent.status().lastError?.reason ?? '', /manifest refused: adapter other v1 is for base model d{64}, this device runs a{64}: a different source model/);
    assert.equal(agent.active?.sha256, sameSource.blob.sha256);

    // From before source binding, for another quantization: refused as undecidable, saying so.
    const rejected2 = agent.counters.rejected;
    const legacy = await hub.publishDir(await boundAdapter('legacy', 3, NF4, null), fleet, 'legacy');
    assert.equal(legacy.baseSourceFingerprint, undefined, 'no source field for an adapter without one');
    await waitFor('refusal of a legacy adapter for another quantization', () => agent.counters.rejected > rejected2);
    assert.match(agent.status().lastError?.reason ?? '', /predates source-model binding/);
    assert.equal(agent.active?.sha256, sameSource.blob.sha256);
    assert.equal(activator.activations.length, 1, 'no refused publication was activated');

    // A legacy adapter for this very quantization still installs, as before.
    const exact = await hub.publishDir(await boundAdapter('exact', 4, INT4, null), fleet, 'exact');
    await waitFor('dev1 activated the exact-base legacy adapter', () => agent.active?.sha256 === exact.blob.sha256);
  } finally {
    await agent.stop();
    await hub.stop();
  }
});

test('a manifest from before baseSourceFingerprint still parses; one with a malformed field is a schema violation', () => {
  const m = {
    type: 'manifest',
    v: 1,
    seq: 1,
    target: { kind: 'fleet', name: 'f' },
    adapter: { id: 'a', version: 1 },
    blob: { format: 'edgelora-pack/1', sha256: 'f'.repeat(64), size: 10, chunkSize: 65536, chunks: 1, chunkSha256: ['f'.repeat(64)] },
    baseFingerprint: NF4,
    lora: { rank: 4, alpha: 8, targets: ['q_proj'] },
    createdAt: new Date().toISOString(),
    keyId: '0'.repeat(16),
    signature: 'A'.repeat(86) + '==',
  };
  const old = ManifestSchema.safeParse(m);
  assert.ok(old.success, old.success ? '' : JSON.stringify(old.error.issues));
  assert.ok(ManifestSchema.safeParse({ ...m, baseSourceFingerprint: SRC }).success);
  assert.ok(!ManifestSchema.safeParse({ ...m, baseSourceFingerprint: 'not-hex' }).success);
});
