// The one session factory (src/runtime/sessions.ts): what ORT receives for each kind of session, and
// that nothing else in src/ creates a session.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { sessionOptionsFor, createSession } from '../../src/runtime/sessions.js';
import { EdgeloraError } from '../../src/util/errors.js';

const profile = { executionProviders: ['cpu'], intraOpNumThreads: 3, extra: { session: { 'session.intra_op.allow_spinning': '0' } } };

test("a profile's options reach every kind of session; session config entries merge key by key", () => {
  for (const kind of ['decoder', 'lora-twin', 'train', 'merge'] as const) {
    const o = sessionOptionsFor({ kind, sessionOptions: profile, externalDataDir: '/models/m', format: 'int4' });
    assert.equal(o.intraOpNumThreads, 3, kind);
    const session = (o.extra as { session: Record<string, string> }).session;
    assert.equal(session['session.intra_op.allow_spinning'], '0', `${kind} dropped the profile's session config entry`);
    assert.equal(session.model_external_initializers_file_folder_path, path.resolve('/models/m'), kind);
  }
  // The training session's own default (no arena) applies unless the profile says otherwise.
  assert.equal(sessionOptionsFor({ kind: 'train' }).enableCpuMemArena, false);
  assert.equal(sessionOptionsFor({ kind: 'train', sessionOptions: { enableCpuMemArena: true } }).enableCpuMemArena, true);
  // Nor a memory pattern (one block for the whole step, sized by the first run's packing), unless the profile asks.
  assert.equal(sessionOptionsFor({ kind: 'train' }).enableMemPattern, false);
  assert.equal(sessionOptionsFor({ kind: 'train', sessionOptions: { enableMemPattern: true } }).enableMemPattern, true);
});

test('prepacking is off for nf4/fp4 inference sessions only', () => {
  const prepackOff = (kind: 'decoder' | 'lora-twin' | 'train', format: 'nf4' | 'fp4' | 'int4' | 'fp32') =>
    (sessionOptionsFor({ kind, format }).extra as { session?: Record<string, string> } | undefined)?.session?.disable_prepacking === '1';
  for (const kind of ['decoder', 'lora-twin'] as const) {
    assert.equal(prepackOff(kind, 'nf4'), true);
    assert.equal(prepackOff(kind, 'fp4'), true);
    assert.equal(prepackOff(kind, 'int4'), false);
    assert.equal(prepackOff(kind, 'fp32'), false);
  }
  assert.equal(prepackOff('train', 'nf4'), false);
});

test('an ORT failure becomes an EdgeloraError naming what and where', async () => {
  await assert.rejects(createSession({ kind: 'decoder', model: Uint8Array.of(1, 2, 3), where: '/some/model.onnx' }), (e: unknown) =>
    e instanceof EdgeloraError && /could not load the model/.test(e.message) && e.where === '/some/model.onnx' && /quantize/.test(e.hint ?? ''));
});

test('no file in src/ but the factory creates an ORT session', async () => {
  const offenders: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (p.endsWith('.ts') && p !== path.join('src', 'runtime', 'sessions.ts')) {
        const text = await fs.readFile(p, 'utf8');
        // The EP probe's session runs in a child process from a script string (providers.ts): it is
        // not an edgelora session and must not load edgelora's modules.
        const code = p.endsWith(path.join('profiles', 'providers.ts')) ? text.replace(/const CHILD_SCRIPT = `[\s\S]*?`;/, '') : text;
        if (/InferenceSession\.create\(/.test(code)) offenders.push(p);
      }
    }
  };
  await walk('src');
  assert.deepEqual(offenders, [], `sessions created outside src/runtime/sessions.ts: ${offenders.join(', ')}`);
});

test('a quantized vocabulary table keeps prepacking on for nf4/fp4 inference (its lm_head is MatMulNBits)', () => {
  const prepackOff = (kind: 'decoder' | 'lora-twin', format: 'nf4' | 'fp4', embeddings: 'float' | 'int8' | 'int4' | undefined) =>
    (sessionOptionsFor({ kind, format, embeddings }).extra as { session?: Record<string, string> } | undefined)?.session?.disable_prepacking === '1';
  for (const kind of ['decoder', 'lora-twin'] as const) {
    for (const format of ['nf4', 'fp4'] as const) {
      assert.equal(prepackOff(kind, format, 'int8'), false);
      assert.equal(prepackOff(kind, format, 'int4'), false);
      assert.equal(prepackOff(kind, format, 'float'), true);
      assert.equal(prepackOff(kind, format, undefined), true, 'a manifest from before tables were quantized is a float table');
    }
  }
});

test('int4 and fp32 training sessions run unprepacked (one copy of each linear: the file-backed one)', () => {
  const prepackOff = (format: 'nf4' | 'fp4' | 'int4' | 'fp32') => (sessionOptionsFor({ kind: 'train', format }).extra as { session?: Record<string, string> } | undefined)?.session?.disable_prepacking === '1';
  assert.equal(prepackOff('int4'), true);
  assert.equal(prepackOff('fp32'), true);
  assert.equal(prepackOff('nf4'), false);
  assert.equal(prepackOff('fp4'), false);
});
