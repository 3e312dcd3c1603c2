// JSONL → ids + labels: every row format, label masking, truncation warnings, and every error case
// naming the file and line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadJsonl, IGNORE_INDEX } from '../../src/data/jsonl.js';
import { buildDemoTokenizer } from '../../src/formats/demo-model.js';
import { createTokenizer, type EdgeTokenizer } from '../../src/formats/tokenizer.js';
import { EdgeloraError } from '../../src/util/errors.js';

const d = buildDemoTokenizer();
const tok: EdgeTokenizer = createTokenizer({ tokenizerJson: d.tokenizerJson, tokenizerConfig: d.tokenizerConfig, extraEosTokenIds: [d.ids.endOfTurn] });
let dir = '';

async function write(name: string, lines: string[]): Promise<string> {
  if (!dir) dir = await fs.mkdtemp(path.join(os.tmpdir(), 'edgelora-jsonl-'));
  const f = path.join(dir, name);
  await fs.writeFile(f, lines.join('\n'));
  return f;
}

/** Text of the loss-bearing tokens, each maximal run decoded separately. */
function lossSpans(ex: { inputIds: number[]; labels: number[] }): string[] {
  const spans: string[] = [];
  let cur: number[] = [];
  ex.labels.forEach((l, i) => {
    if (l !== IGNORE_INDEX) {
      assert.equal(l, ex.inputIds[i], 'a loss label equals its input id (unshifted)');
      cur.push(l);
    } else if (cur.length) {
      spans.push(tok.decode(cur));
      cur = [];
    }
  });
  if (cur.length) spans.push(tok.decode(cur));
  return spans;
}

async function expectErr(p: Promise<unknown>, mustName: string[]): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof EdgeloraError, String(err));
    const t = err.describe();
    for (const s of mustName) assert.ok(t.includes(s), `"${t}" should mention "${s}"`);
    return true;
  });
}

test('text rows: BOS + all tokens carry loss', async () => {
  const f = await write('text.jsonl', ['{"text": "The dog was not amused."}', '', '{"text": "Hello 😀", "extra": 1}']);
  const ex = await loadJsonl(f, tok, {});
  assert.equal(ex.length, 2);
  assert.equal(ex[0]?.line, 1);
  assert.equal(ex[1]?.line, 3, 'blank lines are skipped but still counted');
  for (const e of ex) {
    assert.equal(e.inputIds[0], d.ids.bos);
    assert.deepEqual(e.labels, e.inputIds);
  }
  assert.equal(tok.decode(ex[1]?.inputIds ?? []), '<|begin_of_text|>Hello 😀');
});

test('prompt/completion rows: loss only on the completion and the EOS after it', async () => {
  const f = await write('pc.jsonl', ['{"prompt": "Q: What is two plus two?\\nA:", "completion": " Four."}']);
  const [ex] = await loadJsonl(f, tok, {});
  assert.ok(ex);
  assert.equal(ex.inputIds[0], d.ids.bos);
  assert.equal(ex.inputIds[ex.inputIds.length - 1], d.ids.eos);
  assert.deepEqual(lossSpans(ex), [' Four.<|end_of_text|>']);
  assert.equal(tok.decode(ex.inputIds), '<|begin_of_text|>Q: What is two plus two?\nA: Four.<|end_of_text|>');
  const nPrompt = ex.labels.findIndex((l) => l !== IGNORE_INDEX);
  assert.equal(tok.decode(ex.inputIds.slice(0, nPrompt)), '<|begin_of_text|>Q: What is two plus two?\nA:');
});

test('messages rows: rendered by the chat template, loss on every assistant turn', async () => {
  const row = {
    messages: [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: 'Capital of France?' },
      { role: 'assistant', content: 'Paris.' },
    ],
  };
  const f = await write('chat.jsonl', [JSON.stringify(row)]);
  const [ex] = await loadJsonl(f, tok, {});
  assert.ok(ex);
  assert.equal(
    tok.decode(ex.inputIds),
    '<|begin_of_text|><|system|>\nBe brief.<|end|><|user|>\nHi<|end|><|assistant|>\nHello!<|end|><|user|>\nCapital of France?<|end|><|assistant|>\nParis.<|end|>',
  );
  assert.deepEqual(lossSpans(ex), ['Hello!<|end|>', 'Paris.<|end|>']);
  assert.equal(ex.inputIds.filter((id) => id === d.ids.bos).length, 1, 'exactly one BOS (from the template)');
});

test('pre-tokenized rows: labels default to input_ids, given labels are kept', async () => {
  const f = await write('tok.jsonl', ['{"input_ids": [5, 6, 7]}', '{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}']);
  const ex = await loadJsonl(f, tok, {});
  assert.deepEqual(ex.map((e) => [e.inputIds, e.labels, e.line]), [
    [[5, 6, 7], [5, 6, 7], 1],
    [[5, 6, 7, 8], [-100, -100, 7, 8], 2],
  ]);
});

test('rows longer than seqLen are truncated with a warning naming the line; loss-free rows are skipped', async () => {
  const long = 'one two three four five six seven eight nine ten '.repeat(4);
  const f = await write('long.jsonl', [
    '{"text": "short"}',
    JSON.stringify({ text: long }),
    '{"prompt": "' + long + '", "completion": " end"}',
    '{"messages": [{"role": "user", "content": "no reply"}]}',
  ]);
  const warnings: string[] = [];
  const ex = await loadJsonl(f, tok, { seqLen: 16, onWarning: (m) => warnings.push(m) });
  assert.deepEqual(ex.map((e) => e.line), [1, 2]);
  assert.equal(ex[1]?.inputIds.length, 16);
  assert.equal(ex[1]?.labels.length, 16);
  assert.ok(warnings.some((w) => w.includes(`${f}:2`) && w.includes('truncated to 16')), warnings.join('\n'));
  assert.ok(warnings.some((w) => w.includes(`${f}:3`) && w.includes('truncated')), 'prompt row truncated');
  assert.ok(warnings.some((w) => w.includes(`${f}:3`) && w.includes('no tokens to learn')), 'truncation removed the completion');
  assert.ok(warnings.some((w) => w.includes(`${f}:4`) && w.includes('no tokens to learn')), 'no assistant turn');
});

test('errors name the file and the line', async () => {
  await expectErr(loadJsonl(await write('badjson.jsonl', ['{"text": "ok"}', '{"text": "unterminated']), tok, {}), ['badjson.jsonl:2', 'JSON']);
  await expectErr(loadJsonl(await write('nofield.jsonl', ['{"text": "ok"}', '', '{"content": "x"}']), tok, {}), [
    'nofield.jsonl:3',
    'no usable field',
    '"content"',
  ]);
  await expectErr(loadJsonl(await write('array.jsonl', ['[1, 2]']), tok, {}), ['array.jsonl:1', 'array']);
  await expectErr(loadJsonl(await write('texttype.jsonl', ['{"text": 5}']), tok, {}), ['texttype.jsonl:1', 'text']);
  await expectErr(loadJsonl(await write('nocompl.jsonl', ['{"prompt": "a"}']), tok, {}), ['nocompl.jsonl:1', 'completion']);
  await expectErr(loadJsonl(await write('msg.jsonl', ['{"messages": [{"role": "user", "content": 3}]}']), tok, {}), [
    'msg.jsonl:1',
    'messages.0.content',
  ]);
  await expectErr(loadJsonl(await write('role.jsonl', ['{"messages": [{"role": "robot", "content": "x"}]}']), tok, {}), ['role.jsonl:1', 'roles']);
  await expectErr(loadJsonl(await write('ids.jsonl', ['{"input_ids": [1, -2]}']), tok, {}), ['ids.jsonl:1', 'input_ids']);
  await expectErr(loadJsonl(await write('lablen.jsonl', ['{"input_ids": [1, 2, 3], "labels": [1, 2]}']), tok, {}), [
    'lablen.jsonl:1',
    'labels',
    '3',
  ]);
  await expectErr(loadJsonl(await write('labval.jsonl', ['{"input_ids": [1, 2], "labels": [1, -5]}']), tok, {}), ['labval.jsonl:1', '-100']);
  await expectErr(loadJsonl(await write('empty.jsonl', []), tok, {}), ['empty.jsonl', 'no rows']);
  await expectErr(loadJsonl(await write('blank.jsonl', ['', '  ', '']), tok, {}), ['blank.jsonl', 'no rows']);
  await expectErr(loadJsonl(path.join(dir, 'absent.jsonl'), tok, {}), ['absent.jsonl']);
  // A tokenizer without a chat template: messages rows explain what to do.
  const { chat_template: _t, ...cfg } = d.tokenizerConfig;
  const bare = createTokenizer({ tokenizerJson: d.tokenizerJson, tokenizerConfig: cfg });
  await expectErr(loadJsonl(await write('notpl.jsonl', ['{"messages": [{"role": "user", "content": "x"}]}']), bare, {}), [
    'notpl.jsonl:1',
    'chat template',
  ]);
  await fs.rm(dir, { recursive: true });
});
