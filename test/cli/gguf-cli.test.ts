// The GGUF commands end to end through the CLI: export a base, import it back, generate and chat
// with the imported model (its tokenizer and chat template come from tokenizer.ggml.*), export an
// adapter; a refused overwrite leaves the existing file alone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { runCli as cli } from '../helpers/cli-process.js';
import { tempDir, tinyCheckpoint, quantized } from '../helpers/fixtures.js';
import { randomAdapter } from '../helpers/adapters.js';
import { readManifest } from '../../src/model/manifest.js';
import { parseHfConfig } from '../../src/formats/hf-config.js';
import { GgufReader } from '../../src/formats/gguf/reader.js';

const tmp = tempDir('edgelora-gguf-cli-');
let model = '';

before(async () => {
  const hf = await tinyCheckpoint(tmp.dir);
  model = await quantized(hf, tmp.dir, 'int4', { format: 'int4' });
});
after(() => tmp.cleanup());

test('export-gguf → import-gguf → generate and chat; adapter export-gguf', async () => {
  const gguf = path.join(tmp.dir, 'm.gguf');
  let r = cli(['export-gguf', model, gguf, '--type', 'q4_0', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const rep = JSON.parse(r.stdout) as { tensors: number; requantized: number };
  assert.ok(rep.requantized > 0, 'an asymmetric int4 model is re-quantized, and the report says so');
  r = cli(['export-gguf', model, gguf]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /already exists/);
  const imported = path.join(tmp.dir, 'imported');
  r = cli(['import-gguf', gguf, imported]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /from m\.gguf/);
  r = cli(['generate', '--model', imported, '--prompt', 'The quick brown fox', '--max-new-tokens', '5', '--json']);
  assert.equal(r.code, 0, r.stderr);
  r = cli(['generate', '--model', imported, '--chat', '--prompt', 'Hello!', '--max-new-tokens', '5', '--json']);
  assert.equal(r.code, 0, `chat through the template from tokenizer.chat_template: ${r.stderr}`);
  const tc = JSON.parse(readFileSync(path.join(imported, 'tokenizer_config.json'), 'utf8')) as { chat_template?: string };
  assert.ok(tc.chat_template?.includes('add_generation_prompt'), 'chat template carried over');

  const man = await readManifest(model);
  const adir = path.join(tmp.dir, 'adapter');
  await randomAdapter(adir, parseHfConfig(man.sourceConfig, model), { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 1, fingerprint: man.fingerprint });
  const agguf = path.join(tmp.dir, 'adapter.gguf');
  r = cli(['adapter', 'export-gguf', adir, agguf, '--base', model]);
  assert.equal(r.code, 0, r.stderr);
  const rd = GgufReader.open(agguf);
  try {
    assert.equal(rd.metadata.get('general.type'), 'adapter');
    assert.equal(rd.metadata.get('adapter.type'), 'lora');
    assert.equal(rd.metadata.get('adapter.lora.alpha'), 8);
    assert.deepEqual(rd.info('blk.0.attn_q.weight.lora_a').dims, [128, 4]);
    assert.deepEqual(rd.info('blk.0.attn_q.weight.lora_b').dims, [4, 128]);
  } finally {
    rd.close();
  }
  r = cli(['adapter', 'export-gguf', adir, path.join(tmp.dir, 'x.gguf')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /missing --base/);
});
