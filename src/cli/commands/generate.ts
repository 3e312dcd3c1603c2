// `edgelora generate`: stream a completion from a quantized model.
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requireFlag } from '../command.js';
import { loadModelWithAdapters, PROFILE_FLAGS, PROFILE_HELP } from '../load.js';
import { generate } from '../../runtime/generate.js';
import { EdgeloraError } from '../../util/errors.js';

const help = `Usage: edgelora generate --model <quantized-dir> --prompt TEXT [flags]

Flags:
  --model DIR            a directory written by \`edgelora quantize\` (required)
  --prompt TEXT          the prompt (required)
  --chat                 wrap the prompt as a user message with the model's chat template
  --max-new-tokens N     tokens to generate at most (default 64)
  --temperature T        0 = greedy (default 0)
  --top-k K              sample among the K most likely tokens; 0 = all (default 0)
  --top-p P              nucleus sampling threshold in (0, 1] (default 1)
  --seed S               sampling seed (default 0)
  --adapter DIR[:SCALE]  apply a LoRA adapter (PEFT directory), optionally scaled; repeatable:
                         several adapters stack (their deltas add)
${PROFILE_HELP}
  --json                 print one JSON object (text, token ids, prefill ms, decode tokens/s) instead of streaming
  -h, --help             this text`;

export const generateCommand: Command = {
  name: 'generate',
  summary: 'generate text from a quantized model (streams tokens)',
  help,
  async run(argv) {
    const { values, help: h } = parseFlags('generate', argv, {
      model: { type: 'string' },
      prompt: { type: 'string' },
      chat: { type: 'boolean' },
      'max-new-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      adapter: { type: 'string', multiple: true },
      ...PROFILE_FLAGS,
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const dir = requireFlag('generate', 'model', values.model as string | undefined);
    const prompt = values.prompt as string | undefined;
    if (prompt === undefined) throw new EdgeloraError('missing --prompt', { where: 'edgelora generate', hint: 'run `edgelora generate --help`' });
    const askedNewTokens = numberFlag('max-new-tokens', values['max-new-tokens'], 64, { integer: true, min: 1 });
    const temperature = numberFlag('temperature', values.temperature as string | undefined, 0, { min: 0 });
    const topK = numberFlag('top-k', values['top-k'] as string | undefined, 0, { integer: true, min: 0 });
    const topP = numberFlag('top-p', values['top-p'] as string | undefined, 1, { positive: true, max: 1 });
    const seed = numberFlag('seed', values.seed as string | undefined, 0, { integer: true });
    const { model, lora } = await loadModelWithAdapters({
      dir,
      adapters: (values.adapter as string[] | undefined) ?? [],
      profile: values.profile as string | undefined,
      profileSets: values['profile-set'] as string[] | undefined,
      context: Math.ceil(prompt.length / 2) + askedNewTokens, // a conservative token estimate before tokenizing
      lower: ['--max-new-tokens', 'the prompt length'],
    });
    const tok = model.tokenizer;
    const text = values.chat ? tok.applyChatTemplate([{ role: 'user', content: prompt }], { addGenerationPrompt: true }) : prompt;
    const promptIds = tok.encode(text, { addSpecialTokens: !values.chat });
    if (promptIds.length === 0) throw new EdgeloraError('the prompt encodes to no tokens', { where: '--prompt' });
    // The KV cache cannot grow past the model's context: say so once and clamp, rather than stop
    // quietly after fewer tokens than asked for.
    const context = model.cfg.maxPositionEmbeddings;
    if (promptIds.length >= context) {
      await model.release();
      throw new EdgeloraError(`the prompt is ${promptIds.length} tokens; the model's context is ${context}, so no token fits after it`, {
        where: '--prompt',
        hint: 'shorten the prompt',
      });
    }
    const maxNewTokens = Math.min(askedNewTokens, context - promptIds.length);
    if (maxNewTokens < askedNewTokens) {
      process.stderr.write(
        `notice: --max-new-tokens ${askedNewTokens} clamped to ${maxNewTokens}: the model's context is ${context} tokens and the prompt takes ${promptIds.length}\n`,
      );
    }
    const json = Boolean(values.json);
    const res = await generate(model, promptIds, {
      maxNewTokens,
      temperature,
      topK,
      topP,
      seed,
      ...(lora ? { lora } : {}),
      ...(json ? {} : { onText: (t: string) => process.stdout.write(t) }),
    });
    if (json) {
      process.stdout.write(
        JSON.stringify({
          text: res.text,
          prompt_ids: res.promptIds,
          token_ids: res.tokenIds,
          stop_reason: res.stopReason,
          max_new_tokens: maxNewTokens,
          prefill_ms: Number(res.prefillMs.toFixed(2)),
          prefill_tokens_per_s: Number((res.promptIds.length / (res.prefillMs / 1000)).toFixed(1)),
          decode_tokens_per_s: Number(res.decodeTokensPerSecond.toFixed(2)),
        }) + '\n',
      );
    } else {
      process.stdout.write('\n');
      process.stderr.write(
        `[${res.tokenIds.length} tokens, prefill ${res.prefillMs.toFixed(0)} ms, decode ${res.decodeTokensPerSecond.toFixed(1)} tok/s, stop: ${res.stopReason}]\n`,
      );
    }
    await model.release();
    return 0;
  },
};
