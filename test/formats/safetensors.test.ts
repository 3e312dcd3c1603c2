// safetensors: round trips per dtype, sharded checkpoints, every corruption case, and half-precision
// bit patterns computed by hand from the IEEE 754 / bfloat16 definitions.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  SafetensorsReader,
  writeSafetensors,
  f32ToF16Bits,
  f16BitsToF32,
  f32ToBf16Bits,
  bf16BitsToF32,
  f32ToF16,
  f16ToF32,
  f32ToBf16,
  bf16ToF32,
  type StDType,
} from '../../src/formats/safetensors.js';
import { EdgeloraError } from '../../src/util/errors.js';

async function tmpDir(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-st-'));
}

/** Writes a file with an arbitrary header object (or raw header text) and data bytes, bypassing the writer. */
async function craft(file: string, header: unknown, data: Uint8Array, opts: { rawHeader?: string; lenOverride?: bigint } = {}): Promise<void> {
  const h = new TextEncoder().encode(opts.rawHeader ?? JSON.stringify(header));
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, opts.lenOverride ?? BigInt(h.length), true);
  const out = new Uint8Array(8 + h.length + data.length);
  out.set(len, 0);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  await fs.writeFile(file, out);
}

async function expectStError(p: Promise<unknown>, mustName: string[]): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, `expected EdgeloraError, got ${String(err)}`);
    const text = err.describe();
    for (const s of mustName) assert.ok(text.includes(s), `error "${text}" should name "${s}"`);
    return true;
  });
}

test('round-trips every dtype, raw bytes and float conversion', async () => {
  const dir = await tmpDir();
  const file = path.join(dir, 'all.safetensors');
  const n = 6;
  const bytesOf: Record<StDType, Uint8Array> = {
    F32: new Uint8Array(new Float32Array([1, -2.5, 3.25, 0, 1e-3, 65504]).buffer),
    F16: new Uint8Array(new Uint16Array([0x3c00, 0xc100, 0x4280, 0x0000, 0x0001, 0x7bff]).buffer),
    BF16: new Uint8Array(new Uint16Array([0x3f80, 0xc020, 0x4050, 0x0000, 0x3380, 0x4780]).buffer),
    I8: new Uint8Array(new Int8Array([-128, -1, 0, 1, 127, 5]).buffer),
    U8: new Uint8Array([0, 1, 2, 128, 254, 255]),
    I32: new Uint8Array(new Int32Array([-2147483648, -1, 0, 1, 2147483647, 7]).buffer),
    I64: new Uint8Array(new BigInt64Array([-5n, -1n, 0n, 1n, 1n << 40n, 9n]).buffer),
  };
  const dtypes = Object.keys(bytesOf) as StDType[];
  await writeSafetensors(
    file,
    dtypes.map((dt, i) => ({ name: `t.${dt}`, dtype: dt, shape: i % 2 ? [2, 3] : [n], data: bytesOf[dt] })),
    { format: 'pt', note: 'hello' },
  );
  const raw = await fs.readFile(file);
  const hlen = Number(new DataView(raw.buffer, raw.byteOffset).getBigUint64(0, true));
  assert.equal(hlen % 8, 0, 'header padded to a multiple of 8');
  const htext = raw.subarray(8, 8 + hlen).toString('utf8');
  assert.match(htext, /^\{.*\} *$/s, 'header is JSON followed only by space padding');
  const r = await SafetensorsReader.open(file);
  try {
    assert.deepEqual(r.metadata, { format: 'pt', note: 'hello' });
    assert.deepEqual(r.names(), dtypes.map((d) => `t.${d}`).sort());
    for (const [i, dt] of dtypes.entries()) {
      const info = r.info(`t.${dt}`);
      assert.equal(info.dtype, dt);
      assert.deepEqual(info.shape, i % 2 ? [2, 3] : [n]);
      assert.deepEqual(await r.readRaw(`t.${dt}`), bytesOf[dt]);
    }
    assert.deepEqual(Array.from(await r.readF32('t.F32')), Array.from(new Float32Array([1, -2.5, 3.25, 0, 1e-3, 65504])));
    assert.deepEqual(Array.from(await r.readF32('t.F16')), [1, -2.5, 3.25, 0, 2 ** -24, 65504]);
    assert.deepEqual(Array.from(await r.readF32('t.BF16')), [1, -2.5, 3.25, 0, 2 ** -24, 65536]);
    assert.deepEqual(Array.from(await r.readF32('t.I64', { allowInt: true })), [-5, -1, 0, 1, 2 ** 40, 9]);
    assert.deepEqual(Array.from(await r.readF32('t.I8', { allowInt: true })), [-128, -1, 0, 1, 127, 5]);
    await expectStError(r.readF32('t.U8'), ['t.U8', file]);
    await expectStError(r.readRaw('nope'), ['nope', file]);
    assert.equal(r.has('t.I32'), true);
    assert.equal(r.has('nope'), false);
  } finally {
    await r.close();
  }
  // Float32Array input with a half dtype is converted; lazy producers are called.
  const f2 = path.join(dir, 'half.safetensors');
  let calls = 0;
  await writeSafetensors(f2, [
    { name: 'a', dtype: 'F16', shape: [2], data: new Float32Array([1, -2.5]) },
    { name: 'b', dtype: 'BF16', shape: [2], data: async () => { calls++; return new Float32Array([1, -2.5]); } },
    { name: 'c', dtype: 'F32', shape: [0], data: new Float32Array(0) },
  ]);
  assert.equal(calls, 1);
  for (const name of ['x', 'xy', 'xyz', 'wxyz']) {
    // Different name lengths exercise every padding amount.
    const fp = path.join(dir, 'pad.safetensors');
    await writeSafetensors(fp, [{ name, dtype: 'U8', shape: [1], data: new Uint8Array([7]) }]);
    const b = await fs.readFile(fp);
    const hl = Number(new DataView(b.buffer, b.byteOffset).getBigUint64(0, true));
    assert.equal(hl % 8, 0);
    assert.match(b.subarray(8, 8 + hl).toString('utf8'), /^\{.*\} *$/s);
    const rp = await SafetensorsReader.open(fp);
    assert.deepEqual(Array.from(await rp.readRaw(name)), [7]);
    await rp.close();
    await fs.rm(fp);
  }
  const r2 = await SafetensorsReader.open(f2);
  assert.deepEqual(Array.from(await r2.readRaw('a')), [0x00, 0x3c, 0x00, 0xc1]);
  assert.deepEqual(Array.from(await r2.readRaw('b')), [0x80, 0x3f, 0x20, 0xc0]);
  assert.deepEqual(Array.from(await r2.readF32('c')), []);
  await r2.close();
  // No temporary files left behind.
  assert.deepEqual((await fs.readdir(dir)).sort(), ['all.safetensors', 'half.safetensors']);
  await fs.rm(dir, { recursive: true });
});

test('opens a directory with model.safetensors and a sharded index', async () => {
  const dir = await tmpDir();
  await writeSafetensors(path.join(dir, 'model.safetensors'), [{ name: 'w', dtype: 'F32', shape: [2], data: new Float32Array([3, 4]) }]);
  const r1 = await SafetensorsReader.open(dir);
  assert.deepEqual(Array.from(await r1.readF32('w')), [3, 4]);
  await r1.close();

  const sh = path.join(dir, 'sharded');
  await fs.mkdir(sh);
  await writeSafetensors(path.join(sh, 'model-00001-of-00002.safetensors'), [
    { name: 'a', dtype: 'F32', shape: [1], data: new Float32Array([1]) },
    { name: 'b', dtype: 'F32', shape: [2], data: new Float32Array([2, 3]) },
  ]);
  await writeSafetensors(path.join(sh, 'model-00002-of-00002.safetensors'), [{ name: 'c', dtype: 'F16', shape: [1], data: new Float32Array([5]) }]);
  const index = {
    metadata: { total_size: 16 },
    weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00001-of-00002.safetensors', c: 'model-00002-of-00002.safetensors' },
  };
  await fs.writeFile(path.join(sh, 'model.safetensors.index.json'), JSON.stringify(index));
  const r2 = await SafetensorsReader.open(sh);
  assert.deepEqual(r2.names(), ['a', 'b', 'c']);
  assert.deepEqual(Array.from(await r2.readF32('b')), [2, 3]);
  assert.deepEqual(Array.from(await r2.readF32('c')), [5]);
  assert.ok(r2.info('c').file.endsWith('model-00002-of-00002.safetensors'));
  await r2.close();

  // Missing shard.
  await fs.rm(path.join(sh, 'model-00002-of-00002.safetensors'));
  await expectStError(SafetensorsReader.open(sh), ['model-00002-of-00002.safetensors', 'model.safetensors.index.json', '"c"']);
  // Index naming a tensor its shard does not hold.
  await fs.writeFile(
    path.join(sh, 'model.safetensors.index.json'),
    JSON.stringify({ weight_map: { a: 'model-00001-of-00002.safetensors', zz: 'model-00001-of-00002.safetensors' } }),
  );
  await expectStError(SafetensorsReader.open(sh), ['zz', 'model.safetensors.index.json']);
  // Empty directory.
  const empty = path.join(dir, 'empty');
  await fs.mkdir(empty);
  await expectStError(SafetensorsReader.open(empty), [empty]);
  await fs.rm(dir, { recursive: true });
});

test('corrupt files give errors naming the file and tensor', async () => {
  const dir = await tmpDir();
  const f = (n: string) => path.join(dir, n);
  const good = { w: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };
  const data8 = new Uint8Array(8);

  await craft(f('biglen.safetensors'), good, data8, { lenOverride: 1n << 40n });
  await expectStError(SafetensorsReader.open(f('biglen.safetensors')), ['biglen.safetensors', 'header length']);

  await craft(f('notjson.safetensors'), null, data8, { rawHeader: '{"w": {"dtype": "F32",' });
  await expectStError(SafetensorsReader.open(f('notjson.safetensors')), ['notjson.safetensors', 'JSON']);

  await craft(f('dtype.safetensors'), { w: { dtype: 'Q4', shape: [8], data_offsets: [0, 8] } }, data8);
  await expectStError(SafetensorsReader.open(f('dtype.safetensors')), ['dtype.safetensors', '"w"', 'Q4']);

  await craft(f('size.safetensors'), { w: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, data8);
  await expectStError(SafetensorsReader.open(f('size.safetensors')), ['size.safetensors', '"w"', '[3]']);

  await craft(
    f('overlap.safetensors'),
    { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } },
    new Uint8Array(12),
  );
  await expectStError(SafetensorsReader.open(f('overlap.safetensors')), ['overlap.safetensors', '"b"', 'overlap']);

  await craft(f('gap.safetensors'), { a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, data8);
  await expectStError(SafetensorsReader.open(f('gap.safetensors')), ['gap.safetensors', '"a"']);

  await craft(f('trailing.safetensors'), good, new Uint8Array(12));
  await expectStError(SafetensorsReader.open(f('trailing.safetensors')), ['trailing.safetensors', 'cover']);

  // A real file with its last bytes cut off.
  await writeSafetensors(f('trunc.safetensors'), [
    { name: 'a', dtype: 'F32', shape: [4], data: new Float32Array(4) },
    { name: 'b', dtype: 'F32', shape: [4], data: new Float32Array(4) },
  ]);
  const full = await fs.readFile(f('trunc.safetensors'));
  await fs.writeFile(f('trunc.safetensors'), full.subarray(0, full.length - 3));
  await expectStError(SafetensorsReader.open(f('trunc.safetensors')), ['trunc.safetensors', '"b"', 'truncated']);

  await fs.writeFile(f('tiny.safetensors'), new Uint8Array(3));
  await expectStError(SafetensorsReader.open(f('tiny.safetensors')), ['tiny.safetensors']);

  await expectStError(SafetensorsReader.open(f('absent.safetensors')), ['absent.safetensors']);
  await fs.rm(dir, { recursive: true });
});

test('writer refuses wrong byte counts and float data for integer dtypes, leaving no file', async () => {
  const dir = await tmpDir();
  const file = path.join(dir, 'x.safetensors');
  await expectStError(writeSafetensors(file, [{ name: 'w', dtype: 'F32', shape: [3], data: new Float32Array(2) }]), ['"w"', file]);
  await expectStError(writeSafetensors(file, [{ name: 'q', dtype: 'U8', shape: [2], data: new Float32Array(2) }]), ['"q"', file]);
  assert.deepEqual(await fs.readdir(dir), []);
  await fs.rm(dir, { recursive: true });
});

// Bit patterns derived by hand: binary16 has 1 sign, 5 exponent (bias 15), 10 mantissa bits;
// bfloat16 is the top 16 bits of binary32 (1, 8 bias 127, 7).
const F16_CASES: Array<[number, number, string]> = [
  [1.0, 0x3c00, '1.0 = 2^0: exp 15'],
  [-2.5, 0xc100, '-2.5 = -1.25·2^1: sign, exp 16, mant 0x100'],
  [65504, 0x7bff, 'largest finite half'],
  [2 ** -24, 0x0001, 'smallest subnormal'],
  [1023 * 2 ** -24, 0x03ff, 'largest subnormal'],
  [2 ** -14, 0x0400, 'smallest normal'],
  [0.333251953125, 0x3555, '1365/4096'],
  [-0, 0x8000, 'negative zero'],
  [Infinity, 0x7c00, '+inf'],
  [-Infinity, 0xfc00, '-inf'],
  [65520, 0x7c00, 'halfway 65504..65536 ties to even (inf)'],
  [1e6, 0x7c00, 'overflow to inf'],
  [2 ** -25, 0x0000, 'half of smallest subnormal ties to even (0)'],
  [3 * 2 ** -26, 0x0001, '0.75 of smallest subnormal rounds up'],
  [1 + 2 ** -11, 0x3c00, 'tie rounds to even mantissa 0'],
  [1 + 3 * 2 ** -11, 0x3c02, 'tie rounds to even mantissa 2'],
  [1 + 2 ** -11 + 2 ** -20, 0x3c01, 'just above the tie rounds up'],
];
const BF16_CASES: Array<[number, number, string]> = [
  [1.0, 0x3f80, '1.0'],
  [-2.5, 0xc020, '-2.5 = 0xC0200000'],
  [65504, 0x4780, '0x477FE000 rounds up to 65536'],
  [2 ** -24, 0x3380, '2^-24 = 0x33800000'],
  [Infinity, 0x7f80, '+inf'],
  [1 + 2 ** -8, 0x3f80, 'tie to even (down)'],
  [1 + 3 * 2 ** -8, 0x3f82, 'tie to even (up)'],
  [3.4028234663852886e38, 0x7f80, 'f32 max rounds to inf'],
];

test('f32 → f16/bf16 match hand-computed bit patterns, and back', () => {
  for (const [x, bits, why] of F16_CASES) {
    const got = f32ToF16Bits(x);
    assert.equal(got, bits, `f16(${x}) [${why}]: got 0x${got.toString(16)}, want 0x${bits.toString(16)}`);
  }
  for (const [x, bits, why] of BF16_CASES) {
    const got = f32ToBf16Bits(x);
    assert.equal(got, bits, `bf16(${x}) [${why}]: got 0x${got.toString(16)}, want 0x${bits.toString(16)}`);
  }
  assert.equal(f16BitsToF32(0x3555), 0.333251953125);
  assert.equal(f16BitsToF32(0x0001), 2 ** -24);
  assert.equal(f16BitsToF32(0xc100), -2.5);
  assert.ok(Number.isNaN(f16BitsToF32(0x7e00)));
  assert.equal(bf16BitsToF32(0xc020), -2.5);
  const nanH = f32ToF16Bits(NaN);
  assert.ok((nanH & 0x7c00) === 0x7c00 && (nanH & 0x3ff) !== 0, 'NaN stays NaN in f16');
  const nanB = f32ToBf16Bits(NaN);
  assert.ok((nanB & 0x7f80) === 0x7f80 && (nanB & 0x7f) !== 0, 'NaN stays NaN in bf16');
  // Array versions agree with the scalar ones.
  const xs = new Float32Array(F16_CASES.map(([x]) => x));
  assert.deepEqual(Array.from(f32ToF16(xs)), F16_CASES.map(([, b]) => b));
  const ys = new Float32Array(BF16_CASES.map(([x]) => x));
  assert.deepEqual(Array.from(f32ToBf16(ys)), BF16_CASES.map(([, b]) => b));
  // Every finite half value survives half → f32 → half exactly.
  const all = new Uint16Array(65536).map((_, i) => i);
  const back = f32ToF16(f16ToF32(all));
  let mismatches = 0;
  for (let h = 0; h < 65536; h++) {
    const isNan = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
    if (!isNan && back[h] !== h) mismatches++;
  }
  assert.equal(mismatches, 0, `${mismatches} half values did not round-trip`);
  const bAll = new Uint16Array(65536).map((_, i) => i);
  const bBack = f32ToBf16(bf16ToF32(bAll));
  let bMis = 0;
  for (let b = 0; b < 65536; b++) {
    const isNan = (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0;
    if (!isNan && bBack[b] !== b) bMis++;
  }
  assert.equal(bMis, 0, `${bMis} bfloat16 values did not round-trip`);
});
