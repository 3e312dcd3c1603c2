// Tokenizer: UTF-8 round trips through the demo byte-level BPE, special tokens, chat template,
// streaming decode that never splits a character, and loading from a directory.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildDemoTokenizer, DEMO_SPECIAL_TOKENS } from '../../src/formats/demo-model.js';
import { createTokenizer, loadTokenizer, StreamDecoder, type EdgeTokenizer } from '../../src/formats/tokenizer.js';
import { EdgeloraError } from '../../src/util/errors.js';
import { Rng } from '../../src/util/rng.js';

function demoTok(): EdgeTokenizer {
  const d = buildDemoTokenizer();
  return createTokenizer({ tokenizerJson: d.tokenizerJson, tokenizerConfig: d.tokenizerConfig, extraEosTokenIds: [d.ids.endOfTurn] });
}

/** Random text mixing ASCII, Latin-1, CJK, emoji (astral), combining marks, whitespace and controls. */
function randomText(rng: Rng, len: number): string {
  const pools: Array<[number, number]> = [
    [0x20, 0x7e],
    [0x20, 0x7e],
    [0x20, 0x7e],
    [0x09, 0x0d],
    [0xa0, 0xff],
    [0x300, 0x36f],
    [0x4e00, 0x9fff],
    [0x1f300, 0x1faff],
    [0x10000, 0x10ffff],
  ];
  let s = '';
  for (let i = 0; i < len; i++) {
    const [lo, hi] = pools[rng.int(pools.length)] as [number, number];
    s += String.fromCodePoint(lo + rng.int(hi - lo + 1));
  }
  return s;
}

test('encode/decode round-trips arbitrary UTF-8, emoji included', () => {
  const tok = demoTok();
  const fixed = [
    '',
    'The quick brown fox jumps over the lazy dog.',
    'naïve café — 😀👍🏽 👨‍👩‍👧 日本語のテキスト 🇫🇷',
    '  leading and trailing spaces  ',
    'tabs\tand\nnewlines\r\n\n',
    ' a . b , c ! d ?',
    'e\u0301 combining, \u200b zero width, \u0000 nul',
    `${DEMO_SPECIAL_TOKENS.user} literal special token text`,
  ];
  for (const s of fixed) assert.equal(tok.decode(tok.encode(s)), s, `round trip of ${JSON.stringify(s)}`);
  const rng = new Rng(7);
  for (let i = 0; i < 200; i++) {
    const s = randomText(rng, 1 + rng.int(40));
    const ids = tok.encode(s);
    assert.equal(tok.decode(ids), s, `round trip of ${JSON.stringify(s)} (ids ${ids.join(',')})`);
  }
});

test('merges make common English words single tokens; special tokens are single ids', () => {
  const tok = demoTok();
  // " the", " and", " is" are among the most frequent words of any English text.
  for (const w of [' the', ' and', ' is']) assert.equal(tok.encode(w).length, 1, `"${w}" should be one token`);
  const sentence = 'The quick brown fox jumps over the lazy dog.';
  const n = tok.encode(sentence).length;
  const bytes = new TextEncoder().encode(sentence).length;
  assert.ok(n < bytes * 0.6, `expected merges to compress: ${n} tokens for ${bytes} bytes`);
  for (const t of Object.values(DEMO_SPECIAL_TOKENS)) {
    const ids = tok.encode(t);
    assert.equal(ids.length, 1, t);
    assert.equal(tok.idToToken(ids[0] as number), t);
  }
});

test('BOS, EOS, pad ids and special-token handling', () => {
  const d = buildDemoTokenizer();
  const tok = demoTok();
  assert.equal(tok.bosTokenId, d.ids.bos);
  assert.deepEqual(tok.eosTokenIds, [d.ids.eos, d.ids.endOfTurn]);
  assert.equal(tok.padTokenId, d.ids.pad);
  assert.equal(tok.vocabSize, d.size);
  const plain = tok.encode('hi');
  assert.deepEqual(tok.encode('hi', { addSpecialTokens: true }), [d.ids.bos, ...plain]);
  const withSpecial = [d.ids.bos, ...plain, d.ids.eos];
  assert.equal(tok.decode(withSpecial), `${DEMO_SPECIAL_TOKENS.bos}hi${DEMO_SPECIAL_TOKENS.eos}`);
  assert.equal(tok.decode(withSpecial, { skipSpecialTokens: true }), 'hi');
  // Ids beyond the tokenizer (a model vocab may be larger) decode to nothing instead of crashing.
  assert.equal(tok.decode([...plain, d.size + 5]), 'hi');
  assert.equal(tok.decode([]), '');
});

test('chat template renders turns and the generation prompt; missing template is a clear error', () => {
  const tok = demoTok();
  const msgs = [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'Hi there' },
    { role: 'assistant', content: 'Hello!' },
  ];
  assert.equal(
    tok.applyChatTemplate(msgs),
    '<|begin_of_text|><|system|>\nBe brief.<|end|><|user|>\nHi there<|end|><|assistant|>\nHello!<|end|>',
  );
  assert.equal(tok.applyChatTemplate(msgs.slice(0, 2), { addGenerationPrompt: true }).endsWith('<|end|><|assistant|>\n'), true);
  assert.throws(() => tok.applyChatTemplate([{ role: 'robot', content: 'x' }]), (e: unknown) => e instanceof EdgeloraError && /roles/.test(e.message));
  const d = buildDemoTokenizer();
  const { chat_template: _unused, ...noTemplate } = d.tokenizerConfig;
  const bare = createTokenizer({ tokenizerJson: d.tokenizerJson, tokenizerConfig: noTemplate, where: 'some/dir' });
  assert.equal(bare.hasChatTemplate, false);
  assert.throws(
    () => bare.applyChatTemplate(msgs),
    (e: unknown) => e instanceof EdgeloraError && e.describe().includes('some/dir') && e.hint !== undefined,
  );
});

test('StreamDecoder prints every character exactly once and never half a character', () => {
  const tok = demoTok();
  const rng = new Rng(11);
  const texts = ['Hi 😀 there 👨‍👩‍👧!', '日本語 and émoji 🇫🇷🇩🇪 mixed', randomText(rng, 60), randomText(rng, 200)];
  let heldBack = 0;
  for (const text of texts) {
    const ids = tok.encode(text);
    const sd = new StreamDecoder(tok);
    let out = '';
    for (const id of ids) {
      const piece = sd.push(id);
      if (piece === '') heldBack++;
      assert.ok(!piece.includes('\uFFFD'), `chunk ${JSON.stringify(piece)} contains a broken character`);
      out += piece;
    }
    out += sd.flush();
    assert.equal(out, text);
  }
  // An emoji is 4 bytes = up to 4 byte tokens: some pushes must have printed nothing.
  assert.ok(heldBack > 0, 'expected at least one held-back token');
  // Special tokens are skipped by default when streaming.
  const d = buildDemoTokenizer();
  const sd = new StreamDecoder(tok);
  let s = '';
  for (const id of [...tok.encode('ok'), d.ids.eos]) s += sd.push(id);
  assert.equal(s + sd.flush(), 'ok');
});

test('loadTokenizer reads a model directory (eos ids from generation_config.json)', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-tok-'));
  const d = buildDemoTokenizer();
  await fs.writeFile(path.join(dir, 'tokenizer.json'), JSON.stringify(d.tokenizerJson));
  await fs.writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify(d.tokenizerConfig));
  await fs.writeFile(path.join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [d.ids.eos, d.ids.endOfTurn] }));
  const tok = await loadTokenizer(dir);
  assert.deepEqual(tok.eosTokenIds, [d.ids.eos, d.ids.endOfTurn]);
  assert.equal(tok.decode(tok.encode('round trip ✓')), 'round trip ✓');
  await fs.writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ ...d.tokenizerConfig, bos_token: '<|nope|>' }));
  await assert.rejects(loadTokenizer(dir), (e: unknown) => e instanceof EdgeloraError && e.describe().includes('<|nope|>'));
  await fs.rm(path.join(dir, 'tokenizer.json'));
  await assert.rejects(loadTokenizer(dir), (e: unknown) => e instanceof EdgeloraError && e.describe().includes('tokenizer.json'));
  await fs.rm(dir, { recursive: true });
});
