// Protocol pieces without a broker: the pack format, canonical JSON and signatures, bitmaps, the
// topic table, chunk frames, message schemas, the hub store across reopen, the default activator.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { packAdapterDir, packFiles, unpack, adapterInfo, sha256Hex } from '../../src/sync/transfer/pack.ts';
import { canonicalJson } from '../../src/util/canonical-json.ts';
import { checkSignature, generateSigningKey, signMessage, writeKeyPair, loadSigningKey, loadPublicKey } from '../../src/sync/protocol/signing.ts';
import { Bitmap } from '../../src/sync/protocol/bitmap.ts';
import { parseTarget, parseTopic, topics } from '../../src/sync/protocol/topics.ts';
import { decodeChunk, decodeJson, encodeChunk, ManifestSchema, MissingSchema, StatusSchema } from '../../src/sync/protocol/messages.ts';
import { HubStore } from '../../src/sync/hub/store.ts';
import { validateAdapterDir } from '../../src/sync/agent/activator.ts';
import { makeAdapter, tmpDir } from './helpers.ts';

const work = tmpDir('proto');
after(() => fs.rm(work, { recursive: true, force: true }));

test('pack: deterministic, round-trips byte for byte, refuses traversal and truncation', async () => {
  const dir = await makeAdapter(path.join(work, 'a'), { seed: 1 });
  const a = await packAdapterDir(dir);
  const b = await packAdapterDir(dir);
  assert.equal(sha256Hex(a), sha256Hex(b), 'same directory, same blob');
  const files = await unpack(a);
  assert.deepEqual(files.map((f) => f.name), ['adapter_config.json', 'adapter_model.safetensors', 'edgelora_adapter.json']);
  for (const f of files) assert.ok(f.data.equals(await fs.readFile(path.join(dir, f.name))), `${f.name} identical`);
  const info = adapterInfo(files);
  assert.deepEqual(info, { rank: 4, alpha: 8, targets: ['q_proj', 'v_proj'], baseFingerprint: 'a'.repeat(64) });
  await assert.rejects(unpack(a.subarray(0, a.length - 1)), /runs past the end/);
  await assert.rejects(unpack(Buffer.concat([a, Buffer.from([0])])), /trailing bytes/);
  // A hand-made pack holding "../evil" must not unpack.
  const evil = Buffer.from(a);
  const at = evil.indexOf('adapter_config.json');
  evil.write('../pter_config.json', at);
  await assert.rejects(unpack(evil), /file name not allowed/);
  assert.throws(() => packFiles([{ name: '.hidden', data: Buffer.alloc(1) }]), /not allowed/);
});

test('canonical JSON is JCS (sorted keys, no spaces) and signatures cover every field', () => {
  assert.equal(canonicalJson({ b: 1, a: [true, null, 'x', 1.5], c: { z: 0, y: 'é' } }), '{"a":[true,null,"x",1.5],"b":1,"c":{"y":"é","z":0}}');
  // RFC 8785 sorts by UTF-16 code units: "😀" (U+1F600, units D83D DE00) before "\ufffd" (U+FFFD),
  // the reverse of code point order.
  assert.equal(canonicalJson({ '\ufffd': 1, '😀': 2, '\r': 3 }), '{"\\r":3,"😀":2,"\ufffd":1}');
  // One canonical JSON serves signatures and fingerprints: a value JSON cannot carry throws, never becomes "null".
  assert.throws(() => canonicalJson({ lr: Number.NaN }), /non-finite/);
  assert.throws(() => canonicalJson([Number.POSITIVE_INFINITY]), /non-finite/);
  const key = generateSigningKey();
  const other = generateSigningKey();
  const msg = signMessage({ keyId: key.keyId, seq: 3, target: { kind: 'fleet', name: 'f' } }, key);
  assert.equal(checkSignature(msg, key.publicKey), null);
  assert.match(checkSignature({ ...msg, seq: 4 } as typeof msg, key.publicKey) ?? '', /bad signature/);
  assert.match(checkSignature(msg, other.publicKey) ?? '', /unknown key/);
  // Key order does not matter: the signature is over the canonical form.
  const reordered = JSON.parse(JSON.stringify({ target: msg.target, signature: msg.signature, seq: msg.seq, keyId: msg.keyId })) as typeof msg;
  assert.equal(checkSignature(reordered, key.publicKey), null);
});

test('key files: .key is mode 0600 and both load back', async () => {
  const r = await writeKeyPair(path.join(work, 'k'));
  assert.equal((await fs.stat(r.keyFile)).mode & 0o777, 0o600);
  const k = await loadSigningKey(r.keyFile);
  const pub = await loadPublicKey(r.pubFile);
  assert.equal(k.keyId, r.keyId);
  assert.equal(checkSignature(signMessage({ keyId: k.keyId, x: 1 }, k), pub), null);
  await assert.rejects(loadSigningKey(r.pubFile), /not a PEM private key/);
});

test('bitmap: LSB-first bytes, base64 round trip, length and padding checks', () => {
  const b = new Bitmap(10);
  b.set(0);
  b.set(9);
  assert.deepEqual([...b.bytes], [0b00000001, 0b00000010]);
  assert.deepEqual(Bitmap.fromBase64(10, b.toBase64())?.indices(), [0, 9]);
  assert.equal(Bitmap.fromBase64(11, Buffer.from([0, 0, 0]).toString('base64')), null, 'wrong length');
  assert.equal(Bitmap.fromBase64(10, Buffer.from([0, 0b100]).toString('base64')), null, 'bit past the end');
  assert.deepEqual(b.complement().indices(), [1, 2, 3, 4, 5, 6, 7, 8]);
});

test('topic table: every topic parses back to what built it', () => {
  const t = parseTarget('group:g-1');
  assert.deepEqual(t, { kind: 'group', name: 'g-1' });
  assert.deepEqual(parseTopic(topics.manifest(t)), { kind: 'manifest', target: t });
  assert.deepEqual(parseTopic(topics.chunk({ kind: 'device', name: 'd' })), { kind: 'chunk', target: { kind: 'device', name: 'd' } });
  assert.deepEqual(parseTopic(topics.command('d')), { kind: 'command', deviceId: 'd' });
  assert.deepEqual(parseTopic(topics.uploadAck('d')), { kind: 'uploadAck', deviceId: 'd' });
  assert.deepEqual(parseTopic(topics.reply('op')), { kind: 'reply', deviceId: 'op' });
  assert.deepEqual(parseTopic(topics.status('d')), { kind: 'status', deviceId: 'd' });
  assert.deepEqual(parseTopic(topics.missing('d')), { kind: 'missing', deviceId: 'd' });
  assert.deepEqual(parseTopic(topics.uploadSegment('d')), { kind: 'upload', clientId: 'd', stage: 'seg' });
  assert.deepEqual(parseTopic(topics.publishRequest), { kind: 'publishRequest' });
  assert.equal(parseTopic('edgelora/v1/t/fleet/x/other'), null);
  assert.throws(() => parseTarget('fleet:a/b'), /invalid fleet name/);
  assert.throws(() => parseTarget('fleet:#'), /invalid fleet name/);
  assert.throws(() => parseTarget('zone:x'), /bad target/);
});

test('chunk frames and message schemas', () => {
  const sha = createHash('sha256').update('x').digest('hex');
  const f = encodeChunk(sha, 7, 9, Buffer.from('hello'));
  assert.equal(f.length, 44 + 5);
  const d = decodeChunk(f);
  assert.ok(d.ok);
  assert.deepEqual({ ...d.value, data: d.value.data.toString() }, { sha256: sha, index: 7, count: 9, data: 'hello' });
  const missing = { type: 'missing', v: 1, deviceId: 'd1', target: { kind: 'fleet', name: 'f' }, sha256: sha, bitmap: 'AQI=' };
  assert.ok(decodeJson(MissingSchema, Buffer.from(JSON.stringify(missing))).ok);
  const extra = decodeJson(MissingSchema, Buffer.from(JSON.stringify({ ...missing, extra: 1 })));
  assert.ok(!extra.ok && /schema violation/.test(extra.reason), 'unknown fields are refused');
  const offline = decodeJson(StatusSchema, Buffer.from(JSON.stringify({ type: 'status', v: 1, deviceId: 'd1', online: false, state: 'offline' })));
  assert.ok(offline.ok, 'the last-will status is a valid status');
  const bad = decodeJson(ManifestSchema, Buffer.from('{"type":"manifest"}'));
  assert.ok(!bad.ok && /schema violation/.test(bad.reason));
  const big = decodeJson(MissingSchema, Buffer.alloc(2 * 1024 * 1024, 32));
  assert.ok(!big.ok && /oversize/.test(big.reason));
});

test('hub store: content-addressed, survives reopen, versions per content', async () => {
  const dir = path.join(work, 'store');
  const s = await HubStore.open(dir);
  const blob = await packAdapterDir(await makeAdapter(path.join(work, 's1'), { seed: 2 }));
  const e = await s.putBlob(blob, { name: 'one', source: 'publish' });
  assert.equal(e.sha256, sha256Hex(blob));
  assert.ok((await fs.readFile(path.join(dir, 'blobs', e.sha256))).equals(blob));
  assert.equal((await s.putBlob(blob, { name: 'again', source: 'publish' })).name, 'one', 'idempotent by content');
  await assert.rejects(s.putBlob(Buffer.from('not a pack'), { name: 'x', source: 'publish' }), /bad adapter pack/);
  const s2 = await HubStore.open(dir);
  assert.equal(s2.getEntry(e.sha256)?.name, 'one');
  assert.equal(s2.findBlob(e.sha256.slice(0, 10))?.sha256, e.sha256);
  assert.equal(s2.versionFor('one', e.sha256), 1);
});

test('default activator refuses a damaged safetensors file or a non-LoRA config', async () => {
  const dir = await makeAdapter(path.join(work, 'v'), { seed: 3 });
  await validateAdapterDir(dir);
  const st = path.join(dir, 'adapter_model.safetensors');
  const data = await fs.readFile(st);
  await fs.writeFile(st, data.subarray(0, data.length - 4));
  await assert.rejects(validateAdapterDir(dir), /data_offsets .* outside/);
  await fs.writeFile(st, data);
  await fs.writeFile(path.join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'PREFIX_TUNING' }));
  await assert.rejects(validateAdapterDir(dir), /not a PEFT LoRA config/);
});
