// Tokenizer + chat template from a Hugging Face model directory: tokenizer.json through
// @huggingface/tokenizers, tokenizer_config.json's chat_template through @huggingface/jinja, and a
// streaming decoder that never splits a multi-byte UTF-8 character across printed chunks.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Tokenizer as HfTokenizerImpl } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { z } from 'zod';
import { EdgeloraError } from '../util/errors.js';

// The package's .d.ts files use extensionless relative imports, which NodeNext resolution cannot
// follow, so TypeScript sees its exports as `any`. This is the part of its API we use, typed here.
interface HfTokenizerApi {
  encode(text: string, opts?: { add_special_tokens?: boolean }): { ids: number[] };
  decode(ids: number[], opts?: { skip_special_tokens?: boolean; clean_up_tokenization_spaces?: boolean | null }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
}
const HfTokenizerCtor = HfTokenizerImpl as unknown as new (tokenizerJson: object, tokenizerConfig: object) => HfTokenizerApi;

export interface ChatMessage {
  role: string;
  content: string;
}

export interface EdgeTokenizer {
  /** Token ids of `text`. Special tokens (BOS) are added only when `addSpecialTokens` is true (default false). */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  /** Text of `ids`; ids outside the vocabulary decode to nothing. `skipSpecialTokens` defaults to false. */
  decode(ids: readonly number[], opts?: { skipSpecialTokens?: boolean }): string;
  bosTokenId?: number;
  /** Every id that ends generation (tokenizer_config eos_token, generation_config/config eos_token_id). */
  eosTokenIds: number[];
  /** pad_token, else the first EOS, else 0. */
  padTokenId: number;
  /** 1 + the largest token id the tokenizer knows (may be below the model's vocab_size). */
  vocabSize: number;
  hasChatTemplate: boolean;
  /** Renders `messages` through the chat template (text, not ids; encode it without special tokens). */
  applyChatTemplate(messages: ChatMessage[], opts?: { addGenerationPrompt?: boolean }): string;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
}

// Special tokens in tokenizer_config.json are strings or AddedToken dicts.
const tokenField = z
  .union([z.string(), z.object({ content: z.string() }).loose()])
  .nullish()
  .transform((v) => (v == null ? undefined : typeof v === 'string' ? v : v.content));

const tokenizerConfigSchema = z
  .object({
    bos_token: tokenField,
    eos_token: tokenField,
    pad_token: tokenField,
    unk_token: tokenField,
    add_bos_token: z.boolean().nullish(),
    clean_up_tokenization_spaces: z.boolean().nullish(),
    chat_template: z
      .union([z.string(), z.array(z.object({ name: z.string(), template: z.string() }))])
      .nullish(),
  })
  .loose();

const eosField = z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())]).nullish();
const generationConfigSchema = z.object({ eos_token_id: eosField, bos_token_id: z.number().int().nullish() }).loose();

async function readJson(file: string, required: boolean): Promise<unknown> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new EdgeloraError(`cannot read: ${(err as Error).message}`, {
      where: file,
      hint: 'a Hugging Face model directory holds tokenizer.json and tokenizer_config.json',
    });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`not valid JSON: ${(err as Error).message}`, { where: file });
  }
}

function asIdList(v: number | number[] | null | undefined): number[] {
  return v == null ? [] : Array.isArray(v) ? v : [v];
}

export interface TokenizerSources {
  /** Parsed tokenizer.json. */
  tokenizerJson: unknown;
  /** Parsed tokenizer_config.json ({} when absent). */
  tokenizerConfig?: unknown;
  /** eos ids from generation_config.json / config.json, added to tokenizer_config's eos_token. */
  extraEosTokenIds?: number[];
  /** A chat template from chat_template.jinja, used when tokenizer_config has none. */
  chatTemplate?: string;
  /** Names the source in errors (usually the model directory). */
  where?: string;
}

/** Builds a tokenizer from already-parsed files (loadTokenizer reads them from a directory). */
export function createTokenizer(src: TokenizerSources): EdgeTokenizer {
  return new HfTokenizer(src);
}

/**
 * Loads tokenizer.json, tokenizer_config.json (optional), chat_template.jinja (optional) and the eos ids
 * of generation_config.json / config.json (optional) from `dir`.
 */
export async function loadTokenizer(dir: string): Promise<EdgeTokenizer> {
  const tokenizerJson = await readJson(path.join(dir, 'tokenizer.json'), true);
  const tokenizerConfig = (await readJson(path.join(dir, 'tokenizer_config.json'), false)) ?? {};
  const extra: number[] = [];
  for (const name of ['generation_config.json', 'config.json']) {
    const j = await readJson(path.join(dir, name), false);
    if (j === undefined) continue;
    const g = generationConfigSchema.safeParse(j);
    if (!g.success) {
      throw new EdgeloraError(`eos_token_id must be an id or a list of ids`, { where: path.join(dir, name) });
    }
    extra.push(...asIdList(g.data.eos_token_id));
  }
  let chatTemplate: string | undefined;
  try {
    chatTemplate = await fs.readFile(path.join(dir, 'chat_template.jinja'), 'utf8');
  } catch {
    chatTemplate = undefined;
  }
  const src: TokenizerSources = { tokenizerJson, tokenizerConfig, extraEosTokenIds: extra, where: dir };
  if (chatTemplate !== undefined) src.chatTemplate = chatTemplate;
  return createTokenizer(src);
}

class HfTokenizer implements EdgeTokenizer {
  private readonly tok: HfTokenizerApi;
  private readonly where: string;
  private readonly addBos: boolean;
  private readonly cleanUp: boolean;
  private readonly templateText: string | undefined;
  private template: Template | undefined;
  private readonly names: { bos?: string; eos?: string; pad?: string; unk?: string };
  bosTokenId?: number;
  eosTokenIds: number[];
  padTokenId: number;
  vocabSize: number;
  hasChatTemplate: boolean;

  constructor(src: TokenizerSources) {
    this.where = src.where ?? 'tokenizer';
    const cfgParsed = tokenizerConfigSchema.safeParse(src.tokenizerConfig ?? {});
    if (!cfgParsed.success) {
      throw new EdgeloraError(
        `invalid tokenizer_config.json: ${cfgParsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
        { where: path.join(this.where, 'tokenizer_config.json') },
      );
    }
    const cfg = cfgParsed.data;
    try {
      // The library reads bos/eos/pad names itself only loosely; we resolve them below.
      this.tok = new HfTokenizerCtor(src.tokenizerJson as object, (src.tokenizerConfig ?? {}) as object);
    } catch (err) {
      throw new EdgeloraError(`cannot build the tokenizer: ${(err as Error).message}`, {
        where: path.join(this.where, 'tokenizer.json'),
        hint: 'tokenizer.json must be a Hugging Face "fast" tokenizer file (BPE, WordPiece or Unigram)',
      });
    }
    this.names = {};
    if (cfg.bos_token !== undefined) this.names.bos = cfg.bos_token;
    if (cfg.eos_token !== undefined) this.names.eos = cfg.eos_token;
    if (cfg.pad_token !== undefined) this.names.pad = cfg.pad_token;
    if (cfg.unk_token !== undefined) this.names.unk = cfg.unk_token;
    const idOf = (name: string | undefined, field: string): number | undefined => {
      if (name === undefined) return undefined;
      const id = this.tok.token_to_id(name);
      if (id === undefined) {
        throw new EdgeloraError(`${field} "${name}" is not in the vocabulary`, {
          where: path.join(this.where, 'tokenizer_config.json'),
          hint: 'tokenizer_config.json and tokenizer.json come from different models',
        });
      }
      return id;
    };
    const bos = idOf(this.names.bos, 'bos_token');
    if (bos !== undefined) this.bosTokenId = bos;
    const eos = [idOf(this.names.eos, 'eos_token'), ...(src.extraEosTokenIds ?? [])].filter((x): x is number => x !== undefined);
    this.eosTokenIds = [...new Set(eos)];
    this.padTokenId = idOf(this.names.pad, 'pad_token') ?? this.eosTokenIds[0] ?? 0;
    this.addBos = cfg.add_bos_token === true;
    // transformers now defaults this to false; true would turn " ." into "." and break round trips.
    this.cleanUp = cfg.clean_up_tokenization_spaces ?? false;
    let maxId = -1;
    for (const id of this.tok.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const t = cfg.chat_template;
    this.templateText = typeof t === 'string' ? t : Array.isArray(t) ? (t.find((x) => x.name === 'default') ?? t[0])?.template : src.chatTemplate;
    this.hasChatTemplate = this.templateText !== undefined;
  }

  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    const add = opts.addSpecialTokens ?? false;
    const ids = this.tok.encode(text, { add_special_tokens: add }).ids;
    if (add && this.addBos && this.bosTokenId !== undefined && ids[0] !== this.bosTokenId) ids.unshift(this.bosTokenId);
    return ids;
  }

  decode(ids: readonly number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    const known = ids.filter((id) => this.tok.id_to_token(id) !== undefined);
    if (known.length === 0) return '';
    return this.tok.decode(known, { skip_special_tokens: opts.skipSpecialTokens ?? false, clean_up_tokenization_spaces: this.cleanUp });
  }

  applyChatTemplate(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    if (this.templateText === undefined) {
      throw new EdgeloraError('this tokenizer has no chat template', {
        where: path.join(this.where, 'tokenizer_config.json'),
        hint: 'use a chat/instruct model, or plain text / prompt-completion data instead of messages',
      });
    }
    if (!this.template) {
      try {
        this.template = new Template(this.templateText);
      } catch (err) {
        throw new EdgeloraError(`chat_template does not parse: ${(err as Error).message}`, {
          where: path.join(this.where, 'tokenizer_config.json'),
        });
      }
    }
    try {
      return this.template.render({
        messages,
        add_generation_prompt: opts.addGenerationPrompt ?? false,
        bos_token: this.names.bos ?? '',
        eos_token: this.names.eos ?? '',
        pad_token: this.names.pad ?? '',
        unk_token: this.names.unk ?? '',
      });
    } catch (err) {
      throw new EdgeloraError(`chat_template failed: ${(err as Error).message}`, {
        where: path.join(this.where, 'tokenizer_config.json'),
        hint: 'check the message roles and order the template expects',
      });
    }
  }

  tokenToId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }
}

/**
 * Turns a stream of token ids into printable text. A token may end in the middle of a multi-byte
 * UTF-8 character; its text is held back (decoding ends in U+FFFD) until the character completes.
 * Decodes a sliding window (as text-generation-inference does) so the cost per token stays small.
 */
export class StreamDecoder {
  private ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;
  private readonly skip: boolean;
  constructor(
    private readonly tok: EdgeTokenizer,
    opts: { skipSpecialTokens?: boolean } = {},
  ) {
    this.skip = opts.skipSpecialTokens ?? true;
  }

  /** Adds one token; returns the text that became printable (often '', sometimes several characters). */
  push(id: number): string {
    this.ids.push(id);
    const dec = (a: number, b?: number) => this.tok.decode(this.ids.slice(a, b), { skipSpecialTokens: this.skip });
    const prefix = dec(this.prefixOffset, this.readOffset);
    const full = dec(this.prefixOffset);
    if (full.length > prefix.length && !full.endsWith('\uFFFD')) {
      const out = full.slice(prefix.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      if (this.prefixOffset > 64) {
        // Drop ids nothing will decode again.
        this.ids = this.ids.slice(this.prefixOffset);
        this.readOffset -= this.prefixOffset;
        this.prefixOffset = 0;
      }
      return out;
    }
    return '';
  }

  /** Returns whatever is still held back (an incomplete character decodes as U+FFFD) and resets. */
  flush(): string {
    let out = '';
    if (this.readOffset < this.ids.length) {
      const prefix = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset), { skipSpecialTokens: this.skip });
      out = this.tok.decode(this.ids.slice(this.prefixOffset), { skipSpecialTokens: this.skip }).slice(prefix.length);
    }
    this.ids = [];
    this.prefixOffset = 0;
    this.readOffset = 0;
    return out;
  }
}
