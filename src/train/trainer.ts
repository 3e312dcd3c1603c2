// `finetune()`: QLoRA-style training of a LoRA adapter on a frozen quantized base. Loads the JSONL
// data (the same formats as `edgelora eval`), initializes (PEFT init) or continues an adapter, checks
// the memory plan, then runs optimizer steps of G micro-batches × B rows through one ORT training
// session, with host-side AdamW/SGD, warmup + decay, clipping, dropout masks and atomic checkpoints.
// The output is a PEFT adapter directory bound to the base fingerprint, plus training_log.jsonl.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type ort from 'onnxruntime-node';
import { readManifest, MODEL_FILE, DATA_FILE } from '../model/manifest.js';
import { parseHfConfig } from '../formats/hf-config.js';
import { loadTokenizer } from '../formats/tokenizer.js';
import type { StDType } from '../formats/safetensors.js';
import { loadJsonl, type Example } from '../data/jsonl.js';
import { LINEAR_PROJS, linearShape, type Proj } from '../model/llama.js';
import { loadAdapter, makePeftConfig, saveAdapter, loraScale, type LoraModule, type PeftConfig } from '../adapters/peft.js';
import { canonicalJson } from '../util/canonical-json.js';
import { checkMemoryPlan, formatBytes } from '../profiles/memory.js';
import { EdgeloraError } from '../util/errors.js';
import { Rng } from '../util/rng.js';
import { writeDirAtomic, writeFileAtomic } from '../util/atomic.js';
import { TrainSession, paramKey, countLabelTokens, dropoutBits, NO_DROPOUT, type LoraParam, type LoraGrad, type MicroBatch } from './session.js';
import { LOSS_CHUNK, type LoraTarget } from './graph.js';
import { optimizerUpdate, learningRate, clipByGlobalNorm, initLora, type OptimizerKind, type ScheduleKind, type TensorState } from './optim.js';
import { estimateTrainingMemory, type TrainMemoryEstimate } from './memory.js';
import { checkpointDir, hasCheckpoint, loadCheckpoint, saveCheckpoint, CHECKPOINT_FORMAT, type CheckpointState, type LogEntry } from './checkpoint.js';

export const TRAINING_LOG = 'training_log.jsonl';

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

export interface FinetuneResult {
  readonly out: string;
  /** true when stopped by stopAfterStep or the abort signal (a checkpoint, no adapter, written). */
  readonly interrupted: boolean;
  readonly steps: number;
  readonly resumedFrom: number;
  readonly finalLoss: number;
  readonly losses: number[];
  readonly log: LogEntry[];
  readonly tokens: number;
  readonly tokensPerSecond: number;
  readonly peakRssBytes: number;
  readonly evalLoss: number | null;
  readonly memory: TrainMemoryEstimate;
  readonly parameters: number;
  readonly seconds: number;
}

const flagError = (flag: string, msg: string, hint?: string) => new EdgeloraError(msg, { where: `--${flag}`, ...(hint ? { hint } : {}) });

function checkInt(flag: string, v: number, min: number): number {
  if (!Number.isInteger(v) || v < min) throw flagError(flag, `--${flag} ${v}: must be an integer ≥ ${min}`);
  return v;
}

function checkNum(flag: string, v: number, ok: (x: number) => boolean, what: string): number {
  if (!Number.isFinite(v) || !ok(v)) throw flagError(flag, `--${flag} ${v}: ${what}`);
  return v;
}

/** Deterministic 32-bit seed from parts (for per-epoch / per-micro-batch generators). */
function subSeed(...parts: (string | number)[]): number {
  return createHash('sha256').update(parts.join('|')).digest().readUInt32LE(0);
}

export async function finetune(o: FinetuneOptions): Promise<FinetuneResult> {
  const t0 = performance.now();
  const warn = o.onWarning ?? (() => undefined);
  // --- options ---
  const lr = checkNum('lr', o.lr ?? 2e-4, (x) => x > 0, 'must be a positive number');
  const batchSize = checkInt('batch-size', o.batchSize ?? 4, 1);
  const gradAccum = checkInt('grad-accum', o.gradAccum ?? 1, 1);
  const maxGradNorm = checkNum('max-grad-norm', o.maxGradNorm ?? 1.0, (x) => x >= 0, 'must be ≥ 0 (0 disables clipping)');
  const saveEvery = checkInt('save-every', o.saveEvery ?? 0, 0);
  const saveEverySeconds = o.saveEverySeconds ?? 0;
  if (!(Number.isFinite(saveEverySeconds) && saveEverySeconds >= 0)) throw new EdgeloraError(`saveEverySeconds ${saveEverySeconds}: must be a number ≥ 0`, { where: '--save-interval' });
  const seed = checkInt('seed', o.seed ?? 0, 0);
  const warmup = checkInt('warmup', o.warmup ?? 0, 0);
  const weightDecay = checkNum('weight-decay', o.weightDecay ?? 0, (x) => x >= 0, 'must be ≥ 0');
  const optimizer = o.optimizer ?? 'adamw';
  const schedule = o.schedule ?? 'linear';
  if (o.steps !== undefined && o.epochs !== undefined) throw flagError('steps', 'give --steps or --epochs, not both');
  if (o.steps !== undefined) checkInt('steps', o.steps, 1);
  if (o.epochs !== undefined) checkNum('epochs', o.epochs, (x) => x > 0, 'must be a positive number');
  if (o.rank !== undefined) checkInt('rank', o.rank, 1);
  if (o.alpha !== undefined) checkNum('alpha', o.alpha, (x) => x > 0, 'must be a positive number');
  if (o.loraDropout !== undefined) checkNum('lora-dropout', o.loraDropout, (x) => x >= 0 && x < 1, 'must be in [0, 1)');
  if (o.memoryBudget !== undefined) checkNum('memory-budget', o.memoryBudget, (x) => x > 0, 'must be a positive number of bytes');
  const out = path.resolve(o.out);
  if (await fs.stat(out).then(() => true, () => false)) {
    throw flagError('out', `${out} already exists`, 'choose a new --out directory (or remove the old adapter)');
  }

  // --- model, data ---
  const manifest = await readManifest(o.model);
  const cfg = parseHfConfig(manifest.sourceConfig, path.join(o.model, 'manifest.json'));
  const tok = await loadTokenizer(o.model);
  const seqLen = checkInt('seq-len', o.seqLen ?? Math.min(512, cfg.maxPositionEmbeddings), 2);
  if (seqLen > cfg.maxPositionEmbeddings) throw flagError('seq-len', `--seq-len ${seqLen} exceeds the model's context (${cfg.maxPositionEmbeddings})`);
  const examples = await loadJsonl(o.data, tok, { seqLen, onWarning: warn });
  if (examples.length === 0) throw new EdgeloraError('no row of the data set has tokens to learn from', { where: o.data, hint: 'check the warnings above' });
  const evalExamples = o.evalData ? await loadJsonl(o.evalData, tok, { seqLen, onWarning: warn }) : null;

  // --- adapter: new (PEFT init) or continued ---
  const params = new Map<string, LoraParam>();
  let config: PeftConfig;
  if (o.initAdapter) {
    const ad = await loadAdapter(o.initAdapter, { cfg, fingerprint: manifest.fingerprint });
    for (const [flag, given] of [['rank', o.rank], ['alpha', o.alpha], ['targets', o.targets]] as const) {
      if (given !== undefined) warn(`--${flag} is ignored with --init-adapter: the adapter's own ${flag} is kept`);
    }
    if (ad.baseFingerprint === null) warn(`${o.initAdapter}: adapter is not bound to a base fingerprint; assuming it fits this base`);
    config = { ...ad.config, inference_mode: true };
    if (o.loraDropout !== undefined) config = { ...config, lora_dropout: o.loraDropout };
    for (const m of ad.modules.values()) {
      const { N, K } = linearShape(cfg, m.proj);
      params.set(paramKey(m.layer, m.proj), { layer: m.layer, proj: m.proj, r: m.r, K, N, alpha: m.alpha, scale: m.scale, a: Float32Array.from(m.a), b: Float32Array.from(m.b) });
    }
  } else {
    const rank = o.rank ?? 8;
    const alpha = o.alpha ?? 16;
    const projs = o.targets ?? (['q_proj', 'v_proj'] as Proj[]);
    if (projs.length === 0) throw flagError('targets', 'no target projections', `choose from ${LINEAR_PROJS.join(', ')} or all-linear`);
    config = makePeftConfig({ r: rank, alpha, targets: [...projs], dropout: o.loraDropout ?? 0.05, baseModel: path.basename(path.resolve(o.model)) });
    const rng = new Rng(seed);
    for (let layer = 0; layer < cfg.numLayers; layer++) {
      for (const proj of LINEAR_PROJS.filter((p) => projs.includes(p))) {
        const { N, K } = linearShape(cfg, proj);
        const { a, b } = initLora(rng, rank, K, N);
        params.set(paramKey(layer, proj), { layer, proj, r: rank, K, N, alpha, scale: loraScale(alpha, rank, false), a, b });
      }
    }
  }
  const dropoutP = config.lora_dropout;
  const targets: LoraTarget[] = [...params.values()].map((p) => ({ layer: p.layer, proj: p.proj, rank: p.r, K: p.K, N: p.N }));
  let parameters = 0;
  for (const p of params.values()) parameters += p.a.length + p.b.length;

  // --- memory plan ---
  const sizeOf = (f: string) => fs.stat(path.join(o.model, f)).then((s) => s.size, () => 0);
  const baseBytes = (await sizeOf(MODEL_FILE)) + (await sizeOf(DATA_FILE));
  let dequantBytes = 0;
  if (manifest.quant.format !== 'fp32') for (const p of LINEAR_PROJS) { const { N, K } = linearShape(cfg, p); dequantBytes = Math.max(dequantBytes, 12 * N * K); }
  const longest = Math.max(...examples.map((e) => e.inputIds.length));
  const memory = estimateTrainingMemory({ cfg, baseBytes, dequantBytes, batch: Math.min(batchSize, examples.length), seqLen: Math.min(seqLen, longest), targets, dropout: dropoutP > 0, optimizer, recompute: o.recompute ?? false, lossChunkRows: LOSS_CHUNK });
  if (o.memoryBudget !== undefined) {
    if (memory.bytes > o.memoryBudget) {
      const biggest = Object.entries(memory.breakdown).sort((a, b) => b[1] - a[1]).slice(0, 3).map(([k, v]) => `${k} ${formatBytes(v)}`).join(', ');
      throw new EdgeloraError(`${memory.what} needs about ${formatBytes(memory.bytes)}, over the budget of ${formatBytes(o.memoryBudget)} (biggest: ${biggest})`, {
        where: '--memory-budget',
        hint: `lower ${memory.lower.join(', ')}, or raise --memory-budget`,
      });
    }
  } else if (o.profile) {
    checkMemoryPlan(memory, o.profile.memoryBudgetBytes, o.profile.id);
  }

  // --- plan: data order, steps ---
  const n = examples.length;
  const batchesPerEpoch = Math.ceil(n / batchSize);
  const totalSteps = o.steps ?? Math.max(1, Math.ceil(((o.epochs ?? 1) * batchesPerEpoch) / gradAccum));
  const epochPerm = new Map<number, number[]>();
  const microBatch = (m: number): Example[] => {
    const epoch = Math.floor(m / batchesPerEpoch);
    let perm = epochPerm.get(epoch);
    if (!perm) {
      perm = [...Array(n).keys()];
      const r = new Rng(subSeed('data', seed, epoch));
      for (let i = n - 1; i > 0; i--) {
        const j = r.int(i + 1);
        [perm[i], perm[j]] = [perm[j]!, perm[i]!];
      }
      epochPerm.clear();
      epochPerm.set(epoch, perm);
    }
    const chunk = m % batchesPerEpoch;
    return perm.slice(chunk * batchSize, (chunk + 1) * batchSize).map((i) => examples[i]!);
  };
  const dataHash = createHash('sha256').update(await fs.readFile(o.data)).digest('hex');
  const planHash = createHash('sha256')
    .update(canonicalJson({ base: manifest.fingerprint, dataHash, config, targets, lr, optimizer, weightDecay, batchSize, gradAccum, seqLen, maxGradNorm, seed, warmup, schedule, totalSteps }))
    .digest('hex');

  // --- optimizer state, resume ---
  const opt = new Map<string, TensorState>();
  if (optimizer === 'adamw') {
    for (const [key, p] of params) {
      opt.set(`${key}.a`, { m: new Float32Array(p.a.length), v: new Float32Array(p.a.length) });
      opt.set(`${key}.b`, { m: new Float32Array(p.b.length), v: new Float32Array(p.b.length) });
    }
  }
  const ckDir = checkpointDir(out);
  let startStep = 0;
  let log: LogEntry[] = [];
  let tokens = 0;
  if (o.resume && (await hasCheckpoint(ckDir))) {
    const st = await loadCheckpoint(ckDir, params, opt);
    if (st.planHash !== planHash) {
      throw new EdgeloraError('the checkpoint was written for another plan (data, model or options differ)', { where: ckDir, hint: 'resume with the same flags, or remove the checkpoint directory to start over' });
    }
    startStep = st.step;
    log = st.log;
    tokens = st.tokens;
  } else if (o.resume === true) {
    throw new EdgeloraError(`--resume: there is no checkpoint at ${ckDir}`, { where: ckDir, hint: 'run without --resume to start from step 0 (or with --resume-or-start), or check --out' });
  }

  // --- train ---
  const session = await TrainSession.create(o.model, manifest, cfg, targets, {
    dropout: dropoutP > 0,
    recompute: o.recompute ?? false,
    bnb4Backward: o.bnb4Backward ?? 'dequantize',
    // Every micro-batch (training and eval) is at most batchSize rows of at most seqLen tokens.
    maxTokens: batchSize * seqLen,
    padTokenId: tok.padTokenId,
    ...(o.sessionOptions ? { sessionOptions: o.sessionOptions } : {}),
  });
  const dropoutMasks = (m: number) => {
    const r = new Rng(subSeed('dropout', seed, m));
    return { scale: 1 / (1 - dropoutP), bits: (_key: string, B: number, T: number, K: number) => dropoutBits(() => r.next(), dropoutP, B, T, K) };
  };
  const trainStart = performance.now();
  let lastSave = trainStart;
  let trainTokens = 0;
  let interrupted = false;
  let trainSeconds = 0;
  let evalLoss: number | null = null;
  try {
    for (let step = startStep; step < totalSteps; step++) {
      const ts = performance.now();
      const micro: MicroBatch[] = [];
      for (let k = 0; k < gradAccum; k++) {
        const rows = microBatch(step * gradAccum + k);
        micro.push({ inputIds: rows.map((e) => e.inputIds), labels: rows.map((e) => e.labels) });
      }
      const count = micro.reduce((s, mb) => s + countLabelTokens(mb.labels), 0);
      let loss = 0;
      let grads: Map<string, LoraGrad> | null = null;
      let stepTokens = 0;
      for (let k = 0; k < gradAccum; k++) {
        const mb = micro[k]!;
        const r = await session.step(mb, params, 1 / Math.max(1, count), dropoutP > 0 ? dropoutMasks(step * gradAccum + k) : undefined);
        loss += r.loss;
        stepTokens += mb.inputIds.reduce((s, row) => s + row.length, 0);
        if (!grads) grads = r.grads;
        else for (const [key, g] of r.grads) addInto(grads.get(key)!, g);
      }
      const flat = [...grads!.values()].flatMap((g) => [g.a, g.b]);
      const norm = clipByGlobalNorm(flat, maxGradNorm);
      const lrNow = learningRate(schedule, lr, step, totalSteps, warmup);
      for (const [key, p] of params) {
        const g = grads!.get(key)!;
        const cfgOpt = { kind: optimizer, lr, weightDecay };
        optimizerUpdate(cfgOpt, p.a, g.a, opt.get(`${key}.a`) ?? null, lrNow, step + 1);
        optimizerUpdate(cfgOpt, p.b, g.b, opt.get(`${key}.b`) ?? null, lrNow, step + 1);
      }
      if (!Number.isFinite(loss)) throw new EdgeloraError(`loss is ${loss} at step ${step + 1}`, { where: '--lr', hint: 'training diverged: lower --lr or keep --max-grad-norm on' });
      tokens += stepTokens;
      trainTokens += stepTokens;
      const entry: LogEntry = { step: step + 1, loss, lr: lrNow, grad_norm: norm, tokens: stepTokens, seconds: (performance.now() - ts) / 1000 };
      log.push(entry);
      o.onStep?.(entry, totalSteps);
      const aborted = o.signal?.aborted === true && step + 1 < totalSteps;
      const timeDue = saveEverySeconds > 0 && performance.now() - lastSave >= saveEverySeconds * 1000;
      if ((aborted || timeDue || (saveEvery > 0 && (step + 1) % saveEvery === 0)) && step + 1 < totalSteps) {
        lastSave = performance.now();
        const st: CheckpointState = {
          format: CHECKPOINT_FORMAT,
          step: step + 1,
          totalSteps,
          planHash,
          dataOrder: { seed, rows: n, batchSize, batchesPerEpoch },
          rng: { kind: 'derived-per-micro-batch', seed, nextMicroBatch: (step + 1) * gradAccum },
          tokens,
          log,
          modules: [...params.keys()],
        };
        await saveCheckpoint(ckDir, st, params, opt);
      }
      if (aborted || (o.stopAfterStep !== undefined && step + 1 >= o.stopAfterStep && step + 1 < totalSteps)) {
        interrupted = true;
        break;
      }
    }
    trainSeconds = (performance.now() - trainStart) / 1000;
    if (!interrupted && evalExamples && evalExamples.length > 0) {
      evalLoss = await evaluateLoss(session, params, evalExamples, batchSize, dropoutP > 0);
    }
  } finally {
    await session.release();
  }

  // --- output ---
  if (!interrupted) {
    const modules: LoraModule[] = [...params.values()].map((p) => ({ layer: p.layer, proj: p.proj, r: p.r, alpha: p.alpha, scale: p.scale, a: p.a, b: p.b }));
    await writeDirAtomic(out, async (tmp) => {
      const inner = path.join(tmp, 'adapter');
      await saveAdapter(inner, { config, modules, baseFingerprint: manifest.fingerprint }, { dtype: o.dtype ?? 'F32' });
      for (const f of await fs.readdir(inner)) await fs.rename(path.join(inner, f), path.join(tmp, f));
      await fs.rmdir(inner);
      await writeFileAtomic(path.join(tmp, TRAINING_LOG), log.map((e) => JSON.stringify(e)).join('\n') + '\n');
    });
    await fs.rm(ckDir, { recursive: true, force: true });
  }
  const losses = log.map((e) => e.loss);
  return {
    out,
    interrupted,
    steps: log.length,
    resumedFrom: startStep,
    finalLoss: losses[losses.length - 1] ?? NaN,
    losses,
    log,
    tokens,
    tokensPerSecond: trainSeconds > 0 ? trainTokens / trainSeconds : 0,
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    evalLoss,
    memory,
    parameters,
    seconds: (performance.now() - t0) / 1000,
  };
}

function addInto(acc: LoraGrad, g: LoraGrad): void {
  for (let i = 0; i < acc.a.length; i++) acc.a[i] = acc.a[i]! + g.a[i]!;
  for (let i = 0; i < acc.b.length; i++) acc.b[i] = acc.b[i]! + g.b[i]!;
}

/** Mean token NLL of `examples` under the current parameters (no dropout). */
export async function evaluateLoss(session: TrainSession, params: ReadonlyMap<string, LoraParam>, examples: readonly Example[], batchSize: number, dropout: boolean): Promise<number> {
  const count = countLabelTokens(examples.map((e) => e.labels));
  let loss = 0;
  for (let i = 0; i < examples.length; i += batchSize) {
    const rows = examples.slice(i, i + batchSize);
    const r = await session.step({ inputIds: rows.map((e) => e.inputIds), labels: rows.map((e) => e.labels) }, params, 1 / Math.max(1, count), dropout ? NO_DROPOUT : undefined);
    loss += r.loss;
  }
  return loss;
}
