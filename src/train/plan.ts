// The fine-tune plan: `FinetuneOptions` (what the CLI, `serve`'s jobs and library callers pass) parsed and
// validated ONCE into a typed `FinetunePlan` with every default filled in, before any file is read. The
// trainer's phases (src/train/trainer.ts) consume the plan and never look at the raw options again.
// FINETUNE_NUMBERS is the one rule per numeric option (its flag and range); `edgelora finetune` parses its
// flags with the same table, so the CLI and the library cannot accept different values.
import path from 'node:path';
import type ort from 'onnxruntime-node';
import type { StDType } from '../formats/safetensors.js';
import { LINEAR_PROJS, type Proj } from '../model/llama.js';
import type { BudgetSource } from '../profiles/memory.js';
import { EdgeloraError } from '../util/errors.js';
import { checkNumber, type NumberCheck } from '../util/number-check.js';
import type { OptimizerKind, ScheduleKind } from './optim.js';
import type { LogEntry } from './checkpoint.js';

export interface FinetuneOptions {
  /** A directory written by `edgelora quantize`. */
  readonly model: string;
  /** JSONL training data. */
  readonly data: string;
  /** Output adapter directory (must not exist). */
  readonly out: string;
  /** LoRA rank r, default 8 (ignored with initAdapter: the adapter's own is kept). */
  readonly rank?: number;
  /** LoRA alpha, default 16. */
  readonly alpha?: number;
  /** Projections to adapt, default q_proj, v_proj. */
  readonly targets?: readonly Proj[];
  /** Optimizer steps; default: `epochs` passes over the data. */
  readonly steps?: number;
  /** Passes over the data when `steps` is not given, default 1. */
  readonly epochs?: number;
  /** Peak learning rate, default 2e-4. */
  readonly lr?: number;
  readonly optimizer?: OptimizerKind;
  readonly weightDecay?: number;
  /** Rows per micro-batch, default 4. */
  readonly batchSize?: number;
  /** Micro-batches per optimizer step, default 1. */
  readonly gradAccum?: number;
  /** Rows longer than this many tokens are truncated with a warning; default min(512, context). */
  readonly seqLen?: number;
  /** Clip gradients to this global norm; 0 disables. Default 1.0. */
  readonly maxGradNorm?: number;
  /** LoRA dropout probability; 0 disables. Default 0.05 (with initAdapter: its lora_dropout). */
  readonly loraDropout?: number;
  /** Continue from this adapter (its rank, alpha and targets are kept). */
  readonly initAdapter?: string;
  /** JSONL data scored (mean NLL) after training. */
  readonly evalData?: string;
  /** Write a checkpoint every N steps; 0 = never. Default 0. */
  readonly saveEvery?: number;
  /**
   * Write a checkpoint when this many seconds passed since the last one (or the start), at a step
   * boundary; 0 = never. Default 0 (the CLI defaults to 300: at most ~5 minutes of work lost).
   */
  readonly saveEverySeconds?: number;
  /**
   * Continue from `<out>.checkpoint`. true: the checkpoint must exist (else an error);
   * 'if-present': start from step 0 when there is none.
   */
  readonly resume?: boolean | 'if-present';
  /**
   * Aborting stops at the next step boundary: a checkpoint is written there (whatever the cadence)
   * and the result says interrupted (no adapter written). SIGINT/SIGTERM in the CLI.
   */
  readonly signal?: AbortSignal;
  /** Seed of the init, data order and dropout masks; default 0. */
  readonly seed?: number;
  /** Refuse plans whose estimated peak exceeds this many bytes. */
  readonly memoryBudget?: number;
  /**
   * A device profile (src/profiles) supplying the budget when `memoryBudget` is not set; the lead
   * wires `--profile` here. Only these fields are read.
   */
  readonly profile?: { readonly id: string; readonly memoryBudgetBytes: number };
  /** Recompute each layer's activations in backward (less memory, ~1 extra forward). */
  readonly recompute?: boolean;
  /** Linear warmup steps, default 0. */
  readonly warmup?: number;
  /** Decay after warmup, default linear (the Hugging Face Trainer default). */
  readonly schedule?: ScheduleKind;
  /** Adapter tensor dtype on disk, default F32. */
  readonly dtype?: StDType;
  /** dX through a 4-bit base: 'dequantize' (CPU-correct, default) or 'transB0' (CUDA EP only). */
  readonly bnb4Backward?: 'dequantize' | 'transB0';
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
  readonly onWarning?: (msg: string) => void;
  /** Called after every optimizer step. */
  readonly onStep?: (e: LogEntry, total: number) => void;
  /** Test hook: stop (as if killed) after this step's checkpoint, writing no adapter. */
  readonly stopAfterStep?: number;
}

/** A numeric option's rule: the CLI flag that sets it (named in errors) and its range. */
export interface NumberRule {
  readonly flag: string;
  readonly check: NumberCheck;
}

/** The one rule per numeric option; `edgelora finetune` parses each flag with its entry. */
export const FINETUNE_NUMBERS = {
  rank: { flag: 'rank', check: { integer: true, min: 1 } },
  alpha: { flag: 'alpha', check: { positive: true } },
  steps: { flag: 'steps', check: { integer: true, min: 1 } },
  epochs: { flag: 'epochs', check: { positive: true } },
  lr: { flag: 'lr', check: { positive: true } },
  weightDecay: { flag: 'weight-decay', check: { min: 0 } },
  batchSize: { flag: 'batch-size', check: { integer: true, min: 1 } },
  gradAccum: { flag: 'grad-accum', check: { integer: true, min: 1 } },
  seqLen: { flag: 'seq-len', check: { integer: true, min: 2 } },
  maxGradNorm: { flag: 'max-grad-norm', check: { min: 0 } },
  loraDropout: { flag: 'lora-dropout', check: { min: 0, below: 1 } },
  warmup: { flag: 'warmup', check: { integer: true, min: 0 } },
  saveEvery: { flag: 'save-every', check: { integer: true, min: 0 } },
  saveEverySeconds: { flag: 'save-interval', check: { min: 0 } },
  seed: { flag: 'seed', check: { integer: true, min: 0 } },
  memoryBudget: { flag: 'memory-budget', check: { positive: true } },
} as const satisfies Partial<Record<keyof FinetuneOptions, NumberRule>>;
export type FinetuneNumber = keyof typeof FINETUNE_NUMBERS;

/** `v` when it satisfies the option's rule; otherwise an EdgeloraError naming the option's flag. */
export function checkFinetuneNumber(option: FinetuneNumber, v: number): number {
  const rule: NumberRule = FINETUNE_NUMBERS[option];
  return checkNumber(rule.flag, v, rule.check);
}

/** The adapter to train: a new one (PEFT init) or one continued, whose own rank, alpha and targets are kept. */
export type LoraStart =
  | { readonly kind: 'new'; readonly rank: number; readonly alpha: number; readonly targets: readonly Proj[] }
  /** `ignored`: the options given that the continued adapter overrides (warned about once it loaded). */
  | { readonly kind: 'continue'; readonly dir: string; readonly ignored: readonly ('rank' | 'alpha' | 'targets')[] };

/** FinetuneOptions validated, with every default filled in (see FinetuneOptions for units and defaults). */
export interface FinetunePlan {
  readonly model: string;
  readonly data: string;
  /** Absolute. */
  readonly out: string;
  readonly evalData: string | null;
  readonly lora: LoraStart;
  /** Given; absent: the continued adapter's lora_dropout, or 0.05 for a new one. */
  readonly loraDropout: number | undefined;
  /** How long to train: optimizer steps, or passes over the data (resolved once the data is loaded). */
  readonly length: { readonly steps: number } | { readonly epochs: number };
  readonly lr: number;
  readonly optimizer: OptimizerKind;
  readonly weightDecay: number;
  readonly schedule: ScheduleKind;
  readonly warmup: number;
  readonly batchSize: number;
  readonly gradAccum: number;
  readonly maxGradNorm: number;
  /** Given; absent: min(512, the model's context), resolved once the model is read. */
  readonly seqLen: number | undefined;
  readonly seed: number;
  readonly saveEvery: number;
  readonly saveEverySeconds: number;
  readonly resume: boolean | 'if-present';
  readonly stopAfterStep: number | undefined;
  /** The budget the memory plan is checked against, and who set it; null: no check. */
  readonly budget: { readonly bytes: number; readonly source: BudgetSource } | null;
  readonly recompute: boolean;
  readonly bnb4Backward: 'dequantize' | 'transB0';
  readonly dtype: StDType;
  readonly sessionOptions: ort.InferenceSession.SessionOptions | undefined;
  readonly signal: AbortSignal | undefined;
  readonly warn: (msg: string) => void;
  readonly onStep: ((e: LogEntry, total: number) => void) | undefined;
}

const flagError = (flag: string, msg: string, hint?: string) => new EdgeloraError(msg, { where: `--${flag}`, ...(hint ? { hint } : {}) });

/** Validates `o` (every number against FINETUNE_NUMBERS) and fills in the defaults. Reads no file. */
export function parseFinetuneOptions(o: FinetuneOptions): FinetunePlan {
  const num = (option: FinetuneNumber, given: number | undefined, def: number): number => checkFinetuneNumber(option, given ?? def);
  const opt = (option: FinetuneNumber, given: number | undefined): number | undefined => (given === undefined ? undefined : checkFinetuneNumber(option, given));
  const lr = num('lr', o.lr, 2e-4);
  const batchSize = num('batchSize', o.batchSize, 4);
  const gradAccum = num('gradAccum', o.gradAccum, 1);
  const maxGradNorm = num('maxGradNorm', o.maxGradNorm, 1.0);
  const saveEvery = num('saveEvery', o.saveEvery, 0);
  const saveEverySeconds = num('saveEverySeconds', o.saveEverySeconds, 0);
  const seed = num('seed', o.seed, 0);
  const warmup = num('warmup', o.warmup, 0);
  const weightDecay = num('weightDecay', o.weightDecay, 0);
  if (o.steps !== undefined && o.epochs !== undefined) throw flagError('steps', 'give --steps or --epochs, not both');
  const steps = opt('steps', o.steps);
  const epochs = opt('epochs', o.epochs);
  const rank = opt('rank', o.rank);
  const alpha = opt('alpha', o.alpha);
  const loraDropout = opt('loraDropout', o.loraDropout);
  const memoryBudget = opt('memoryBudget', o.memoryBudget);
  const seqLen = opt('seqLen', o.seqLen);
  let lora: LoraStart;
  if (o.initAdapter) {
    const given = { rank, alpha, targets: o.targets };
    lora = { kind: 'continue', dir: o.initAdapter, ignored: (['rank', 'alpha', 'targets'] as const).filter((k) => given[k] !== undefined) };
  } else {
    const targets = o.targets ?? (['q_proj', 'v_proj'] as Proj[]);
    if (targets.length === 0) throw flagError('targets', 'no target projections', `choose from ${LINEAR_PROJS.join(', ')} or all-linear`);
    lora = { kind: 'new', rank: rank ?? 8, alpha: alpha ?? 16, targets };
  }
  return {
    model: o.model,
    data: o.data,
    out: path.resolve(o.out),
    evalData: o.evalData ?? null,
    lora,
    loraDropout,
    length: steps !== undefined ? { steps } : { epochs: epochs ?? 1 },
    lr,
    optimizer: o.optimizer ?? 'adamw',
    weightDecay,
    schedule: o.schedule ?? 'linear',
    warmup,
    batchSize,
    gradAccum,
    maxGradNorm,
    seqLen,
    seed,
    saveEvery,
    saveEverySeconds,
    resume: o.resume ?? false,
    stopAfterStep: o.stopAfterStep,
    // An explicit budget wins over the profile's.
    budget: memoryBudget !== undefined ? { bytes: memoryBudget, source: { flag: FINETUNE_NUMBERS.memoryBudget.flag } } : o.profile ? { bytes: o.profile.memoryBudgetBytes, source: o.profile.id } : null,
    recompute: o.recompute ?? false,
    bnb4Backward: o.bnb4Backward ?? 'dequantize',
    dtype: o.dtype ?? 'F32',
    sessionOptions: o.sessionOptions,
    signal: o.signal,
    warn: o.onWarning ?? (() => undefined),
    onStep: o.onStep,
  };
}
