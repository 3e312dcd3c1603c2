// tokenizer.ggml.* ↔ tokenizer.json + tokenizer_config.json for byte-level BPE vocabularies
// (tokenizer.ggml.model "gpt2": GPT-2, Qwen2, Llama 3). The pre-tokenizer regex follows
// tokenizer.ggml.pre as llama.cpp's llama-vocab.cpp does; token types map to added/special tokens.
import { z } from 'zod';
import { EdgeloraError } from '../../util/errors.js';
import type { GgufValue } from './reader.js';
import type { GgufMeta } from './writer.js';

/** llama_token_type (llama.cpp). */
export const TOKEN_TYPE = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

const QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/** Hugging Face pre-tokenizer per tokenizer.ggml.pre (the ones whose regex edgelora knows). */
const PRE_TOKENIZERS: Readonly<Record<string, { pre: object; ignoreMerges: boolean }>> = {
  'gpt-2': { pre: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true }, ignoreMerges: false },
  qwen2: {
    pre: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: QWEN2_REGEX }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
      ],
    },
    ignoreMerges: false,
  },
  'llama-bpe': {
    pre: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: LLAMA3_REGEX }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    ignoreMerges: true,
  },
};

const ggufTokenizerSchema = z
  .object({
    'tokenizer.ggml.model': z.string(),
    'tokenizer.ggml.pre': z.string().optional(),
    'tokenizer.ggml.tokens': z.array(z.string()).min(1),
    'tokenizer.ggml.token_type': z.array(z.number().int()).optional(),
    'tokenizer.ggml.merges': z.array(z.string()).optional(),
    'tokenizer.ggml.scores': z.array(z.number()).optional(),
    'tokenizer.ggml.unknown_token_id': z.number().int().nonnegative().optional(),
    'tokenizer.ggml.add_space_prefix': z.boolean().optional(),
    'tokenizer.ggml.bos_token_id': z.number().int().nonnegative().optional(),
    'tokenizer.ggml.eos_token_id': z.number().int().nonnegative().optional(),
    'tokenizer.ggml.padding_token_id': z.number().int().nonnegative().optional(),
    'tokenizer.ggml.add_bos_token': z.boolean().optional(),
    'tokenizer.chat_template': z.string().optional(),
  })
  .loose();

export interface TokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  /** Token count of the GGUF vocabulary. */
  size: number;
}

/** Builds tokenizer.json and tokenizer_config.json from a GGUF file's tokenizer.ggml.* metadata. */
export function tokenizerFromGguf(meta: ReadonlyMap<string, GgufValue>, where: string): TokenizerFiles {
  const r = ggufTokenizerSchema.safeParse(Object.fromEntries(meta));
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new EdgeloraError(`tokenizer metadata ${i.path.join('.')}: ${i.message}`, { where, hint: 'the GGUF file needs its tokenizer (tokenizer.ggml.*) to generate and chat' });
  }
  const m = r.data;
  const model = m['tokenizer.ggml.model'];
  if (model === 'llama') return sentencePieceFromGguf(m, where);
  if (model !== 'gpt2') {
    throw new EdgeloraError(`tokenizer.ggml.model "${model}" is not imported (byte-level BPE "gpt2" and SentencePiece "llama" are)`, {
      where: `${where} (metadata tokenizer.ggml.model)`,
      hint: 'take tokenizer.json from the Hugging Face repository of the model and copy it into the output directory',
    });
  }
  const preName = m['tokenizer.ggml.pre'] ?? 'gpt-2';
  const pre = PRE_TOKENIZERS[preName === 'default' ? 'gpt-2' : preName];
  if (!pre) {
    throw new EdgeloraError(`tokenizer.ggml.pre "${preName}" is not known to edgelora`, {
      where: `${where} (metadata tokenizer.ggml.pre)`,
      hint: `known: ${Object.keys(PRE_TOKENIZERS).join(', ')}, default`,
    });
  }
  const tokens = m['tokenizer.ggml.tokens'];
  const types = m['tokenizer.ggml.token_type'] ?? tokens.map(() => TOKEN_TYPE.NORMAL);
  if (types.length !== tokens.length) {
    throw new EdgeloraError(`tokenizer.ggml.token_type has ${types.length} entries for ${tokens.length} tokens`, { where });
  }
  const vocab: Record<string, number> = {};
  const added: object[] = [];
  const addedDecoder: Record<string, object> = {};
  tokens.forEach((t, id) => {
    const type = types[id]!;
    if (type === TOKEN_TYPE.UNUSED) return; // padding rows of the embedding: no text maps to them
    if (vocab[t] === undefined) vocab[t] = id;
    if (type === TOKEN_TYPE.CONTROL || type === TOKEN_TYPE.USER_DEFINED) {
      const special = type === TOKEN_TYPE.CONTROL;
      added.push({ id, content: t, single_word: false, lstrip: false, rstrip: false, normalized: !special, special });
      addedDecoder[String(id)] = { content: t, lstrip: false, normalized: !special, rstrip: false, single_word: false, special };
    }
  });
  const merges = (m['tokenizer.ggml.merges'] ?? []).map((s) => {
    const at = s.indexOf(' ');
    if (at <= 0) throw new EdgeloraError(`tokenizer.ggml.merges entry ${JSON.stringify(s)} is not "a b"`, { where });
    return [s.slice(0, at), s.slice(at + 1)];
  });
  const name = (id: number | undefined): string | null => (id === undefined ? null : (tokens[id] ?? null));
  const bos = name(m['tokenizer.ggml.bos_token_id']);
  const eos = name(m['tokenizer.ggml.eos_token_id']);
  const pad = name(m['tokenizer.ggml.padding_token_id']);
  const addBos = m['tokenizer.ggml.add_bos_token'] ?? false;
  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: pre.pre,
    post_processor:
      addBos && bos !== null
        ? {
            type: 'TemplateProcessing',
            single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
            pair: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
            special_tokens: { [bos]: { id: bos, ids: [m['tokenizer.ggml.bos_token_id']], tokens: [bos] } },
          }
        : { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: pre.ignoreMerges,
      vocab,
      merges,
    },
  };
  const tokenizerConfig: Record<string, unknown> = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    ...(bos !== null ? { bos_token: bos } : {}),
    ...(eos !== null ? { eos_token: eos } : {}),
    ...(pad !== null ? { pad_token: pad } : {}),
    add_bos_token: addBos,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    ...(m['tokenizer.chat_template'] !== undefined ? { chat_template: m['tokenizer.chat_template'] } : {}),
    added_tokens_decoder: addedDecoder,
  };
  return { tokenizerJson, tokenizerConfig, size: tokens.length };
}

type GgufTokenizerMeta = z.infer<typeof ggufTokenizerSchema>;

/**
 * A SentencePiece vocabulary (tokenizer.ggml.model "llama": Llama 2, TinyLlama, Mistral) as a
 * Hugging Face BPE with byte fallback, the way transformers' LlamaConverter does it: merges are every
 * split of a piece into two pieces of the vocabulary, ranked by the merged piece's score (llama.cpp's
 * tokenizer merges the best-scoring bigram first, so the orders agree), spaces become "▁" with one
 * prepended (add_space_prefix, default true).
 */
function sentencePieceFromGguf(m: GgufTokenizerMeta, where: string): TokenizerFiles {
  const tokens = m['tokenizer.ggml.tokens'];
  const scores = m['tokenizer.ggml.scores'];
  const types = m['tokenizer.ggml.token_type'] ?? tokens.map(() => TOKEN_TYPE.NORMAL);
  if (!scores || scores.length !== tokens.length || types.length !== tokens.length) {
    throw new EdgeloraError(`a SentencePiece vocabulary needs tokenizer.ggml.scores and token_type for all ${tokens.length} tokens`, { where });
  }
  const vocab: Record<string, number> = {};
  const added: object[] = [];
  const addedDecoder: Record<string, object> = {};
  tokens.forEach((t, id) => {
    if (vocab[t] === undefined) vocab[t] = id;
    const type = types[id]!;
    if (type === TOKEN_TYPE.CONTROL || type === TOKEN_TYPE.UNKNOWN || type === TOKEN_TYPE.USER_DEFINED) {
      const special = type !== TOKEN_TYPE.USER_DEFINED;
      added.push({ id, content: t, single_word: false, lstrip: false, rstrip: false, normalized: !special, special });
      addedDecoder[String(id)] = { content: t, lstrip: false, normalized: !special, rstrip: false, single_word: false, special };
    }
  });
  // Merges: only normal pieces merge (bytes, control and unknown tokens are whole).
  const mergeable = (id: number | undefined) => id !== undefined && (types[id] === TOKEN_TYPE.NORMAL || types[id] === TOKEN_TYPE.USER_DEFINED);
  const merges: { l: string; r: string; score: number; li: number; ri: number }[] = [];
  tokens.forEach((piece, id) => {
    if (!mergeable(id)) return;
    const chars = [...piece];
    const local: typeof merges = [];
    for (let i = 1; i < chars.length; i++) {
      const l = chars.slice(0, i).join('');
      const rr = chars.slice(i).join('');
      if (mergeable(vocab[l]) && mergeable(vocab[rr])) local.push({ l, r: rr, score: scores[id]!, li: vocab[l]!, ri: vocab[rr]! });
    }
    local.sort((a, b) => a.li - b.li || a.ri - b.ri);
    merges.push(...local);
  });
  merges.sort((a, b) => b.score - a.score); // stable: ties keep vocabulary order, as the converter's sort
  const name = (id: number | undefined): string | null => (id === undefined ? null : (tokens[id] ?? null));
  const bosId = m['tokenizer.ggml.bos_token_id'];
  const bos = name(bosId);
  const eos = name(m['tokenizer.ggml.eos_token_id']);
  const unk = name(m['tokenizer.ggml.unknown_token_id'] ?? tokens.findIndex((_, i) => types[i] === TOKEN_TYPE.UNKNOWN));
  const pad = name(m['tokenizer.ggml.padding_token_id']);
  const addBos = m['tokenizer.ggml.add_bos_token'] ?? true;
  const prefix = m['tokenizer.ggml.add_space_prefix'] ?? true;
  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: {
      type: 'Sequence',
      normalizers: [...(prefix ? [{ type: 'Prepend', prepend: '▁' }] : []), { type: 'Replace', pattern: { String: ' ' }, content: '▁' }],
    },
    pre_tokenizer: null,
    post_processor:
      addBos && bos !== null
        ? {
            type: 'TemplateProcessing',
            single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
            pair: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
            special_tokens: { [bos]: { id: bos, ids: [bosId], tokens: [bos] } },
          }
        : null,
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        ...(prefix ? [{ type: 'Strip', content: ' ', start: 1, stop: 0 }] : []),
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: unk,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: merges.map((x) => [x.l, x.r]),
    },
  };
  const tokenizerConfig: Record<string, unknown> = {
    tokenizer_class: 'LlamaTokenizerFast',
    ...(bos !== null ? { bos_token: bos } : {}),
    ...(eos !== null ? { eos_token: eos } : {}),
    ...(unk !== null ? { unk_token: unk } : {}),
    ...(pad !== null ? { pad_token: pad } : {}),
    add_bos_token: addBos,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    legacy: true,
    ...(m['tokenizer.chat_template'] !== undefined ? { chat_template: m['tokenizer.chat_template'] } : {}),
    added_tokens_decoder: addedDecoder,
  };
  return { tokenizerJson, tokenizerConfig, size: tokens.length };
}

const hfTokenizerSchema = z
  .object({
    added_tokens: z.array(z.object({ id: z.number().int().nonnegative(), content: z.string(), special: z.boolean().optional() }).loose()).optional(),
    pre_tokenizer: z.unknown(),
    model: z
      .object({
        type: z.literal('BPE'),
        vocab: z.record(z.string(), z.number().int().nonnegative()),
        merges: z.array(z.union([z.string(), z.tuple([z.string(), z.string()])])),
      })
      .loose(),
  })
  .loose();

const tokenField = z.union([z.string(), z.object({ content: z.string() }).loose()]).nullish().transform((v) => (v == null ? undefined : typeof v === 'string' ? v : v.content));
const hfTokenizerConfigSchema = z
  .object({ bos_token: tokenField, eos_token: tokenField, pad_token: tokenField, add_bos_token: z.boolean().nullish(), chat_template: z.string().nullish() })
  .loose();

/** Which llama.cpp pre-tokenizer a tokenizer.json's pre_tokenizer is (by its regex). */
function preName(pre: unknown): string | null {
  const s = JSON.stringify(pre);
  if (s.includes(JSON.stringify(QWEN2_REGEX).slice(1, -1))) return 'qwen2';
  if (s.includes(JSON.stringify(LLAMA3_REGEX).slice(1, -1))) return 'llama-bpe';
  const p = pre as { type?: unknown; use_regex?: unknown } | null;
  if (p && p.type === 'ByteLevel' && p.use_regex !== false) return 'gpt-2';
  return null;
}

/** tokenizer.ggml.* metadata for a model directory's tokenizer.json / tokenizer_config.json (byte-level BPE). */
export function ggufTokenizerMeta(tokenizerJson: unknown, tokenizerConfig: unknown, vocabSize: number, where: string): [string, GgufMeta][] {
  const t = hfTokenizerSchema.safeParse(tokenizerJson);
  if (!t.success) {
    throw new EdgeloraError(`tokenizer.json: ${t.error.issues[0]!.path.join('.')}: ${t.error.issues[0]!.message}`, {
      where,
      hint: 'GGUF export writes byte-level BPE vocabularies (GPT-2, Qwen2, Llama 3 style)',
    });
  }
  const pre = preName(t.data.pre_tokenizer);
  if (!pre) throw new EdgeloraError('tokenizer.json: pre-tokenizer is not one llama.cpp knows (gpt-2, qwen2, llama-bpe)', { where });
  const c = hfTokenizerConfigSchema.parse(tokenizerConfig ?? {});
  const tokens = new Array<string | undefined>(vocabSize).fill(undefined);
  const types = new Array<number>(vocabSize).fill(TOKEN_TYPE.UNUSED);
  for (const [tok, id] of Object.entries(t.data.model.vocab)) {
    if (id >= vocabSize) throw new EdgeloraError(`tokenizer.json: token id ${id} is not below vocab_size ${vocabSize}`, { where });
    tokens[id] = tok;
    types[id] = TOKEN_TYPE.NORMAL;
  }
  for (const a of t.data.added_tokens ?? []) {
    if (a.id >= vocabSize) throw new EdgeloraError(`tokenizer.json: added token id ${a.id} is not below vocab_size ${vocabSize}`, { where });
    tokens[a.id] = a.content;
    types[a.id] = a.special ? TOKEN_TYPE.CONTROL : TOKEN_TYPE.USER_DEFINED;
  }
  const filled = tokens.map((tok, i) => tok ?? `[PAD${i}]`);
  const idOf = (name: string | undefined): number | undefined => (name === undefined ? undefined : filled.indexOf(name) >= 0 ? filled.indexOf(name) : undefined);
  const merges = t.data.model.merges.map((mm) => (typeof mm === 'string' ? mm : `${mm[0]} ${mm[1]}`));
  const meta: [string, GgufMeta][] = [
    ['tokenizer.ggml.model', { type: 'string', value: 'gpt2' }],
    ['tokenizer.ggml.pre', { type: 'string', value: pre }],
    ['tokenizer.ggml.tokens', { type: 'string[]', value: filled }],
    ['tokenizer.ggml.token_type', { type: 'i32[]', value: types }],
    ['tokenizer.ggml.merges', { type: 'string[]', value: merges }],
  ];
  const bos = idOf(c.bos_token);
  const eos = idOf(c.eos_token);
  const pad = idOf(c.pad_token);
  if (bos !== undefined) meta.push(['tokenizer.ggml.bos_token_id', { type: 'u32', value: bos }]);
  if (eos !== undefined) meta.push(['tokenizer.ggml.eos_token_id', { type: 'u32', value: eos }]);
  if (pad !== undefined) meta.push(['tokenizer.ggml.padding_token_id', { type: 'u32', value: pad }]);
  meta.push(['tokenizer.ggml.add_bos_token', { type: 'bool', value: c.add_bos_token === true }]);
  if (c.chat_template) meta.push(['tokenizer.chat_template', { type: 'string', value: c.chat_template }]);
  return meta;
}
