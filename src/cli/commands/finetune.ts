// `edgelora finetune`: train a LoRA adapter on a frozen quantized base (a thin layer over
// src/train/trainer.ts `finetune()`).
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requireFlag } from '../command.js';
import { finetune, type FinetuneOptions } from '../../train/trainer.js';
import { LINEAR_PROJS, type Proj } from '../../model/llama.js';
import { EdgeloraError } from '../../util/errors.js';
import { Progress } from '../../util/progress.js';
import { formatBytes } from '../../profiles/memory.js';
import { resolveProfile, parseProfileSets } from '../../profiles/index.js';
import { PROFILE_FLAGS, PROFILE_HELP } from '../load.js';
import type { StDType } from '../../formats/safetensors.js';

const help = `Usage: edgelora finetune --model <quantized-dir> --data <file.jsonl> --out <adapter-dir> [flags]

Trains a LoRA adapter on the frozen (4-bit) base: forward, loss and backward run as one onnxruntime
session; the optimizer runs on the host. Loss: mean token NLL over all label tokens (labels -100
ignored), on the JSONL formats of \`edgelora eval\`. Each row is its own right-padded sequence.
The output is a PEFT adapter directory (+ training_log.jsonl), bound to the base's fingerprint.

Flags:
  --model DIR            a directory written by \`edgelora quantize\` (required)
  --data FILE            JSONL training data (required)
  --out DIR              adapter directory to create (required; must not exist)
  --rank R               LoRA rank (default 8)
  --alpha A              LoRA alpha; scale = alpha / rank (default 16)
  --targets LIST         comma-separated projections, or all-linear (default q_proj,v_proj)
  --steps N              optimizer steps (default: --epochs passes over the data)
  --epochs E             passes over the data when --steps is not given (default 1)
  --lr LR                peak learning rate (default 2e-4)
  --optimizer NAME       adamw (betas 0.9/0.999, eps 1e-8) or sgd (default adamw)
  --weight-decay WD      weight decay (default 0)
  --batch-size B         rows per micro-batch (default 4)
  --grad-accum G         micro-batches per optimizer step (default 1)
  --seq-len L            longer rows are truncated, with a warning naming the line (default min(512, context))
  --max-grad-norm X      clip gradients to this global norm; 0 disables (default 1.0)
  --lora-dropout P       dropout on the LoRA input; 0 disables (default 0.05)
  --warmup N             linear warmup steps (default 0)
  --schedule NAME        cosine, linear or constant after warmup (default linear)
  --init-adapter DIR     continue from this adapter (its rank, alpha and targets are kept)
  --eval-data FILE       JSONL data scored (mean NLL) after training
  --save-every N         checkpoint every N steps into <out>.checkpoint (default 0 = never)
  --resume               continue from <out>.checkpoint (same flags as the interrupted run)
  --seed S               seed of the init, data order and dropout (default 0)
${PROFILE_HELP}
  --memory-budget SIZE   refuse plans whose estimated peak exceeds SIZE (bytes, or e.g. 4GiB, 512MB)
  --recompute            recompute each layer's activations in backward (less memory, slower)
  --dtype NAME           adapter tensors on disk: f32, f16 or bf16 (default f32)
  --json                 print one JSON summary (final loss, loss per step, tokens/s, peak RSS)
  -h, --help             this text`;

const UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };

/** "4GiB", "512MB", "1e9" → bytes. */
export function parseByteSize(flag: string, raw: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*$/.exec(raw);
  const unit = UNITS[(m?.[2] ?? '').toLowerCase() || 'b'];
  if (!m || unit === undefined || !(Number(m[1]) > 0)) {
    throw new EdgeloraError(`--${flag} ${raw}: not a size`, { where: `--${flag}`, hint: 'give bytes or a number with a unit: 4GiB, 512MB, 2e9' });
  }
  return Math.floor(Number(m[1]) * unit);
}

export function parseTargets(raw: string | undefined): Proj[] | undefined {
  if (raw === undefined) return undefined;
  if (raw === 'all-linear') return [...LINEAR_PROJS];
  const list = raw.split(',').map((s) => s.trim()).filter(Boolean);
  for (const t of list) {
    if (!(LINEAR_PROJS as readonly string[]).includes(t)) {
      throw new EdgeloraError(`--targets: unknown projection "${t}"`, { where: '--targets', hint: `choose from ${LINEAR_PROJS.join(', ')}, or all-linear` });
    }
  }
  if (list.length === 0) throw new EdgeloraError('--targets is empty', { where: '--targets', hint: `choose from ${LINEAR_PROJS.join(', ')}, or all-linear` });
  return list as Proj[];
}

function choice<T extends string>(flag: string, raw: string | undefined, options: readonly T[]): T | undefined {
  if (raw === undefined) return undefined;
  if (!(options as readonly string[]).includes(raw)) throw new EdgeloraError(`--${flag} ${raw}: choose ${options.join(', ')}`, { where: `--${flag}` });
  return raw as T;
}

export const finetuneCommand: Command = {
  name: 'finetune',
  summary: 'train a LoRA adapter on a quantized base (QLoRA-style, on device)',
  help,
  async run(argv) {
    const { values: v, help: h } = parseFlags('finetune', argv, {
      model: { type: 'string' },
      data: { type: 'string' },
      out: { type: 'string' },
      rank: { type: 'string' },
      alpha: { type: 'string' },
      targets: { type: 'string' },
      steps: { type: 'string' },
      epochs: { type: 'string' },
      lr: { type: 'string' },
      optimizer: { type: 'string' },
      'weight-decay': { type: 'string' },
      'batch-size': { type: 'string' },
      'grad-accum': { type: 'string' },
      'seq-len': { type: 'string' },
      'max-grad-norm': { type: 'string' },
      'lora-dropout': { type: 'string' },
      warmup: { type: 'string' },
      schedule: { type: 'string' },
      'init-adapter': { type: 'string' },
      'eval-data': { type: 'string' },
      'save-every': { type: 'string' },
      resume: { type: 'boolean' },
      seed: { type: 'string' },
      'memory-budget': { type: 'string' },
      ...PROFILE_FLAGS,
      recompute: { type: 'boolean' },
      dtype: { type: 'string' },
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const s = (k: string) => v[k as keyof typeof v] as string | undefined;
    const num = (flag: string, check: Parameters<typeof numberFlag>[3] = {}) => (s(flag) === undefined ? undefined : numberFlag(flag, s(flag), 0, check));
    const json = Boolean(v.json);
    const dtype = choice('dtype', s('dtype'), ['f32', 'f16', 'bf16'] as const);
    const rank = num('rank', { integer: true });
    if (rank !== undefined && rank < 1) throw new EdgeloraError(`--rank ${rank}: must be at least 1`, { where: '--rank' });
    const lr = num('lr');
    if (lr !== undefined && lr <= 0) throw new EdgeloraError(`--lr ${lr}: must be a positive number`, { where: '--lr' });
    const memoryBudget = s('memory-budget') === undefined ? undefined : parseByteSize('memory-budget', s('memory-budget')!);
    // The device profile gives the memory budget (unless --memory-budget is set) and the execution providers.
    const rp = await resolveProfile({ profile: s('profile') ?? 'auto', overrides: parseProfileSets((v['profile-set'] as string[] | undefined) ?? []) });
    let progress: Progress | null = null;
    const opts: FinetuneOptions = {
      model: requireFlag('finetune', 'model', s('model')),
      data: requireFlag('finetune', 'data', s('data')),
      out: requireFlag('finetune', 'out', s('out')),
      ...(rank !== undefined ? { rank } : {}),
      ...(num('alpha', { positive: true }) !== undefined ? { alpha: num('alpha')! } : {}),
      ...(parseTargets(s('targets')) ? { targets: parseTargets(s('targets'))! } : {}),
      ...(num('steps', { integer: true, min: 1 }) !== undefined ? { steps: num('steps')! } : {}),
      ...(num('epochs', { positive: true }) !== undefined ? { epochs: num('epochs')! } : {}),
      ...(lr !== undefined ? { lr } : {}),
      ...(choice('optimizer', s('optimizer'), ['adamw', 'sgd'] as const) ? { optimizer: s('optimizer') as 'adamw' | 'sgd' } : {}),
      ...(num('weight-decay', { min: 0 }) !== undefined ? { weightDecay: num('weight-decay')! } : {}),
      ...(num('batch-size', { integer: true, min: 1 }) !== undefined ? { batchSize: num('batch-size')! } : {}),
      ...(num('grad-accum', { integer: true, min: 1 }) !== undefined ? { gradAccum: num('grad-accum')! } : {}),
      ...(num('seq-len', { integer: true, min: 2 }) !== undefined ? { seqLen: num('seq-len')! } : {}),
      ...(num('max-grad-norm', { min: 0 }) !== undefined ? { maxGradNorm: num('max-grad-norm')! } : {}),
      ...(num('lora-dropout', { min: 0 }) !== undefined ? { loraDropout: num('lora-dropout')! } : {}),
      ...(num('warmup', { integer: true, min: 0 }) !== undefined ? { warmup: num('warmup')! } : {}),
      ...(choice('schedule', s('schedule'), ['cosine', 'linear', 'constant'] as const) ? { schedule: s('schedule') as 'cosine' | 'linear' | 'constant' } : {}),
      ...(s('init-adapter') ? { initAdapter: s('init-adapter')! } : {}),
      ...(s('eval-data') ? { evalData: s('eval-data')! } : {}),
      ...(num('save-every', { integer: true, min: 0 }) !== undefined ? { saveEvery: num('save-every')! } : {}),
      ...(v.resume ? { resume: true } : {}),
      ...(num('seed', { integer: true, min: 0 }) !== undefined ? { seed: num('seed')! } : {}),
      ...(memoryBudget !== undefined ? { memoryBudget } : {}),
      profile: { id: rp.profile.id, memoryBudgetBytes: rp.memoryBudgetBytes },
      sessionOptions: rp.sessionOptions({ graphOptimizationLevel: 'all', enableCpuMemArena: false }),
      ...(v.recompute ? { recompute: true } : {}),
      ...(dtype ? { dtype: dtype.toUpperCase() as StDType } : {}),
      onWarning: (m) => process.stderr.write(`warning: ${m}\n`),
      onStep: (e, total) => {
        progress ??= new Progress({ total, label: 'finetune', silent: json });
        progress.update(e.step, { loss: e.loss, 'tok/s': Math.round(e.tokens / Math.max(e.seconds, 1e-9)) });
      },
    };
    const res = await finetune(opts);
    if (json) {
      process.stdout.write(
        JSON.stringify({
          out: res.out,
          steps: res.steps,
          resumed_from: res.resumedFrom,
          final_loss: res.finalLoss,
          loss_per_step: res.losses,
          eval_loss: res.evalLoss,
          tokens: res.tokens,
          tokens_per_s: Number(res.tokensPerSecond.toFixed(1)),
          peak_rss_bytes: res.peakRssBytes,
          estimated_peak_bytes: res.memory.bytes,
          parameters: res.parameters,
          seconds: Number(res.seconds.toFixed(2)),
        }) + '\n',
      );
    } else {
      process.stdout.write(
        `adapter written to ${res.out}: ${res.steps} steps, final loss ${res.finalLoss.toFixed(4)}` +
          (res.evalLoss !== null ? `, eval loss ${res.evalLoss.toFixed(4)}` : '') +
          `, ${res.tokensPerSecond.toFixed(0)} tok/s, peak RSS ${formatBytes(res.peakRssBytes)} (estimated ${formatBytes(res.memory.bytes)})\n`,
      );
    }
    return 0;
  },
};
