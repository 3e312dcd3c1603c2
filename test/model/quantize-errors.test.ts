// Bad input to `edgelora quantize`: each case fails with an error naming the file (and tensor), a
// non-zero exit, and no output directory left behind.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { promises as fs, existsSync, readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tempDir, tinyCheckpoint } from '../helpers/fixtures.js';

const tmp = tempDir();
let hf = '';
const CLI = path.resolve('src/cli/main.ts');

before(async () => {
  hf = await tinyCheckpoint(tmp.dir);
});
after(() => tmp.cleanup());

async function variant(name: string, edit: (dir: string) => Promise<void>): Promise<string> {
  const dir = path.join(tmp.dir, name);
  await fs.cp(hf, dir, { recursive: true });
  await edit(dir);
  return dir;
}

function quantize(src: string, out: string, extra: string[] = []): { code: number | null; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'quantize', src, out, ...extra], { encoding: 'utf8' });
  return { code: r.status, stderr: r.stderr };
}

function expectFailure(src: string, mustMention: RegExp[], extra: string[] = []): void {
  const out = path.join(tmp.dir, `out-${path.basename(src)}-${extra.join('')}`);
  const r = quantize(src, out, extra);
  assert.notEqual(r.code, 0, `expected a non-zero exit; stderr: ${r.stderr}`);
  for (const re of mustMention) assert.match(r.stderr, re);
  assert.ok(!existsSync(out), 'no output directory may be left behind');
  const leftovers = readdirSync(tmp.dir).filter((f) => f.includes(`out-${path.basename(src)}`));
  assert.deepEqual(leftovers, [], 'no temporary directory may be left behind');
}

/** Reads the safetensors header of a file: [headerLength, header JSON]. */
async function header(file: string): Promise<[number, Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>]> {
  const buf = await fs.readFile(file);
  const n = Number(buf.readBigUInt64LE(0));
  return [n, JSON.parse(buf.subarray(8, 8 + n).toString('utf8'))];
}

test('a truncated safetensors file is refused, naming the file', async () => {
  const dir = await variant('truncated', async (d) => {
    const f = path.join(d, 'model.safetensors');
    const st = await fs.stat(f);
    await fs.truncate(f, st.size - 1000);
  });
  expectFailure(dir, [/model\.safetensors/, /truncat|beyond|end of file|past the end/i]);
});

test('a header whose offsets lie is refused, naming the file and tensor', async () => {
  const dir = await variant('lying-offsets', async (d) => {
    const f = path.join(d, 'model.safetensors');
    const buf = await fs.readFile(f);
    const [n, h] = await header(f);
    const e = h['model.norm.weight']!;
    e.data_offsets = [e.data_offsets[0], e.data_offsets[1] + 4]; // claims one float more than its shape
    let text = JSON.stringify(h);
    text = text.padEnd(n, ' ');
    assert.equal(Buffer.byteLength(text), n, 'test setup: header must keep its length');
    buf.write(text, 8, 'utf8');
    await fs.writeFile(f, buf);
  });
  expectFailure(dir, [/model\.safetensors/, /model\.norm\.weight/]);
});

test('a missing tensor is refused, naming it', async () => {
  const dir = await variant('missing', async (d) => {
    const { SafetensorsReader, writeSafetensors } = await import('../../src/formats/safetensors.js');
    const f = path.join(d, 'model.safetensors');
    const r = await SafetensorsReader.open(f);
    const entries = [];
    for (const name of r.names()) {
      if (name === 'model.layers.1.mlp.up_proj.weight') continue;
      const i = r.info(name);
      entries.push({ name, dtype: i.dtype, shape: [...i.shape], data: await r.readRaw(name) });
    }
    await r.close();
    await writeSafetensors(f, entries);
  });
  expectFailure(dir, [/model\.layers\.1\.mlp\.up_proj\.weight/, /missing/]);
});

test('a shape that does not match config.json is refused, naming the tensor', async () => {
  const dir = await variant('shape', async (d) => {
    const f = path.join(d, 'config.json');
    const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
    c.intermediate_size = (c.intermediate_size as number) * 2;
    await fs.writeFile(f, JSON.stringify(c));
  });
  expectFailure(dir, [/gate_proj\.weight/, /config\.json/]);
});

test('an unsupported architecture is refused', async () => {
  const dir = await variant('arch', async (d) => {
    const f = path.join(d, 'config.json');
    const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
    c.architectures = ['GPT2LMHeadModel'];
    await fs.writeFile(f, JSON.stringify(c));
  });
  expectFailure(dir, [/config\.json/, /GPT2LMHeadModel/]);
});

test('an unsupported rope type is refused', async () => {
  const dir = await variant('rope', async (d) => {
    const f = path.join(d, 'config.json');
    const c = JSON.parse(await fs.readFile(f, 'utf8')) as Record<string, unknown>;
    c.rope_scaling = { rope_type: 'yarn', factor: 4 };
    await fs.writeFile(f, JSON.stringify(c));
  });
  expectFailure(dir, [/config\.json/, /yarn/]);
});

test('an unknown --format is refused', () => {
  expectFailure(hf, [/--format/, /int3/], ['--format', 'int3']);
});
