// bench:peers' llama.cpp child: loads one GGUF through node-llama-cpp (prebuilt CPU binary, never
// downloads or builds), times prefill of a PROMPT-token prompt and greedy decode of NEW tokens, and
// prints one JSON line with its peak RSS. Plain JavaScript so the child carries no TypeScript tooling.
import { getLlama } from 'node-llama-cpp';

const [file, threadsArg, promptArg, newArg] = process.argv.slice(2);
const threads = Number(threadsArg);
const PROMPT = Number(promptArg);
const NEW = Number(newArg);
const llama = await getLlama({ gpu: false, build: 'never', usePrebuiltBinaries: true, skipDownload: true, progressLogs: false, logLevel: 'error' });
const model = await llama.loadModel({ modelPath: file });
const ctx = await model.createContext({ contextSize: PROMPT + NEW + 16, batchSize: PROMPT, threads });
const seq = ctx.getSequence();
const prompt = Array.from({ length: PROMPT }, (_, i) => ((i * 7919 + 13) % 250) + 3);
const rssAfterLoad = process.memoryUsage().rss / 2 ** 20;
// Warm-up, not timed.
await seq.evaluateWithoutGeneratingNewTokens(prompt.slice(0, 8));
await seq.clearHistory();
let prefillMs = Infinity;
for (let r = 0; r < 3; r++) {
  await seq.clearHistory();
  const t0 = performance.now();
  await seq.evaluateWithoutGeneratingNewTokens(prompt);
  prefillMs = Math.min(prefillMs, performance.now() - t0);
}
// The cache now holds the prompt but its last token: evaluate that one and decode NEW tokens greedily.
await seq.clearHistory();
await seq.evaluateWithoutGeneratingNewTokens(prompt.slice(0, -1));
const t1 = performance.now();
let n = 0;
for await (const _ of seq.evaluate([prompt[prompt.length - 1]], { temperature: 0, yieldEogToken: true })) {
  if (++n >= NEW) break;
}
const decodeS = (performance.now() - t1) / 1000;
process.stdout.write(
  JSON.stringify({
    rss_after_load_mib: rssAfterLoad,
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
    prefill_tok_s: PROMPT / (prefillMs / 1000),
    decode_tok_s: NEW / decodeS,
  }) + '\n',
);
await ctx.dispose();
await model.dispose();
process.exit(0);
