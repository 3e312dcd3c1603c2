// `edgelora eval`: mean token NLL and perplexity of a quantized model on a JSONL data set.
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requireFlag } from '../command.js';
import { loadModelWithAdapters, PROFILE_FLAGS, PROFILE_HELP } from '../load.js';
import { evaluate } from '../../runtime/eval.js';
import { loadJsonl } from '../../data/jsonl.js';
import { Progress } from '../../util/progress.js';

const help = `Usage: edgelora eval --model <quantized-dir> --data <file.jsonl> [flags]

Mean token negative log-likelihood (nats) and perplexity, Hugging Face causal-LM convention:
labels shifted by one inside, label -100 ignored, mean over all label tokens of the file.
JSONL rows: {"text"}, {"prompt","completion"} (loss on the completion), {"messages":[...]}
(chat template; loss on assistant turns), or {"input_ids":[...], "labels":[...]?}.

Flags:
  --model DIR        a directory written by \`edgelora quantize\` (required)
  --data FILE        JSONL data set (required)
  --batch-size B     rows per forward pass (default 4)
  --seq-len L        truncate rows to L tokens, with a warning (default: the model's context)
  --adapter DIR[:SCALE]  apply a LoRA adapter, optionally scaled; repeatable (deltas add)
${PROFILE_HELP}
  --json             print {"loss", "perplexity", "tokens"} as JSON
  -h, --help         this text`;

export const evalCommand: Command = {
  name: 'eval',
  summary: 'loss and perplexity on a JSONL data set',
  help,
  async run(argv) {
    const { values, help: h } = parseFlags('eval', argv, {
      model: { type: 'string' },
      data: { type: 'string' },
      'batch-size': { type: 'string' },
      'seq-len': { type: 'string' },
      adapter: { type: 'string', multiple: true },
      ...PROFILE_FLAGS,
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const dir = requireFlag('eval', 'model', values.model as string | undefined);
    const data = requireFlag('eval', 'data', values.data as string | undefined);
    const batchSize = numberFlag('batch-size', values['batch-size'] as string | undefined, 4, { integer: true, min: 1 });
    const seqLenFlag = values['seq-len'] as string | undefined;
    const { model, lora } = await loadModelWithAdapters({
      dir,
      adapters: (values.adapter as string[] | undefined) ?? [],
      profile: values.profile as string | undefined,
      profileSets: values['profile-set'] as string[] | undefined,
      context: seqLenFlag ? numberFlag('seq-len', seqLenFlag, 0, { integer: true, min: 2 }) : 0,
      batch: batchSize,
      lower: ['--batch-size', '--seq-len'],
    });
    const seqLen = numberFlag('seq-len', seqLenFlag, model.cfg.maxPositionEmbeddings, { integer: true, min: 2 });
    const examples = await loadJsonl(data, model.tokenizer, { seqLen, onWarning: (m) => process.stderr.write(`warning: ${m}\n`) });
    const json = Boolean(values.json);
    const progress = new Progress({ total: examples.length, label: 'eval', silent: json });
    const res = await evaluate(model, examples, { batchSize, ...(lora ? { lora } : {}), onBatch: (d) => progress.update(d) });
    if (json) {
      process.stdout.write(JSON.stringify({ loss: res.loss, perplexity: res.perplexity, tokens: res.tokens, rows: res.rows }) + '\n');
    } else {
      process.stdout.write(`loss ${res.loss.toFixed(4)}  perplexity ${res.perplexity.toFixed(3)}  (${res.tokens} tokens, ${res.rows} rows, ${res.seconds.toFixed(1)} s)\n`);
    }
    await model.release();
    return 0;
  },
};
