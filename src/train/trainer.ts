// `finetune()`: QLoRA-style training of a LoRA adapter on a frozen quantized base. Loads the JSONL
// data (the same formats as `edgelora eval`), initializes (PEFT init) or continues an adapter, checks
// the memory plan, then runs optimizer steps of G micro-batches × B rows through one ORT training
// session, with host-side AdamW/SGD, warmup + decay, clipping, dropout masks and atomic checkpoints.
// The output is a PEFT adapter directory bound to the base fingerprint, plus training_log.jsonl.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { readManifest, MODEL_FILE, DATA_FILE, type Manifest } from '../model/manifest.js';
import { parseHfConfig, type ModelConfig } from '../formats/hf-config.js';
import { loadTokenizer } from '../formats/tokenizer.js';
import { loadJsonl, type Example } from '../data/jsonl.js';
import { LINEAR_PROJS, linearShape, siteKey } from '../model/llama.js';
import { baseOf, bindingFor, loadAdapter, makePeftConfig, saveAdapter, loraScale, ADAPTER_CONFIG, type LoraModule, type PeftConfig } from '../adapters/peft.js';
import { canonicalJson } from '../util/canonical-json.js';
import { checkMemoryPlan } from '../profiles/memory.js';
import { EdgeloraError } from '../util/errors.js';
import { Rng } from '../util/rng.js';
import { writeDirAtomic, writeFileAtomic } from '../util/atomic.js';
import { TrainSession, countLabelTokens, dropoutBits, NO_DROPOUT, type DropoutMasks, type LoraParam, type LoraGrad, type MicroBatch } from './session.js';
import { LOSS_CHUNK, type LoraTarget } from './graph.js';
import { optimizerUpdate, learningRate, clipByGlobalNorm, initLora, type TensorState } from './optim.js';
import { parseFinetuneOptions, checkFinetuneNumber, FINETUNE_NUMBERS, type FinetuneOptions, type FinetunePlan } from './plan.js';
import { describeRange, inRange } from '../util/number-check.js';
import { estimateTrainingMemory, type TrainMemoryEstimate } from './memory.js';
import { checkpointDir, hasCheckpoint, loadCheckpoint, saveCheckpoint, CHECKPOINT_FORMAT, type CheckpointState, type LogEntry } from './checkpoint.js';

export type { FinetuneOptions } from './plan.js';

export const TRAINING_LOG = 'training_log.jsonl';

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

/** Deterministic 32-bit seed from parts (for per-epoch / per-micro-batch generators). */
function subSeed(...parts: (string | number)[]): number {
  return createHash('sha256').update(parts.join('|')).digest().readUInt32LE(0);
}

/**
 * Trains and writes the adapter: the options are validated once into a plan (src/train/plan.ts), then each
 * phase below consumes it: base, data, adapter, memory plan, step plan, optimizer state and resume, the
 * steps, output.
 */
export async function finetune(o: FinetuneOptions): Promise<FinetuneResult> {
  const t0 = performance.now();
  const plan = parseFinetuneOptions(o);
  if (await fs.stat(plan.out).then(() => true, () => false)) {
    throw new EdgeloraError(`${plan.out} already exists`, { where: '--out', hint: 'choose a new --out directory (or remove the old adapter)' });
  }
  const base = await loadBase(plan);
  const data = await loadData(plan, base);
  const adapter = await startAdapter(plan, base);
  const memory = await memoryPlan(plan, base, data.examples, adapter);
  const steps = stepPlan(plan, data.examples);
  const planHash = await hashPlan(plan, base, adapter, steps);
  const state = await resumeState(plan, adapter.params, planHash);
  const run = await trainSteps(plan, base, data, adapter, steps, planHash, state);
  if (!run.interrupted) await writeOutput(plan, base, adapter, state.log);
  const losses = state.log.map((e) => e.loss);
  return {
    out: plan.out,
    interrupted: run.interrupted,
    steps: state.log.length,
    resumedFrom: state.startStep,
    finalLoss: losses[losses.length - 1] ?? NaN,
    losses,
    log: state.log,
    tokens: state.tokens,
    tokensPerSecond: run.trainSeconds > 0 ? run.trainTokens / run.trainSeconds : 0,
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    evalLoss: run.evalLoss,
    memory,
    parameters: adapter.parameters,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** The frozen base: its manifest and config, and the sequence length (checked against its context). */
interface Base {
  readonly manifest: Manifest;
  readonly cfg: ModelConfig;
  readonly seqLen: number;
}

async function loadBase(plan: FinetunePlan): Promise<Base> {
  const manifest = await readManifest(plan.model);
  const cfg = parseHfConfig(manifest.sourceConfig, path.join(plan.model, 'manifest.json'));
  const seqLen = plan.seqLen ?? checkFinetuneNumber('seqLen', Math.min(512, cfg.maxPositionEmbeddings));
  if (seqLen > cfg.maxPositionEmbeddings) throw new EdgeloraError(`--seq-len ${seqLen} exceeds the model's context (${cfg.maxPositionEmbeddings})`, { where: '--seq-len' });
  return { manifest, cfg, seqLen };
}

interface Data {
  readonly examples: Example[];
  readonly evalExamples: Example[] | null;
  /** The tokenizer's pad id (the session pads ragged micro-batches with it). */
  readonly padTokenId: number;
}

/**
 * Tokenizes the data. The tokenizer is loaded here and not kept: the steps need only its pad id, and a 151,936-token
 * vocabulary's tokenizer holds ~70 MB of JS heap (Qwen2.5), which V8 can give back once nothing references it.
 */
async function loadData(plan: FinetunePlan, base: Base): Promise<Data> {
  const tok = await loadTokenizer(plan.model);
  const opts = { seqLen: base.seqLen, onWarning: plan.warn };
  const examples = await loadJsonl(plan.data, tok, opts);
  if (examples.length === 0) throw new EdgeloraError('no row of the data set has tokens to learn from', { where: plan.data, hint: 'check the warnings above' });
  const evalExamples = plan.evalData ? await loadJsonl(plan.evalData, tok, opts) : null;
  return { examples, evalExamples, padTokenId: tok.padTokenId };
}

/** The adapter being trained: its PEFT config, its parameters by site, the graph's targets. */
interface Adapter {
  readonly config: PeftConfig;
  readonly params: Map<string, LoraParam>;
  readonly targets: LoraTarget[];
  /** The LoRA dropout probability (config.lora_dropout); 0: no masks. */
  readonly dropoutP: number;
  readonly parameters: number;
}

/** A new adapter (PEFT init) or a continued one (its rank, alpha and targets kept). */
async function startAdapter(plan: FinetunePlan, base: Base): Promise<Adapter> {
  const { cfg, manifest } = base;
  const params = new Map<string, LoraParam>();
  let config: PeftConfig;
  if (plan.lora.kind === 'continue') {
    const ad = await loadAdapter(plan.lora.dir, { cfg, ...baseOf(manifest) });
    if (ad.baseNote) plan.warn(`${plan.lora.dir}: ${ad.baseNote}`);
    for (const flag of plan.lora.ignored) plan.warn(`--${flag} is ignored with --init-adapter: the adapter's own ${flag} is kept`);
    if (ad.baseFingerprint === null) plan.warn(`${plan.lora.dir}: adapter is not bound to a base fingerprint; assuming it fits this base`);
    config = { ...ad.config, inference_mode: true };
    if (plan.loraDropout !== undefined) config = { ...config, lora_dropout: plan.loraDropout };
    // PEFT's schema takes lora_dropout up to 1; training takes the flag's range (p = 1 drops every LoRA input: nothing learns).
    const drop = FINETUNE_NUMBERS.loraDropout;
    if (!inRange(config.lora_dropout, drop.check)) {
      throw new EdgeloraError(`lora_dropout ${config.lora_dropout} of the adapter to continue: must be ${describeRange(drop.check)}`, { where: path.join(plan.lora.dir, ADAPTER_CONFIG), hint: `give --${drop.flag} to override it` });
    }
    for (const m of ad.modules.values()) {
      const { N, K } = linearShape(cfg, m.proj);
      params.set(siteKey(m), { layer: m.layer, proj: m.proj, r: m.r, K, N, alpha: m.alpha, scale: m.scale, a: Float32Array.from(m.a), b: Float32Array.from(m.b) });
    }
  } else {
    const { rank, alpha, targets: projs } = plan.lora;
    config = makePeftConfig({ r: rank, alpha, targets: [...projs], dropout: plan.loraDropout ?? 0.05, baseModel: path.basename(path.resolve(plan.model)) });
    const rng = new Rng(plan.seed);
    for (let layer = 0; layer < cfg.numLayers; layer++) {
      for (const proj of LINEAR_PROJS.filter((p) => projs.includes(p))) {
        const { N, K } = linearShape(cfg, proj);
        const { a, b } = initLora(rng, rank, K, N);
        params.set(siteKey({ layer, proj }), { layer, proj, r: rank, K, N, alpha, scale: loraScale(alpha, rank, false), a, b });
      }
    }
  }
  const targets: LoraTarget[] = [...params.values()].map((p) => ({ layer: p.layer, proj: p.proj, rank: p.r, K: p.K, N: p.N }));
  let parameters = 0;
  for (const p of params.values()) parameters += p.a.length + p.b.length;
  return { config, params, targets, dropoutP: config.lora_dropout, parameters };
}

/** The itemized estimate of the job's peak, refused (checkMemoryPlan) when over the plan's budget. */
async function memoryPlan(plan: FinetunePlan, base: Base, examples: readonly Example[], adapter: Adapter): Promise<TrainMemoryEstimate> {
  const { cfg, manifest } = base;
  const sizeOf = (f: string) => fs.stat(path.join(plan.model, f)).then((s) => s.size, () => 0);
  const baseBytes = (await sizeOf(MODEL_FILE)) + (await sizeOf(DATA_FILE));
  let dequantBytes = 0;
  if (manifest.quant.format !== 'fp32') for (const p of LINEAR_PROJS) { const { N, K } = linearShape(cfg, p); dequantBytes = Math.max(dequantBytes, 12 * N * K); }
  const longest = Math.max(...examples.map((e) => e.inputIds.length));
  const memory = estimateTrainingMemory({ cfg, baseBytes, dequantBytes, batch: Math.min(plan.batchSize, examples.length), seqLen: Math.min(base.seqLen, longest), targets: adapter.targets, dropout: adapter.dropoutP > 0, optimizer: plan.optimizer, recompute: plan.recompute, lossChunkRows: LOSS_CHUNK });
  if (plan.budget) checkMemoryPlan(memory, plan.budget.bytes, plan.budget.source);
  return memory;
}

/** The data order and the number of steps: micro-batch m is a slice of its epoch's seeded permutation. */
interface StepPlan {
  readonly totalSteps: number;
  readonly rows: number;
  readonly batchesPerEpoch: number;
  microBatch(m: number): Example[];
}

function stepPlan(plan: FinetunePlan, examples: readonly Example[]): StepPlan {
  const { batchSize, gradAccum, seed } = plan;
  const n = examples.length;
  const batchesPerEpoch = Math.ceil(n / batchSize);
  const totalSteps = 'steps' in plan.length ? plan.length.steps : Math.max(1, Math.ceil((plan.length.epochs * batchesPerEpoch) / gradAccum));
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
  return { totalSteps, rows: n, batchesPerEpoch, microBatch };
}

/** What a checkpoint must have been written for: base, data, adapter config and every training option. */
async function hashPlan(plan: FinetunePlan, base: Base, adapter: Adapter, steps: StepPlan): Promise<string> {
  const { lr, optimizer, weightDecay, batchSize, gradAccum, maxGradNorm, seed, warmup, schedule } = plan;
  const dataHash = createHash('sha256').update(await fs.readFile(plan.data)).digest('hex');
  return createHash('sha256')
    .update(canonicalJson({ base: base.manifest.fingerprint, dataHash, config: adapter.config, targets: adapter.targets, lr, optimizer, weightDecay, batchSize, gradAccum, seqLen: base.seqLen, maxGradNorm, seed, warmup, schedule, totalSteps: steps.totalSteps }))
    .digest('hex');
}

/** Optimizer state, and where training starts: step 0, or the checkpoint's step (params and state loaded). */
interface TrainState {
  readonly opt: Map<string, TensorState>;
  readonly ckDir: string;
  readonly startStep: number;
  /** Appended to as steps run. */
  readonly log: LogEntry[];
  tokens: number;
}

async function resumeState(plan: FinetunePlan, params: Map<string, LoraParam>, planHash: string): Promise<TrainState> {
  const opt = new Map<string, TensorState>();
  if (plan.optimizer === 'adamw') {
    for (const [key, p] of params) {
      opt.set(`${key}.a`, { m: new Float32Array(p.a.length), v: new Float32Array(p.a.length) });
      opt.set(`${key}.b`, { m: new Float32Array(p.b.length), v: new Float32Array(p.b.length) });
    }
  }
  const ckDir = checkpointDir(plan.out);
  if (plan.resume && (await hasCheckpoint(ckDir))) {
    const st = await loadCheckpoint(ckDir, params, opt);
    if (st.planHash !== planHash) {
      throw new EdgeloraError('the checkpoint was written for another plan (data, model or options differ)', { where: ckDir, hint: 'resume with the same flags, or remove the checkpoint directory to start over' });
    }
    return { opt, ckDir, startStep: st.step, log: st.log, tokens: st.tokens };
  }
  if (plan.resume === true) {
    throw new EdgeloraError(`--resume: there is no checkpoint at ${ckDir}`, { where: ckDir, hint: 'run without --resume to start from step 0 (or with --resume-or-start), or check --out' });
  }
  return { opt, ckDir, startStep: 0, log: [], tokens: 0 };
}

interface RunResult {
  readonly interrupted: boolean;
  readonly trainTokens: number;
  readonly trainSeconds: number;
  readonly evalLoss: number | null;
}

/** The optimizer steps from state.startStep, with checkpoints and the abort / stopAfterStep stops, then eval. */
async function trainSteps(plan: FinetunePlan, base: Base, data: Data, adapter: Adapter, steps: StepPlan, planHash: string, state: TrainState): Promise<RunResult> {
  const { batchSize, seed, saveEvery, saveEverySeconds } = plan;
  const { params, dropoutP } = adapter;
  const { totalSteps } = steps;
  const { opt, log } = state;
  const session = await TrainSession.create(plan.model, base.manifest, base.cfg, adapter.targets, {
    dropout: dropoutP > 0,
    recompute: plan.recompute,
    bnb4Backward: plan.bnb4Backward,
    // Every micro-batch (training and eval) is at most batchSize rows of at most seqLen tokens.
    maxTokens: batchSize * base.seqLen,
    padTokenId: data.padTokenId,
    ...(plan.sessionOptions ? { sessionOptions: plan.sessionOptions } : {}),
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
    for (let step = state.startStep; step < totalSteps; step++) {
      const ts = performance.now();
      const { loss, norm, lrNow, stepTokens } = await optimizerStep(plan, session, adapter, steps, opt, step, dropoutMasks);
      state.tokens += stepTokens;
      trainTokens += stepTokens;
      const entry: LogEntry = { step: step + 1, loss, lr: lrNow, grad_norm: norm, tokens: stepTokens, seconds: (performance.now() - ts) / 1000 };
      log.push(entry);
      plan.onStep?.(entry, totalSteps);
      const aborted = plan.signal?.aborted === true && step + 1 < totalSteps;
      const timeDue = saveEverySeconds > 0 && performance.now() - lastSave >= saveEverySeconds * 1000;
      if ((aborted || timeDue || (saveEvery > 0 && (step + 1) % saveEvery === 0)) && step + 1 < totalSteps) {
        lastSave = performance.now();
        await writeCheckpoint(plan, steps, planHash, state, params, step + 1);
      }
      if (aborted || (plan.stopAfterStep !== undefined && step + 1 >= plan.stopAfterStep && step + 1 < totalSteps)) {
        interrupted = true;
        break;
      }
    }
    trainSeconds = (performance.now() - trainStart) / 1000;
    if (!interrupted && data.evalExamples && data.evalExamples.length > 0) {
      evalLoss = await evaluateLoss(session, params, data.evalExamples, batchSize, dropoutP > 0);
    }
  } finally {
    await session.release();
  }
  return { interrupted, trainTokens, trainSeconds, evalLoss };
}

/** Optimizer step `step`: its G micro-batches forward + backward, gradients summed, clipped and applied. */
async function optimizerStep(
  plan: FinetunePlan,
  session: TrainSession,
  adapter: Adapter,
  steps: StepPlan,
  opt: ReadonlyMap<string, TensorState>,
  step: number,
  dropoutMasks: (m: number) => DropoutMasks,
): Promise<{ loss: number; norm: number; lrNow: number; stepTokens: number }> {
  const { gradAccum, optimizer, lr, weightDecay } = plan;
  const { params, dropoutP } = adapter;
  const micro: MicroBatch[] = [];
  for (let k = 0; k < gradAccum; k++) {
    const rows = steps.microBatch(step * gradAccum + k);
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
  const norm = clipByGlobalNorm(flat, plan.maxGradNorm);
  const lrNow = learningRate(plan.schedule, lr, step, steps.totalSteps, plan.warmup);
  for (const [key, p] of params) {
    const g = grads!.get(key)!;
    const cfgOpt = { kind: optimizer, lr, weightDecay };
    optimizerUpdate(cfgOpt, p.a, g.a, opt.get(`${key}.a`) ?? null, lrNow, step + 1);
    optimizerUpdate(cfgOpt, p.b, g.b, opt.get(`${key}.b`) ?? null, lrNow, step + 1);
  }
  if (!Number.isFinite(loss)) throw new EdgeloraError(`loss is ${loss} at step ${step + 1}`, { where: '--lr', hint: 'training diverged: lower --lr or keep --max-grad-norm on' });
  return { loss, norm, lrNow, stepTokens };
}

/** The checkpoint after `done` steps: parameters, optimizer state, log, and where the data order stands. */
async function writeCheckpoint(plan: FinetunePlan, steps: StepPlan, planHash: string, state: TrainState, params: ReadonlyMap<string, LoraParam>, done: number): Promise<void> {
  const { seed, batchSize, gradAccum } = plan;
  const st: CheckpointState = {
    format: CHECKPOINT_FORMAT,
    step: done,
    totalSteps: steps.totalSteps,
    planHash,
    dataOrder: { seed, rows: steps.rows, batchSize, batchesPerEpoch: steps.batchesPerEpoch },
    rng: { kind: 'derived-per-micro-batch', seed, nextMicroBatch: done * gradAccum },
    tokens: state.tokens,
    log: state.log,
    modules: [...params.keys()],
  };
  await saveCheckpoint(state.ckDir, st, params, state.opt);
}

/** The PEFT adapter directory (+ training_log.jsonl), written atomically; the checkpoint is then removed. */
async function writeOutput(plan: FinetunePlan, base: Base, adapter: Adapter, log: readonly LogEntry[]): Promise<void> {
  const modules: LoraModule[] = [...adapter.params.values()].map((p) => ({ layer: p.layer, proj: p.proj, r: p.r, alpha: p.alpha, scale: p.scale, a: p.a, b: p.b }));
  await writeDirAtomic(plan.out, async (tmp) => {
    const inner = path.join(tmp, 'adapter');
    await saveAdapter(inner, { config: adapter.config, modules, ...bindingFor(base.manifest) }, { dtype: plan.dtype });
    for (const f of await fs.readdir(inner)) await fs.rename(path.join(inner, f), path.join(tmp, f));
    await fs.rmdir(inner);
    await writeFileAtomic(path.join(tmp, TRAINING_LOG), log.map((e) => JSON.stringify(e)).join('\n') + '\n');
  });
  await fs.rm(checkpointDir(plan.out), { recursive: true, force: true });
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
