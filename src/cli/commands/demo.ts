// `edgelora demo` (what `npm start` runs): the main job on embedded defaults — make the tiny demo
// checkpoint (cached), quantize it to NF4 (cached), and generate from a prompt.
import path from 'node:path';
import { existsSync } from 'node:fs';
import type { Command } from '../command.js';
import { parseFlags, numberFlag } from '../command.js';
import { makeDemoModel } from '../../formats/demo-model.js';
import { quantizeModel } from '../../model/quantize.js';
import { ModelRuntime } from '../../runtime/model.js';
import { generate } from '../../runtime/generate.js';
import { EdgeloraError } from '../../util/errors.js';

const help = `Usage: edgelora demo [flags]      (npm start -- [flags])

Runs the main job on embedded defaults, with nothing to download:
  1. makes the tiny demo checkpoint (random weights, Hugging Face layout) under --cache,
  2. quantizes it to NF4 (bitsandbytes layout, run by ONNX Runtime's MatMulBnb4),
  3. generates a completion for --prompt and reports prefill/decode speed.
Steps 1 and 2 are cached between runs.

Flags:
  --cache DIR          where the demo models live (default .cache/demo)
  --prompt TEXT        prompt (default "Hello, edge device!")
  --max-new-tokens N   tokens to generate (default 24)
  --json               print one JSON summary
  -h, --help           this text`;

export const demoCommand: Command = {
  name: 'demo',
  summary: 'the main job on embedded defaults (what npm start runs)',
  help,
  async run(argv) {
    const { values, help: h } = parseFlags('demo', argv, {
      cache: { type: 'string' },
      prompt: { type: 'string' },
      'max-new-tokens': { type: 'string' },
      json: { type: 'boolean' },
    });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const cache = path.resolve((values.cache as string | undefined) ?? '.cache/demo');
    const prompt = (values.prompt as string | undefined) ?? 'Hello, edge device!';
    const maxNewTokens = numberFlag('max-new-tokens', values['max-new-tokens'] as string | undefined, 24, { integer: true, min: 1 });
    const json = Boolean(values.json);
    const say = (s: string) => {
      if (!json) process.stdout.write(s + '\n');
    };
    const stage = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
      try {
        return await fn();
      } catch (err) {
        throw new EdgeloraError(`demo stage "${name}" failed: ${(err as Error).message}`, { cause: err });
      }
    };
    const t0 = performance.now();
    const hf = path.join(cache, 'tiny-hf');
    const q = path.join(cache, 'tiny-nf4');
    await stage('demo model', async () => {
      if (existsSync(hf)) say(`[1/3] demo checkpoint: cached at ${hf}`);
      else {
        const r = await makeDemoModel(hf, { preset: 'tiny', seed: 0 });
        say(`[1/3] demo checkpoint: ${(r.params / 1e6).toFixed(2)}M parameters → ${hf}`);
      }
    });
    const manifest = await stage('quantize', async () => {
      if (existsSync(q)) {
        say(`[2/3] nf4 model: cached at ${q}`);
        return (await ModelRuntime.load(q)).manifest;
      }
      const r = await quantizeModel(hf, q, { format: 'nf4', blockSize: 64, doubleQuant: false });
      say(`[2/3] nf4 model: ${q} (fingerprint ${r.manifest.fingerprint.slice(0, 16)}…, ${r.seconds.toFixed(1)} s)`);
      return r.manifest;
    });
    const res = await stage('generate', async () => {
      const model = await ModelRuntime.load(q);
      const ids = model.tokenizer.encode(prompt, { addSpecialTokens: true });
      if (!json) process.stdout.write(`[3/3] generate: ${prompt}`);
      const r = await generate(model, ids, {
        maxNewTokens,
        temperature: 0,
        topK: 0,
        topP: 1,
        seed: 0,
        stopAtEos: false,
        ...(json ? {} : { onText: (t: string) => process.stdout.write(t) }),
      });
      await model.release();
      return r;
    });
    say(`\n      (${res.tokenIds.length} tokens, prefill ${res.prefillMs.toFixed(0)} ms, decode ${res.decodeTokensPerSecond.toFixed(1)} tok/s; random weights, so the text is noise)`);
    const seconds = (performance.now() - t0) / 1000;
    if (json) {
      process.stdout.write(JSON.stringify({ model: q, fingerprint: manifest.fingerprint, prompt, text: res.text, token_ids: res.tokenIds, decode_tokens_per_s: res.decodeTokensPerSecond, seconds }) + '\n');
    } else say(`done in ${seconds.toFixed(1)} s`);
    return 0;
  },
};
