// JSONL data sets → token ids + labels, Hugging Face causal-LM convention: labels are the input ids
// with IGNORE_INDEX (-100) where no loss is taken; the shift by one happens inside the loss.
// Row formats (one JSON object per line; blank lines are skipped):
//   {"text": "..."}                       loss on every token; BOS prepended when the tokenizer has one
//   {"prompt": "...", "completion": "..."} loss on the completion and the EOS that follows it
//   {"messages": [{"role", "content"}...]} rendered through the chat template; loss on EVERY assistant
//                                          turn (its content and the template's end-of-turn text), found
//                                          by rendering conversation prefixes
//   {"input_ids": [...], "labels": [...]?} pre-tokenized; labels default to input_ids
// Extra fields are ignored. A field that decides the format wins in the order input_ids, messages,
// prompt/completion, text.
import { promises as fs } from 'node:fs';
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';
import type { EdgeTokenizer, ChatMessage } from '../formats/tokenizer.js';

export const IGNORE_INDEX = -100;

export interface Example {
  inputIds: number[];
  /** Same length as inputIds; IGNORE_INDEX where no loss is taken. */
  labels: number[];
  /** 1-based line number in the file. */
  line: number;
}

export interface LoadJsonlOptions {
  /** Rows longer than this many tokens are truncated (with a warning). Default: no limit. */
  seqLen?: number;
  /** Receives warnings (truncation, rows without loss tokens that are skipped). Default: ignored. */
  onWarning?: (msg: string) => void;
}

const tokenId = z.number().int().nonnegative();
const textRow = z.object({ text: z.string() });
const promptRow = z.object({ prompt: z.string(), completion: z.string() });
const messagesRow = z.object({
  messages: z.array(z.object({ role: z.string().min(1), content: z.string() })).min(1),
});
const tokensRow = z.object({
  input_ids: z.array(tokenId).min(1),
  labels: z.array(z.number().int().refine((v) => v >= 0 || v === IGNORE_INDEX, { message: 'labels must be token ids or -100' })).optional(),
});

const FORMATS_HINT =
  'each line must be a JSON object with "text", "prompt"+"completion", "messages" ([{"role","content"}]) or "input_ids" (+ optional "labels")';

/** Loads and tokenizes a JSONL data set. Throws EdgeloraError naming the file and line on bad rows. */
export async function loadJsonl(file: string, tok: EdgeTokenizer, opts: LoadJsonlOptions = {}): Promise<Example[]> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    throw new EdgeloraError(`cannot read the data set: ${(err as Error).message}`, { where: file });
  }
  return parseJsonl(text, file, tok, opts);
}

/** As loadJsonl, from text already in memory; `file` names the source in errors. */
export function parseJsonl(text: string, file: string, tok: EdgeTokenizer, opts: LoadJsonlOptions = {}): Example[] {
  const warn = opts.onWarning ?? (() => undefined);
  if (opts.seqLen !== undefined && (!Number.isInteger(opts.seqLen) || opts.seqLen < 1)) {
    throw new EdgeloraError(`seqLen ${opts.seqLen} must be a positive integer`, { where: file });
  }
  const lines = text.split('\n');
  const out: Example[] = [];
  let rows = 0;
  for (let i = 0; i < lines.length; i++) {
    const raw = (lines[i] as string).replace(/\r$/, '');
    if (raw.trim() === '') continue;
    rows++;
    const line = i + 1;
    const where = `${file}:${line}`;
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch (err) {
      throw new EdgeloraError(`invalid JSON: ${(err as Error).message}`, { where, hint: FORMATS_HINT });
    }
    if (json === null || typeof json !== 'object' || Array.isArray(json)) {
      throw new EdgeloraError(`row is ${Array.isArray(json) ? 'an array' : json === null ? 'null' : typeof json}, not a JSON object`, {
        where,
        hint: FORMATS_HINT,
      });
    }
    let ex = rowToExample(json as Record<string, unknown>, tok, where);
    ex.line = line;
    if (opts.seqLen !== undefined && ex.inputIds.length > opts.seqLen) {
      warn(`${where}: row has ${ex.inputIds.length} tokens, truncated to ${opts.seqLen}`);
      ex = { inputIds: ex.inputIds.slice(0, opts.seqLen), labels: ex.labels.slice(0, opts.seqLen), line };
    }
    // Position 0 is never predicted (labels shift by one), so a row needs a loss label after it.
    if (!ex.labels.some((l, j) => j > 0 && l !== IGNORE_INDEX)) {
      warn(`${where}: row has no tokens to learn from${opts.seqLen !== undefined ? ' (after truncation)' : ''}; skipped`);
      continue;
    }
    out.push(ex);
  }
  if (rows === 0) {
    throw new EdgeloraError('the data set has no rows', { where: file, hint: FORMATS_HINT });
  }
  return out;
}

function schemaError(where: string, err: z.ZodError): EdgeloraError {
  const issues = err.issues.map((i) => `${i.path.join('.') || '(row)'}: ${i.message}`).join('; ');
  return new EdgeloraError(`invalid row: ${issues}`, { where, hint: FORMATS_HINT });
}

function rowToExample(row: Record<string, unknown>, tok: EdgeTokenizer, where: string): Example {
  if ('input_ids' in row) {
    const r = tokensRow.safeParse(row);
    if (!r.success) throw schemaError(where, r.error);
    const { input_ids, labels } = r.data;
    if (labels && labels.length !== input_ids.length) {
      throw new EdgeloraError(`labels has ${labels.length} entries but input_ids has ${input_ids.length}`, {
        where,
        hint: 'labels must align with input_ids (unshifted; -100 where no loss)',
      });
    }
    return { inputIds: input_ids, labels: labels ?? [...input_ids], line: 0 };
  }
  if ('messages' in row) {
    const r = messagesRow.safeParse(row);
    if (!r.success) throw schemaError(where, r.error);
    return chatExample(r.data.messages, tok, where);
  }
  if ('prompt' in row || 'completion' in row) {
    const r = promptRow.safeParse(row);
    if (!r.success) throw schemaError(where, r.error);
    const prompt = [...bos(tok), ...tok.encode(r.data.prompt)];
    const completion = [...tok.encode(r.data.completion), ...tok.eosTokenIds.slice(0, 1)];
    return { inputIds: [...prompt, ...completion], labels: [...prompt.map(() => IGNORE_INDEX), ...completion], line: 0 };
  }
  if ('text' in row) {
    const r = textRow.safeParse(row);
    if (!r.success) throw schemaError(where, r.error);
    const ids = [...bos(tok), ...tok.encode(r.data.text)];
    return { inputIds: ids, labels: [...ids], line: 0 };
  }
  const keys = Object.keys(row);
  throw new EdgeloraError(`row has no usable field (found ${keys.length ? keys.map((k) => `"${k}"`).join(', ') : 'an empty object'})`, {
    where,
    hint: FORMATS_HINT,
  });
}

function bos(tok: EdgeTokenizer): number[] {
  return tok.bosTokenId === undefined ? [] : [tok.bosTokenId];
}

/**
 * Renders the conversation and marks each assistant turn for loss. For assistant message i, the text
 * rendered for messages[0..i) with the generation prompt is a prefix of the text for messages[0..i];
 * the difference is the assistant's reply plus the template's end-of-turn marker. Segments are
 * tokenized separately (boundaries fall on template markup), special tokens come from the text itself.
 */
function chatExample(messages: ChatMessage[], tok: EdgeTokenizer, where: string): Example {
  const render = (msgs: ChatMessage[], gen: boolean) => {
    try {
      return tok.applyChatTemplate(msgs, { addGenerationPrompt: gen });
    } catch (err) {
      if (err instanceof EdgeloraError) throw new EdgeloraError(err.message, { where: `${where} (${err.where ?? 'chat template'})`, ...(err.hint ? { hint: err.hint } : {}) });
      throw err;
    }
  };
  const full = render(messages, false);
  const segments: Array<{ text: string; loss: boolean }> = [];
  let pos = 0;
  for (let i = 0; i < messages.length; i++) {
    if ((messages[i] as ChatMessage).role !== 'assistant') continue;
    const prefix = render(messages.slice(0, i), true);
    const upto = render(messages.slice(0, i + 1), false);
    if (prefix.length < pos || !upto.startsWith(prefix) || !full.startsWith(upto)) {
      throw new EdgeloraError(`cannot locate assistant message ${i} in the rendered chat: the template does not render prefixes consistently`, {
        where,
        hint: 'convert this row to {"prompt", "completion"} (the rendered history as prompt, the reply as completion)',
      });
    }
    segments.push({ text: full.slice(pos, prefix.length), loss: false });
    segments.push({ text: upto.slice(prefix.length), loss: true });
    pos = upto.length;
  }
  segments.push({ text: full.slice(pos), loss: false });
  const inputIds: number[] = [];
  const labels: number[] = [];
  for (const s of segments) {
    if (s.text === '') continue;
    const ids = tok.encode(s.text);
    inputIds.push(...ids);
    labels.push(...(s.loss ? ids : ids.map(() => IGNORE_INDEX)));
  }
  return { inputIds, labels, line: 0 };
}
