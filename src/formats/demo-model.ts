// Demo checkpoints: a deterministic random-init Llama model in Hugging Face layout (config.json,
// model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json), so every command
// can be tried and tested without downloading weights. The tokenizer is byte-level BPE whose merges are
// learned (deterministically) from a small built-in English text. The real-shape presets (qwen2.5-0.5b,
// llama-3.2-1b, smollm2-360m) have the published shapes, in bf16 as Hugging Face ships them, with random weights:
// they exist for benchmarks and memory tests, and their text is noise.
// Dimension letters: C hidden, H heads, G kv heads, D head dim, F intermediate, V vocab.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import * as hfTokenizers from '@huggingface/tokenizers';
import { writeSafetensors, type WriteEntry } from './safetensors.js';
import { expectedWeightShapes, parseHfConfig } from './hf-config.js';
import { writeDirAtomic, writeFileAtomic } from '../util/atomic.js';
import { EdgeloraError } from '../util/errors.js';
import { Rng } from '../util/rng.js';

export type DemoPreset = 'tiny' | 'small' | 'qwen2.5-0.5b' | 'llama-3.2-1b' | 'smollm2-360m';

export interface DemoPresetSpec {
  /** config.json architectures[0]; default LlamaForCausalLM. Qwen2 implies q/k/v biases. */
  architecture?: 'LlamaForCausalLM' | 'Qwen2ForCausalLM';
  /** D; default C / H. */
  headDim?: number;
  /** Default 10000. */
  ropeTheta?: number;
  /** Default 1e-5. */
  rmsNormEps?: number;
  /** Llama 3's rope_scaling block, verbatim; default null. */
  ropeScaling?: Record<string, number | string> | null;
  /** Stored dtype of model.safetensors; default F32. */
  dtype?: 'F32' | 'BF16';
  hiddenSize: number; // C
  numLayers: number;
  numHeads: number; // H
  numKvHeads: number; // G
  intermediateSize: number; // F
  /** Config vocab_size; 'tokenizer' = the demo tokenizer's size rounded up to a multiple of 64. */
  vocabSize: number | 'tokenizer';
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
}

/**
 * tiny: ~1M parameters, GQA 4:2, for tests (F = 384 rather than ~344 so every K is a multiple of 128,
 * which keeps 4-bit block sizes 32..128 valid). small: ~100M parameters (tied embeddings), ~400 MB float32.
 */
export const DEMO_PRESETS: Readonly<Record<DemoPreset, DemoPresetSpec>> = Object.freeze({
  tiny: {
    hiddenSize: 128,
    numLayers: 4,
    numHeads: 4,
    numKvHeads: 2,
    intermediateSize: 384,
    vocabSize: 'tokenizer',
    maxPositionEmbeddings: 512,
    tieWordEmbeddings: true,
  },
  small: {
    hiddenSize: 768,
    numLayers: 12,
    numHeads: 12,
    numKvHeads: 4,
    intermediateSize: 2048,
    vocabSize: 32000,
    maxPositionEmbeddings: 2048,
    tieWordEmbeddings: true,
  },
  // The published configs (Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B, HuggingFaceTB/SmolLM2-360M), shapes only.
  'qwen2.5-0.5b': {
    architecture: 'Qwen2ForCausalLM',
    hiddenSize: 896,
    numLayers: 24,
    numHeads: 14,
    numKvHeads: 2,
    headDim: 64,
    intermediateSize: 4864,
    vocabSize: 151936,
    maxPositionEmbeddings: 32768,
    tieWordEmbeddings: true,
    ropeTheta: 1000000.0,
    rmsNormEps: 1e-6,
    dtype: 'BF16',
  },
  'llama-3.2-1b': {
    hiddenSize: 2048,
    numLayers: 16,
    numHeads: 32,
    numKvHeads: 8,
    headDim: 64,
    intermediateSize: 8192,
    vocabSize: 128256,
    maxPositionEmbeddings: 131072,
    tieWordEmbeddings: true,
    ropeTheta: 500000.0,
    rmsNormEps: 1e-5,
    ropeScaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
    dtype: 'BF16',
  },
  'smollm2-360m': {
    hiddenSize: 960,
    numLayers: 32,
    numHeads: 15,
    numKvHeads: 5,
    headDim: 64,
    intermediateSize: 2560,
    vocabSize: 49152,
    maxPositionEmbeddings: 8192,
    tieWordEmbeddings: true,
    ropeTheta: 100000.0,
    rmsNormEps: 1e-5,
    dtype: 'BF16',
  },
});

/** Presets with published shapes (bf16, random weights), for benchmarks and memory tests. */
export const REAL_SHAPE_PRESETS: readonly DemoPreset[] = ['qwen2.5-0.5b', 'llama-3.2-1b', 'smollm2-360m'];

// ---------------------------------------------------------------------------------------------
// Tokenizer

export const DEMO_SPECIAL_TOKENS = {
  bos: '<|begin_of_text|>',
  eos: '<|end_of_text|>',
  pad: '<|pad|>',
  system: '<|system|>',
  user: '<|user|>',
  assistant: '<|assistant|>',
  endOfTurn: '<|end|>',
} as const;

/** Merges learned at most; the built-in text supports a few hundred before pairs become unique. */
const MAX_MERGES = 1000;

/** The text the demo merges are learned from: plain English about everyday things and this project. */
const DEMO_CORPUS = `
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
Once upon a time there was a small robot that lived on a shelf in a workshop. Every morning the robot
would wake up, check its battery, and look out of the window at the weather. When the sun was shining,
the robot was happy. When it was raining, the robot read books about the sea and the mountains.
Hello! How are you today? I am fine, thank you. What would you like to do this afternoon?
I would like to learn how to cook a simple dinner. First, wash the vegetables and cut them into small
pieces. Then heat some oil in a pan, add the onions, and cook them until they are soft and golden.
Add the other vegetables, a little salt and pepper, and let everything cook for ten more minutes.
The model runs on a small device at the edge of the network. It answers questions, writes short notes,
and learns from the people who use it. Each device keeps its own adapter, a few small matrices that
change how the model behaves, while the large base model stays the same for every device.
Training happens at night when the device is not busy. The device reads the examples, computes the
loss, and updates the adapter weights step by step. In the morning the new adapter is ready to use,
and it can be shared with other devices in the fleet through the message broker.
Questions and answers:
What is the capital of France? The capital of France is Paris.
What is two plus two? Two plus two is four.
Why is the sky blue? Sunlight is scattered by the air, and blue light is scattered the most.
Where do you live? I live in a small house near the river, with a garden full of flowers and trees.
Can you help me write a letter? Of course. Tell me who the letter is for and what you want to say.
Thank you for your help. You are welcome. Have a nice day, and see you tomorrow!
The numbers from one to ten are: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in many texts, together with dates and times.
This is a test. This is only a test. If this had been a real message, it would have said something
interesting about the world, the people in it, and the things they make and share with each other.
In the spring the farmers plant their seeds, and in the summer the fields are green and full of life.
In the autumn the leaves turn red and yellow, and in the winter the days are short and cold.
My friend has a little cat that likes to sleep in the sun. Her name is Luna, and she is very curious.
She watches the birds from the window and sometimes tries to catch the light on the wall.
The train leaves the station at seven in the morning and arrives in the city before nine o'clock.
People read the news, drink their coffee, and talk about their plans for the day and the week.
A good teacher explains things clearly, asks questions, and listens to what the students say.
Learning takes time, practice, and patience, but it is one of the best things we can do.
Please remember to turn off the lights, close the door, and take your keys when you leave the house.
The library is open every day from nine in the morning until eight in the evening, except on Sunday.
Water boils at one hundred degrees at sea level, and it freezes at zero degrees.
The earth goes around the sun once a year, and the moon goes around the earth about once a month.
Computers store information as numbers, and programs tell them what to do with those numbers.
A language model predicts the next word in a sentence, one token at a time, using what it has seen.
It's a beautiful day, isn't it? Yes, it is. Let's go for a walk in the park and have lunch there.
I don't know the answer, but I think we can find it together if we look carefully.
`;

/** GPT-2's reversible byte → printable character map (the byte-level BPE alphabet). */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const map: string[] = new Array<string>(256);
  for (const b of bs) map[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCharCode(256 + n++);
  }
  return map;
}

// Typed by hand: the package's .d.ts cannot be followed under NodeNext (see tokenizer.ts).
const ByteLevelPreTokenizer = (
  hfTokenizers as unknown as {
    ByteLevelPreTokenizer: new (cfg: { type: 'ByteLevel'; add_prefix_space: boolean; use_regex: boolean }) => {
      pre_tokenize_text(text: string): string[];
    };
  }
).ByteLevelPreTokenizer;

/** Learns BPE merges from `text`: most frequent adjacent pair first, ties broken by the pair's text. */
function learnMerges(text: string, maxMerges: number): Array<[string, string]> {
  // The same pre-tokenizer the tokenizer will use, so merges never cross word boundaries it keeps.
  const pre = new ByteLevelPreTokenizer({ type: 'ByteLevel', add_prefix_space: false, use_regex: true });
  const counts = new Map<string, number>();
  for (const w of pre.pre_tokenize_text(text)) counts.set(w, (counts.get(w) ?? 0) + 1);
  const words = [...counts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map(([w, c]) => ({ syms: [...w], count: c }));
  const merges: Array<[string, string]> = [];
  while (merges.length < maxMerges) {
    const pairs = new Map<string, number>();
    for (const w of words) {
      for (let i = 0; i + 1 < w.syms.length; i++) {
        const k = `${w.syms[i]} ${w.syms[i + 1]}`;
        pairs.set(k, (pairs.get(k) ?? 0) + w.count);
      }
    }
    let best: string | undefined;
    let bestCount = 1; // a pair seen once teaches nothing
    for (const [k, c] of pairs) {
      if (c > bestCount || (c === bestCount && best !== undefined && k < best)) {
        best = k;
        bestCount = c;
      }
    }
    if (best === undefined) break;
    const [a, b] = best.split(' ') as [string, string];
    merges.push([a, b]);
    for (const w of words) {
      const out: string[] = [];
      for (let i = 0; i < w.syms.length; i++) {
        if (i + 1 < w.syms.length && w.syms[i] === a && w.syms[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(w.syms[i] as string);
      }
      w.syms = out;
    }
  }
  return merges;
}

export interface DemoTokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  /** Number of ids (bytes + merges + special tokens). */
  size: number;
  ids: { bos: number; eos: number; pad: number; endOfTurn: number };
}

let cachedTokenizer: DemoTokenizerFiles | undefined;

/**
 * The demo tokenizer padded to `vocabSize` ids, so that every id a real-shape model can emit decodes: the
 * extra ids are byte-level vocabulary entries ("<|x123|>", printable ASCII, so the ByteLevel decoder maps them
 * to their own text) that no merge produces, so encoding is unchanged.
 */
export function buildPaddedTokenizer(vocabSize: number): DemoTokenizerFiles {
  const tok = buildDemoTokenizer();
  if (vocabSize < tok.size) throw new EdgeloraError(`vocab_size ${vocabSize} is below the tokenizer's ${tok.size} ids`, { where: 'demo tokenizer' });
  const model = tok.tokenizerJson.model as { vocab: Record<string, number> };
  for (let id = tok.size; id < vocabSize; id++) model.vocab[`<|x${id}|>`] = id;
  return { ...tok, size: vocabSize };
}

/** The demo tokenizer's tokenizer.json and tokenizer_config.json contents (deterministic). */
export function buildDemoTokenizer(): DemoTokenizerFiles {
  if (cachedTokenizer) return structuredClone(cachedTokenizer);
  const alphabet = bytesToUnicode();
  const vocab: Record<string, number> = {};
  alphabet.forEach((ch, b) => (vocab[ch] = b));
  const merges = learnMerges(DEMO_CORPUS, MAX_MERGES);
  for (const [a, b] of merges) {
    if (vocab[a + b] === undefined) vocab[a + b] = Object.keys(vocab).length;
  }
  let next = Object.keys(vocab).length;
  const specials = Object.values(DEMO_SPECIAL_TOKENS);
  const specialIds: Record<string, number> = {};
  const addedTokens = specials.map((content) => {
    specialIds[content] = next;
    return { id: next++, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
  });
  const bosId = specialIds[DEMO_SPECIAL_TOKENS.bos] as number;
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: DEMO_SPECIAL_TOKENS.bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: DEMO_SPECIAL_TOKENS.bos, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: DEMO_SPECIAL_TOKENS.bos, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [DEMO_SPECIAL_TOKENS.bos]: { id: DEMO_SPECIAL_TOKENS.bos, ids: [bosId], tokens: [DEMO_SPECIAL_TOKENS.bos] } },
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
  // Roles are special tokens; anything else is refused rather than silently rendered as text.
  const chatTemplate =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}" +
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}" +
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|end|>{% endfor %}" +
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}";
  const tokenizerConfig = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    bos_token: DEMO_SPECIAL_TOKENS.bos,
    eos_token: DEMO_SPECIAL_TOKENS.eos,
    pad_token: DEMO_SPECIAL_TOKENS.pad,
    add_bos_token: true,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: 2048,
    chat_template: chatTemplate,
    added_tokens_decoder: Object.fromEntries(
      addedTokens.map((t) => [String(t.id), { content: t.content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true }]),
    ),
  };
  cachedTokenizer = {
    tokenizerJson,
    tokenizerConfig,
    size: next,
    ids: {
      bos: bosId,
      eos: specialIds[DEMO_SPECIAL_TOKENS.eos] as number,
      pad: specialIds[DEMO_SPECIAL_TOKENS.pad] as number,
      endOfTurn: specialIds[DEMO_SPECIAL_TOKENS.endOfTurn] as number,
    },
  };
  return structuredClone(cachedTokenizer);
}

// ---------------------------------------------------------------------------------------------
// Model

/** config.json for a preset (vocab_size resolved against the demo tokenizer). */
export function demoConfigJson(preset: DemoPreset): Record<string, unknown> {
  const p = DEMO_PRESETS[preset];
  const tok = buildDemoTokenizer();
  const vocab = p.vocabSize === 'tokenizer' ? Math.ceil(tok.size / 64) * 64 : p.vocabSize;
  if (vocab < tok.size) throw new EdgeloraError(`vocab_size ${vocab} is below the tokenizer's ${tok.size} ids`, { where: `demo preset ${preset}` });
  const arch = p.architecture ?? 'LlamaForCausalLM';
  return {
    architectures: [arch],
    model_type: arch === 'Qwen2ForCausalLM' ? 'qwen2' : 'llama',
    hidden_size: p.hiddenSize,
    intermediate_size: p.intermediateSize,
    num_hidden_layers: p.numLayers,
    num_attention_heads: p.numHeads,
    num_key_value_heads: p.numKvHeads,
    head_dim: p.headDim ?? p.hiddenSize / p.numHeads,
    hidden_act: 'silu',
    max_position_embeddings: p.maxPositionEmbeddings,
    initializer_range: 0.02,
    rms_norm_eps: p.rmsNormEps ?? 1e-5,
    rope_theta: p.ropeTheta ?? 10000.0,
    rope_scaling: p.ropeScaling ?? null,
    attention_bias: false,
    attention_dropout: 0.0,
    mlp_bias: false,
    tie_word_embeddings: p.tieWordEmbeddings,
    vocab_size: vocab,
    bos_token_id: tok.ids.bos,
    eos_token_id: [tok.ids.eos, tok.ids.endOfTurn],
    pad_token_id: tok.ids.pad,
    torch_dtype: p.dtype === 'BF16' ? 'bfloat16' : 'float32',
    use_cache: true,
  };
}

/** Parameter count of a preset (tied embeddings counted once). */
export function demoParamCount(preset: DemoPreset): number {
  const cfg = parseHfConfig(demoConfigJson(preset), `demo preset ${preset}`);
  let n = 0;
  for (const shape of expectedWeightShapes(cfg).values()) n += shape.reduce((a, b) => a * b, 1);
  return n;
}

/**
 * Writes a demo checkpoint into `outDir` (which must not exist unless `replace`), atomically.
 * Linear and embedding weights ~ N(0, 0.02²); RMSNorm weights 1 + 0.1·N(0, 1) so that the layers are
 * not all alike. Same preset and seed → byte-identical files (on the same platform: Math.log/cos are
 * not required by the spec to round identically everywhere).
 */
export async function makeDemoModel(
  outDir: string,
  opts: { preset: DemoPreset; seed?: number; replace?: boolean },
): Promise<{ dir: string; params: number }> {
  const preset = opts.preset;
  if (!(preset in DEMO_PRESETS)) {
    throw new EdgeloraError(`unknown preset "${String(preset)}"`, { where: '--preset', hint: `use one of ${Object.keys(DEMO_PRESETS).join(', ')}` });
  }
  const seed = opts.seed ?? 0;
  const dir = path.resolve(outDir);
  if (!opts.replace && (await fs.stat(dir).then(() => true, () => false))) {
    throw new EdgeloraError('output directory already exists', { where: dir, hint: 'choose a new directory (or pass --force to replace it)' });
  }
  const configJson = demoConfigJson(preset);
  const cfg = parseHfConfig(configJson, 'demo config.json');
  const spec = DEMO_PRESETS[preset];
  // Real-shape vocabularies are far larger than the demo tokenizer: pad it so every id is valid.
  const tok = spec.vocabSize === 'tokenizer' ? buildDemoTokenizer() : buildPaddedTokenizer(cfg.vocabSize);
  const dtype = spec.dtype ?? 'F32';
  const shapes = expectedWeightShapes(cfg);
  const rng = new Rng(seed);
  let params = 0;
  const entries: WriteEntry[] = [];
  for (const [name, shape] of shapes) {
    const n = shape.reduce((a, b) => a * b, 1);
    params += n;
    const isNorm = name.endsWith('norm.weight');
    // Producers run one at a time, in this order, so the single Rng stream is deterministic.
    entries.push({
      name,
      dtype,
      shape,
      data: async () => {
        const w = new Float32Array(n);
        if (isNorm) for (let i = 0; i < n; i++) w[i] = 1 + 0.1 * rng.normal();
        else for (let i = 0; i < n; i++) w[i] = 0.02 * rng.normal();
        return w;
      },
    });
  }
  const json = (v: unknown) => JSON.stringify(v, null, 2) + '\n';
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeFileAtomic(path.join(tmp, 'config.json'), json(configJson));
      await writeFileAtomic(path.join(tmp, 'tokenizer.json'), json(tok.tokenizerJson));
      await writeFileAtomic(path.join(tmp, 'tokenizer_config.json'), json(tok.tokenizerConfig));
      await writeFileAtomic(
        path.join(tmp, 'generation_config.json'),
        json({
          bos_token_id: tok.ids.bos,
          eos_token_id: [tok.ids.eos, tok.ids.endOfTurn],
          pad_token_id: tok.ids.pad,
          do_sample: true,
          temperature: 0.8,
          top_p: 0.95,
        }),
      );
      await writeSafetensors(path.join(tmp, 'model.safetensors'), entries, {
        format: 'pt',
        edgelora_demo: `${preset} seed=${seed}`,
      });
    },
    { replace: opts.replace ?? false },
  );
  return { dir, params };
}
