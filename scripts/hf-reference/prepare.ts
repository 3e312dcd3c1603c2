// npm run hf-reference:prepare — writes .device-check/: tiny checkpoints (plain, and llama3 rope
// scaling), PEFT adapters written by our saveAdapter (q/v; all seven with rsLoRA, rank_pattern and
// alpha_pattern), our runtime's logits for each, the tokenizer's ids and chat template, and our fused
// nf4/int4 graphs with the exact prefill feeds and logits. `python3 scripts/hf-reference/check.py`,
// run from the repository root where torch, transformers, peft and onnxruntime are installed (the
// GPU device here), reproduces them with those real programs and writes device-check.json to $OUT.
import fs from 'node:fs';
import path from 'node:path';
import { makeDemoModel } from '../../src/formats/demo-model.js';
import { quantizeModel } from '../../src/model/quantize.js';
import { ModelRuntime } from '../../src/runtime/model.js';
import { AdapterManager } from '../../src/adapters/manager.js';
import { randomAdapter } from '../../test/helpers/adapters.js';

const root = path.resolve('.device-check');
fs.rmSync(root, { recursive: true, force: true });
fs.mkdirSync(root);
const PROMPT = 'The quick brown fox jumps over the lazy dog; edge devices learn 12345 new words!';
const hf = path.join(root, 'tiny-hf');
await makeDemoModel(hf, { preset: 'tiny', seed: 1 });
const hf3 = path.join(root, 'tiny-hf-llama3');
fs.cpSync(hf, hf3, { recursive: true });
const c = JSON.parse(fs.readFileSync(path.join(hf3, 'config.json'), 'utf8'));
c.rope_theta = 500000.0;
c.rope_scaling = { rope_type: 'llama3', factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32 };
fs.writeFileSync(path.join(hf3, 'config.json'), JSON.stringify(c, null, 2));
const cases: unknown[] = [];
for (const src of [hf, hf3]) {
  const q = path.join(root, `${path.basename(src)}-fp32`);
  await quantizeModel(src, q, { format: 'fp32', blockSize: 64, doubleQuant: false });
  const rt = await ModelRuntime.load(q);
  const ids = rt.tokenizer.encode(PROMPT, { addSpecialTokens: true });
  const adapters: Record<string, string | null> = { none: null };
  if (src === hf) {
    adapters.qv = path.join(root, 'adapter-qv');
    await randomAdapter(adapters.qv, rt.cfg, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 3, fingerprint: null, std: 0.1 });
    adapters.all = path.join(root, 'adapter-all-rslora-patterns');
    await randomAdapter(adapters.all, rt.cfg, {
      r: 8, alpha: 16, rslora: true, seed: 4, fingerprint: null, std: 0.1,
      targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
      rankPattern: { 'layers.1.self_attn.v_proj': 2 }, alphaPattern: { o_proj: 4 },
    });
  }
  for (const [name, dir] of Object.entries(adapters)) {
    const mgr = new AdapterManager(rt);
    let lora;
    if (dir) { const id = await mgr.load(dir, { id: name }); mgr.activate(id); lora = mgr.feeds(); }
    const res = await rt.forward({ ids: [ids], ...(lora ? { lora } : {}) });
    cases.push({ hf: path.relative('.', src), adapter: dir ? path.relative('.', dir) : null, label: `${path.basename(src)} + ${name}`, ids, vocab: rt.cfg.vocabSize, logits: Array.from(res.logits) });
    if (dir) mgr.unload(name);
  }
  await rt.release();
}
// Tokenizer + chat template as our runtime renders them.
const rt = await ModelRuntime.load(path.join(root, 'tiny-hf-fp32'));
const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Where is Valparaiso?' }, { role: 'assistant', content: 'In Chile.' }];
let chat: string | null = null;
if (rt.tokenizer.hasChatTemplate) chat = rt.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: false });
fs.writeFileSync(path.join(root, 'expected.json'), JSON.stringify({ prompt: PROMPT, ids: rt.tokenizer.encode(PROMPT, { addSpecialTokens: true }), messages, chat, cases }));
await rt.release();
const out: unknown[] = [];
for (const format of ['nf4', 'int4'] as const) {
  const q = path.join(root, `tiny-${format}`);
  await quantizeModel(path.join(root, 'tiny-hf'), q, { format, blockSize: format === 'int4' ? 32 : 64, doubleQuant: false });
  const rt = await ModelRuntime.load(q);
  const s = rt.session as any; const orig = s.run.bind(s); let feeds: any = null;
  s.run = (f: any, o: any) => { feeds = f; return orig(f, o); };
  const ids = rt.tokenizer.encode('The quick brown fox jumps over the lazy dog.', { addSpecialTokens: true });
  const res = await rt.forward({ ids: [ids] });
  out.push({ model: path.relative('.', q), format, feeds: Object.fromEntries(Object.entries(feeds).map(([k, t]: any) => [k, { type: t.type, dims: t.dims, data: Array.from(t.data, (x: any) => Number(x)) }])), logits: Array.from(res.logits), dims: res.dims });
  await rt.release();
}
fs.writeFileSync(path.join(root, 'ort-cases.json'), JSON.stringify(out));
console.log(`wrote ${root}: ${cases.length} logits cases, ${out.length} graph cases`);
