// Text generation: prefill the prompt once, then decode one token at a time through the KV cache,
// streaming text as it comes.
import { Rng } from '../util/rng.js';
import { StreamDecoder } from '../formats/tokenizer.js';
import type { ModelRuntime, LoraFeeds } from './model.js';
import { sampleToken, checkSampling, type SamplingOptions } from './sampling.js';

export interface GenerateOptions extends SamplingOptions {
  readonly maxNewTokens: number;
  readonly seed: number;
  /** Stop at an end-of-sequence token (default true). */
  readonly stopAtEos?: boolean;
  readonly lora?: LoraFeeds;
  /** Called with each piece of newly decodable text. */
  readonly onText?: (text: string) => void;
}

export interface GenerateResult {
  readonly text: string;
  readonly promptIds: number[];
  readonly tokenIds: number[];
  readonly prefillMs: number;
  readonly decodeMs: number;
  /** Decode tokens per second (tokens after the first / decode time). */
  readonly decodeTokensPerSecond: number;
  readonly stopReason: 'eos' | 'length';
}

export async function generate(model: ModelRuntime, promptIds: number[], opts: GenerateOptions): Promise<GenerateResult> {
  checkSampling(opts);
  const rng = new Rng(opts.seed);
  const eos = new Set(model.tokenizer.eosTokenIds);
  const stream = new StreamDecoder(model.tokenizer);
  const out: number[] = [];
  const t0 = performance.now();
  const reserve = Math.min(promptIds.length + opts.maxNewTokens, model.cfg.maxPositionEmbeddings);
  let res = await model.forward({ ids: [promptIds], cache: null, logits: 'last', reserve, ...(opts.lora ? { lora: opts.lora } : {}) });
  const prefillMs = performance.now() - t0;
  const V = res.dims[2];
  let next = sampleToken(res.logits.subarray(0, V), opts, rng);
  let stopReason: 'eos' | 'length' = 'length';
  const t1 = performance.now();
  let decoded = 0;
  while (out.length < opts.maxNewTokens) {
    if ((opts.stopAtEos ?? true) && eos.has(next)) {
      stopReason = 'eos';
      break;
    }
    out.push(next);
    const piece = stream.push(next);
    if (piece) opts.onText?.(piece);
    if (out.length >= opts.maxNewTokens) break;
    if (res.cache.length + 1 > model.cfg.maxPositionEmbeddings) break;
    res = await model.forward({ ids: [[next]], cache: res.cache, ...(opts.lora ? { lora: opts.lora } : {}) });
    decoded++;
    next = sampleToken(res.logits.subarray(0, V), opts, rng);
  }
  const tail = stream.flush();
  if (tail) opts.onText?.(tail);
  const decodeMs = performance.now() - t1;
  return {
    text: model.tokenizer.decode(out, { skipSpecialTokens: true }),
    promptIds,
    tokenIds: out,
    prefillMs,
    decodeMs,
    decodeTokensPerSecond: decoded > 0 ? decoded / (decodeMs / 1000) : 0,
    stopReason,
  };
}
