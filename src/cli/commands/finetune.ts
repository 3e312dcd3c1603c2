// `edgelora finetune`: train a LoRA adapter on a frozen quantized base (a thin layer over
// src/train/trainer.ts `finetune()`).
import type { Command } from '../command.js';
import { parseFlags, numberFlag, requireFlag, checkOutputPath, choiceFlag } from '../command.js';
import path from 'node:path';
import { readManifest } from '../../model/manifest.js';
import { parseHfConfig } from '../../formats/hf-config.js';
import { readPeftConfig } from '../../adapters/peft.js';
import type { FinetuneDefaults } from '../../profiles/schema.js';
import { finetune, type FinetuneOptions } from '../../train/trainer.js';
import { FINETUNE_NUMBERS, type FinetuneNumber } from '../../train/plan.js';
import { checkpointDir } from '../../train/checkpoint.js';
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
Batch size, sequence length, rank, alpha, targets and recomputation default to the device profile's
fine-tune settings (\`edgelora doctor\` shows them); a flag overrides one, and the settings used are
printed before training (and in --json). On Linux (glibc) the command re-runs itself once with
MALLOC_MMAP_THRESHOLD_=131072, which lowers a step's peak RSS (set the variable yourself to skip that).

Flags:
  --model DIR            a directory written by \`edgelora quantize\` (required)
  --data FILE            JSONL training data (required)
  --out DIR              adapter directory to create (required; must not exist)
  --rank R               LoRA rank (default: the device profile's, e.g. 8)
  --alpha A              LoRA alpha; scale = alpha / rank (default: the profile's, e.g. 16)
  --targets LIST         comma-separated projections, or all-linear (default: the profile's, e.g. q_proj,v_proj)
  --steps N              optimizer steps (default: --epochs passes over the data)
  --epochs E             passes over the data when --steps is not given (default 1)
  --lr LR                peak learning rate (default 2e-4)
  --optimizer NAME       adamw (betas 0.9/0.999, eps 1e-8) or sgd (default adamw)
  --weight-decay WD      weight decay (default 0)
  --batch-size B         rows per micro-batch (default: the profile's, e.g. 1)
  --grad-accum G         micro-batches per optimizer step (default 1)
  --seq-len L            longer rows are truncated, with a warning naming the line
                         (default: the profile's, e.g. 256, at most the model's context)
  --max-grad-norm X      clip gradients to this global norm; 0 disables (default 1.0)
  --lora-dropout P       dropout on the LoRA input, in [0, 1); 0 disables (default 0.05)
  --warmup N             linear warmup steps (default 0)
  --schedule NAME        cosine, linear or constant after warmup (default linear)
  --init-adapter DIR     continue from this adapter (its rank, alpha and targets are kept)
  --eval-data FILE       JSONL data scored (mean NLL) after training
  --save-every N         checkpoint every N steps into <out>.checkpoint (default 0 = by time only)
  --save-interval S      also checkpoint when S seconds passed since the last one (default 300;
                         0 = never), so a crash loses at most about S seconds of training.
                         SIGINT/SIGTERM (Ctrl-C) stop at the next step boundary, write a
                         checkpoint whatever the cadence, print how to resume and exit 130/143;
                         a second signal exits at once
  --resume               continue from <out>.checkpoint (same flags as the interrupted run); an
                         error when there is no checkpoint
  --resume-or-start      continue from <out>.checkpoint when there is one, else start at step 0
  --seed S               seed of the init, data order and dropout (default 0)
${PROFILE_HELP}
  --memory-budget SIZE   refuse plans whose estimated peak exceeds SIZE (bytes, or e.g. 4GiB, 512MB)
  --recompute            recompute each layer's activations in backward (less memory, slower;
                         default: the profile's, see \`edgelora doctor\`)
  --no-recompute         keep activations for backward (more memory, faster)
  --dtype NAME           adapter tensors on disk: f32, f16 or bf16 (default f32)
  --json                 print one JSON summary (final loss, loss per step, tokens/s, peak RSS)
  -h, --help             this text`;

const UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };

/** "4GiB", "512MB", "1e9" → bytes. */
export function parseByteSize(flag: string, raw: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*$/.exec(raw);
  const unit = UNITS[(m?.[2] ?? '').toLowerCase() || 'b'];
  if (!m || unit === undefined || !(Number(m[1]) > 0)) {
    throw new EdgeloraError(`not a size: ${JSON.stringify(raw)}`, { where: `--${flag}`, hint: 'give bytes or a number with a unit: 4GiB, 512MB, 2e9' });
  }
  return Math.floor(Number(m[1]) * unit);
}

export function parseTargets(raw: string | undefined): Proj[] | undefined {
  if (raw === undefined) return undefined;
  if (raw === 'all-linear') return [...LINEAR_PROJS];
  const list = raw.split(',').map((s) => s.trim()).filter(Boolean);
  for (const t of list) {
    if (!(LINEAR_PROJS as readonly string[]).includes(t)) {
      throw new EdgeloraError(`unknown projection "${t}"`, { where: '--targets', hint: `choose from ${LINEAR_PROJS.join(', ')}, or all-linear` });
    }
  }
  if (list.length === 0) throw new EdgeloraError('no projection given', { where: '--targets', hint: `choose from ${LINEAR_PROJS.join(', ')}, or all-linear` });
  return list as Proj[];
}

type From = 'flag' | 'profile' | 'model context';
type Setting<T> = { value: T; from: From };

export interface FinetuneSettings {
  /** Absent with --init-adapter and no flag: the adapter's own rank, alpha and targets are kept. */
  rank?: Setting<number>;
  alpha?: Setting<number>;
  targets?: Setting<Proj[]>;
  batchSize: Setting<number>;
  seqLen: Setting<number>;
  recompute: Setting<boolean>;
}

/**
 * The fine-tune settings: each flag given, else the device profile's default (what \`doctor\`
 * shows); the profile's sequence length is capped at the model's context.
 */
export async function finetuneSettings(
  modelDir: string,
  flags: { rank?: number | undefined; alpha?: number | undefined; targets?: Proj[] | undefined; batchSize?: number | undefined; seqLen?: number | undefined; recompute?: boolean | undefined },
  profile: FinetuneDefaults,
  continuing: boolean,
): Promise<FinetuneSettings> {
  const pick = <T>(flag: T | undefined, def: T): Setting<T> => (flag !== undefined ? { value: flag, from: 'flag' } : { value: def, from: 'profile' });
  const manifest = await readManifest(modelDir);
  const context = parseHfConfig(manifest.sourceConfig, path.join(modelDir, 'manifest.json')).maxPositionEmbeddings;
  const profileTargets = parseTargets(profile.targets.join(',')) ?? [];
  const seqLen: Setting<number> =
    flags.seqLen !== undefined ? { value: flags.seqLen, from: 'flag' } : profile.seqLen > context ? { value: context, from: 'model context' } : { value: profile.seqLen, from: 'profile' };
  return {
    ...(flags.rank !== undefined || !continuing ? { rank: pick(flags.rank, profile.rank) } : {}),
    ...(flags.alpha !== undefined || !continuing ? { alpha: pick(flags.alpha, profile.alpha) } : {}),
    ...(flags.targets !== undefined || !continuing ? { targets: pick(flags.targets, profileTargets) } : {}),
    batchSize: pick(flags.batchSize, profile.batchSize),
    seqLen,
    recompute: pick(flags.recompute, profile.recompute),
  };
}

/** "settings: batch 1 × 256 tokens, rank 8 (alpha 16) on q_proj, v_proj, recompute on — profile …" */
export function describeSettings(st: FinetuneSettings, profileId: string): string {
  const mark = (x: { from: From } | undefined) => (x && x.from !== 'profile' ? ` [${x.from}]` : '');
  const lora = st.rank && st.alpha && st.targets
    ? `rank ${st.rank.value}${mark(st.rank)} (alpha ${st.alpha.value}${mark(st.alpha)}) on ${st.targets.value.join(', ')}${mark(st.targets)}`
    : "the --init-adapter's rank, alpha and targets";
  return (
    `settings: batch ${st.batchSize.value}${mark(st.batchSize)} × ${st.seqLen.value}${mark(st.seqLen)} tokens, ${lora}, ` +
    `recompute ${st.recompute.value ? 'on' : 'off'}${mark(st.recompute)} (defaults from profile ${profileId}; [flag] marks a flag)`
  );
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
      'resume-or-start': { type: 'boolean' },
      'save-interval': { type: 'string' },
      seed: { type: 'string' },
      'memory-budget': { type: 'string' },
      ...PROFILE_FLAGS,
      recompute: { type: 'boolean' },
      'no-recompute': { type: 'boolean' },
      dtype: { type: 'string' },
      json: { type: 'boolean' },
    }, { positionals: [] });
    if (h) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const s = (k: string) => v[k as keyof typeof v] as string | undefined;
    // Each numeric flag by the trainer's own rule for the option it sets (one range for both).
    const num = (option: FinetuneNumber): number | undefined => {
      const { flag, check } = FINETUNE_NUMBERS[option];
      return s(flag) === undefined ? undefined : numberFlag(flag, s(flag), 0, check);
    };
    const json = Boolean(v.json);
    const dtype = choiceFlag('dtype', s('dtype'), ['f32', 'f16', 'bf16'] as const);
    const model = requireFlag('finetune', 'model', s('model'));
    const data = requireFlag('finetune', 'data', s('data'));
    const out = requireFlag('finetune', 'out', s('out'));
    const lr = num('lr');
    const memoryBudget = s('memory-budget') === undefined ? undefined : parseByteSize('memory-budget', s('memory-budget')!);
    if (v.recompute && v['no-recompute']) throw new EdgeloraError('give --recompute or --no-recompute, not both', { where: 'edgelora finetune' });
    // Flags are checked before the profile is resolved and before any file is read.
    const flagged = {
      rank: num('rank'),
      alpha: num('alpha'),
      targets: parseTargets(s('targets')),
      batchSize: num('batchSize'),
      seqLen: num('seqLen'),
      recompute: v.recompute ? true : v['no-recompute'] ? false : undefined,
    };
    const loraDropout = num('loraDropout');
    await checkOutputPath(out, { what: 'the --out adapter directory', hint: 'choose a new --out directory (or remove the old adapter); --resume continues from <out>.checkpoint' });
    // The device profile gives the memory budget (unless --memory-budget is set), the execution
    // providers, and the fine-tune settings no flag gave.
    const rp = await resolveProfile({ profile: s('profile') ?? 'auto', modelFormat: (await readManifest(model)).quant.format, overrides: parseProfileSets((v['profile-set'] as string[] | undefined) ?? []) });
    const settings = await finetuneSettings(model, flagged, rp.finetuneDefaults, Boolean(s('init-adapter')));
    if (!json) process.stderr.write(`${describeSettings(settings, rp.profile.id)}\n`);
    let progress: Progress | null = null;
    // SIGINT/SIGTERM: stop at the next step boundary with a checkpoint; a second one exits at once.
    const stopper = new AbortController();
    let signalName: NodeJS.Signals | null = null;
    const onSignal = (sig: NodeJS.Signals) => {
      if (signalName) process.exit(sig === 'SIGTERM' ? 143 : 130);
      signalName = sig;
      process.stderr.write(`\n${sig}: stopping after this step and writing a checkpoint (${sig} again to exit at once, losing the step)\n`);
      stopper.abort();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    const opts: FinetuneOptions = {
      model,
      data,
      out,
      ...(settings.rank ? { rank: settings.rank.value } : {}),
      ...(settings.alpha ? { alpha: settings.alpha.value } : {}),
      ...(settings.targets ? { targets: settings.targets.value } : {}),
      batchSize: settings.batchSize.value,
      seqLen: settings.seqLen.value,
      recompute: settings.recompute.value,
      ...(num('steps') !== undefined ? { steps: num('steps')! } : {}),
      ...(num('epochs') !== undefined ? { epochs: num('epochs')! } : {}),
      ...(lr !== undefined ? { lr } : {}),
      ...(choiceFlag('optimizer', s('optimizer'), ['adamw', 'sgd'] as const) ? { optimizer: s('optimizer') as 'adamw' | 'sgd' } : {}),
      ...(num('weightDecay') !== undefined ? { weightDecay: num('weightDecay')! } : {}),
      ...(num('gradAccum') !== undefined ? { gradAccum: num('gradAccum')! } : {}),
      ...(num('maxGradNorm') !== undefined ? { maxGradNorm: num('maxGradNorm')! } : {}),
      ...(loraDropout !== undefined ? { loraDropout } : {}),
      ...(num('warmup') !== undefined ? { warmup: num('warmup')! } : {}),
      ...(choiceFlag('schedule', s('schedule'), ['cosine', 'linear', 'constant'] as const) ? { schedule: s('schedule') as 'cosine' | 'linear' | 'constant' } : {}),
      ...(s('init-adapter') ? { initAdapter: s('init-adapter')! } : {}),
      ...(s('eval-data') ? { evalData: s('eval-data')! } : {}),
      ...(num('saveEvery') !== undefined ? { saveEvery: num('saveEvery')! } : {}),
      ...(v.resume ? { resume: true } : v['resume-or-start'] ? { resume: 'if-present' as const } : {}),
      saveEverySeconds: numberFlag('save-interval', s('save-interval'), 300, FINETUNE_NUMBERS.saveEverySeconds.check),
      signal: stopper.signal,
      ...(num('seed') !== undefined ? { seed: num('seed')! } : {}),
      ...(memoryBudget !== undefined ? { memoryBudget } : {}),
      profile: { id: rp.profile.id, memoryBudgetBytes: rp.memoryBudgetBytes },
      sessionOptions: rp.sessionOptions({ graphOptimizationLevel: 'all', enableCpuMemArena: false }),
      ...(dtype ? { dtype: dtype.toUpperCase() as StDType } : {}),
      onWarning: (m) => process.stderr.write(`warning: ${m}\n`),
      onStep: (e, total) => {
        // The rate counts this run's steps from when its first step began (a resumed run starts at e.step - 1).
        progress ??= new Progress({ total, label: 'finetune', silent: json, startedAt: Date.now() - e.seconds * 1000, from: e.step - 1 });
        progress.update(e.step, { loss: e.loss, 'tok/s': Math.round(e.tokens / Math.max(e.seconds, 1e-9)) });
      },
    };
    let res: Awaited<ReturnType<typeof finetune>>;
    try {
      res = await finetune(opts);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    if (res.interrupted) {
      const again = ['edgelora', 'finetune', ...argv.filter((a) => a !== '--resume' && a !== '--resume-or-start'), '--resume'].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`)).join(' ');
      const where = checkpointDir(res.out);
      if (json) process.stdout.write(JSON.stringify({ interrupted: true, signal: signalName, steps_done: res.steps, checkpoint: where, resume: again }) + '\n');
      process.stderr.write(`${signalName ?? 'stopped'} at step ${res.steps}: checkpoint written to ${where}\nresume with: ${again}\n`);
      return signalName === 'SIGTERM' ? 143 : 130;
    }
    if (json) {
      // The adapter's own config is the truth for rank/alpha/targets/dropout (with --init-adapter
      // they come from the adapter continued); the rest is what was passed to the trainer.
      const written = await readPeftConfig(res.out);
      process.stdout.write(
        JSON.stringify({
          out: res.out,
          profile: rp.profile.id,
          settings: {
            rank: written.r,
            alpha: written.lora_alpha,
            targets: written.target_modules,
            lora_dropout: written.lora_dropout,
            batch_size: settings.batchSize.value,
            seq_len: settings.seqLen.value,
            recompute: settings.recompute.value,
            ...(lr !== undefined ? { lr } : {}),
          },
          settings_from: Object.fromEntries(Object.entries(settings).flatMap(([k, x]) => (x ? [[k, x.from]] : []))),
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
