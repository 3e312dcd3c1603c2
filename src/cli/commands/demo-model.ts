// `edgelora demo-model`: writes a deterministic random-init Llama checkpoint in Hugging Face layout,
// so the other commands can be tried without downloading a model.
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requirePositional, choiceFlag, checkOutputPath } from '../command.js';
import { makeDemoModel, DEMO_PRESETS, type DemoPreset } from '../../formats/demo-model.js';

const help = `Usage: edgelora demo-model <out-dir> [flags]

Writes a random-init Llama model (config.json, model.safetensors, byte-level BPE
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json).
Same preset and seed give byte-identical files. Weights are random: the text it generates is noise.

Presets:
  tiny    ~0.9M parameters: hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, tied embeddings (~3.5 MB)
  small   ~100M parameters: hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000,
          tied embeddings (~400 MB)
  qwen2.5-0.5b, llama-3.2-1b, smollm2-360m
          the published shapes of Qwen2.5-0.5B (Qwen2 q/k/v biases, vocab 151936), Llama-3.2-1B
          (llama3 rope_scaling, vocab 128256) and SmolLM2-360M, tied, in bf16 (~1.0 / 2.5 / 0.7 GB),
          with the tokenizer padded to the whole vocabulary. RANDOM weights: for benchmarks and
          memory tests only. tiny and small are float32.

Flags:
  --preset NAME   one of the presets above (default tiny)
  --seed N        random seed, an integer (default 0)
  --force         replace <out-dir> if it exists
  --json          print {"dir", "preset", "seed", "params"} as JSON
  -h, --help      this text`;

export const demoModelCommand: Command = {
  name: 'demo-model',
  summary: 'write a small random-init Llama checkpoint (Hugging Face layout) for trying things out',
  help,
  async run(argv) {
    const { values, positionals, help: h } = parseFlags('demo-model', argv, {
      preset: { type: 'string' },
      seed: { type: 'string' },
      force: { type: 'boolean' },
      json: { type: 'boolean' },
    }, { positionals: ['out-dir'] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const out = requirePositional('demo-model', 'out-dir', positionals[0]);
    const preset = choiceFlag('preset', values.preset, Object.keys(DEMO_PRESETS) as DemoPreset[]) ?? 'tiny';
    const seed = numberFlag('seed', values.seed, 0, { integer: true, min: 0, max: 0xffffffff });
    await checkOutputPath(out, { force: Boolean(values.force), what: 'the output directory' });
    const t0 = Date.now();
    const res = await makeDemoModel(out, { preset, seed, replace: Boolean(values.force) });
    if (values.json) {
      process.stdout.write(JSON.stringify({ dir: res.dir, preset, seed, params: res.params }) + '\n');
    } else {
      process.stdout.write(
        `wrote ${res.dir}: ${preset} preset, ${(res.params / 1e6).toFixed(2)}M parameters, seed ${seed} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n`,
      );
    }
    return 0;
  },
};
