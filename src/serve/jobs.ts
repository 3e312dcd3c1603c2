// Fine-tuning jobs inside `edgelora serve`, in the shape of OpenAI's fine-tuning API: uploaded
// training files (validated row by row at upload), jobs that run `finetune()` in this process one
// at a time, their events (step, loss, tokens/s, eta), cancel, and the result installed into the
// ServeEngine as "<base>:<suffix or job id>" (optionally uploaded to the hub by the fleet agent).
// Everything persists under <state>/files and <state>/jobs/<id>/ (job.json written atomically, the
// trainer's own atomic checkpoints): after a SIGKILL, a restart resumes the unfinished job from its
// checkpoint and, the trainer being deterministic for one plan, ends with the same adapter.
// Serving continues during a job (decode and training steps interleave on the same ORT thread
// pools, so both slow down) rather than queueing: an app keeps answering while it personalizes.
import { promises as fs, existsSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { writeFileAtomic } from '../util/atomic.js';
import { EdgeloraError } from '../util/errors.js';
import { parseJsonl } from '../data/jsonl.js';
import { finetune } from '../train/trainer.js';
import { checkpointDir } from '../train/checkpoint.js';
import { estimateTrainingMemory } from '../train/memory.js';
import { loraTargets } from '../train/graph.js';
import { LINEAR_PROJS, linearShape, type Proj } from '../model/llama.js';
import { formatBytes } from '../profiles/memory.js';
import type ort from 'onnxruntime-node';
import type { ModelConfig } from '../formats/hf-config.js';
import { ServeError, type ServeEngine } from './engine.js';

const FILE_ID = /^file-[0-9a-f]{24}$/;
const JOB_ID = /^ftjob-[0-9a-f]{24}$/;
const newId = (prefix: string) => `${prefix}-${randomBytes(12).toString('hex')}`;
const nowS = () => Math.floor(Date.now() / 1000);

export const JobStatus = z.enum(['validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled']);
export type JobStatus = z.infer<typeof JobStatus>;

const auto = <T extends z.ZodType>(t: T) => z.union([z.literal('auto'), t]).optional();
/** What a job may set (OpenAI's n_epochs, batch_size, learning_rate; the rest edgelora's); "auto" = default. */
export const Hyperparameters = z.strictObject({
  n_epochs: auto(z.number().positive().max(1000)),
  steps: auto(z.number().int().min(1).max(100_000)),
  learning_rate: auto(z.number().positive().max(1)),
  /** OpenAI's name for it; the same as learning_rate when given alone. */
  learning_rate_multiplier: auto(z.number().positive().max(1)),
  batch_size: auto(z.number().int().min(1).max(256)),
  rank: auto(z.number().int().min(1).max(256)),
  alpha: auto(z.number().positive().max(4096)),
  targets: z.union([z.literal('all-linear'), z.array(z.enum(LINEAR_PROJS)).min(1)]).optional(),
  seq_len: auto(z.number().int().min(2).max(1 << 20)),
  lora_dropout: auto(z.number().min(0).lt(1)),
  seed: z.number().int().min(0).max(2 ** 31).optional(),
  /** Learning-rate decay after warmup (default linear). */
  schedule: z.enum(['cosine', 'linear', 'constant']).optional(),
  /** Checkpoint every N steps (default: every 10 steps and every 60 s). */
  checkpoint_steps: z.number().int().min(1).optional(),
});
export type Hyperparameters = z.infer<typeof Hyperparameters>;

export const CreateJobBody = z.strictObject({
  model: z.string().optional(),
  training_file: z.string(),
  validation_file: z.string().nullish(),
  suffix: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'suffix: 1–64 of A–Z a–z 0–9 _ . -').nullish(),
  hyperparameters: Hyperparameters.optional(),
  /** Upload the trained adapter to the hub (needs --broker). */
  upload: z.boolean().optional(),
  seed: z.number().int().min(0).max(2 ** 31).nullish(),
  method: z.unknown().optional(),
  integrations: z.unknown().optional(),
  metadata: z.record(z.string(), z.string()).nullish(),
});
export type CreateJobBody = z.infer<typeof CreateJobBody>;

/** The settings a job trains with, all resolved (what job.json stores and the job object shows). */
const Resolved = z.strictObject({
  n_epochs: z.number().nullable(),
  steps: z.number().int().nullable(),
  learning_rate: z.number(),
  batch_size: z.number().int(),
  rank: z.number().int(),
  alpha: z.number(),
  targets: z.array(z.enum(LINEAR_PROJS)),
  seq_len: z.number().int(),
  lora_dropout: z.number(),
  seed: z.number().int(),
  schedule: z.enum(['cosine', 'linear', 'constant']),
  checkpoint_steps: z.number().int(),
});
export type Resolved = z.infer<typeof Resolved>;

const FileRecord = z.strictObject({
  id: z.string().regex(FILE_ID),
  object: z.literal('file'),
  bytes: z.number().int(),
  created_at: z.number().int(),
  filename: z.string(),
  purpose: z.literal('fine-tune'),
  status: z.literal('processed'),
  rows: z.number().int(),
});
export type FileRecord = z.infer<typeof FileRecord>;

const JobRecord = z.strictObject({
  id: z.string().regex(JOB_ID),
  object: z.literal('fine_tuning.job'),
  model: z.string(),
  created_at: z.number().int(),
  finished_at: z.number().int().nullable(),
  status: JobStatus,
  training_file: z.string(),
  validation_file: z.string().nullable(),
  suffix: z.string().nullable(),
  fine_tuned_model: z.string().nullable(),
  hyperparameters: Resolved,
  upload: z.boolean(),
  uploaded_sha256: z.string().nullable(),
  trained_tokens: z.number().int().nullable(),
  estimated_peak_bytes: z.number().int(),
  error: z.object({ code: z.string(), message: z.string(), param: z.string().nullable() }).nullable(),
  result_files: z.array(z.string()),
  seed: z.number().int(),
});
export type JobRecord = z.infer<typeof JobRecord>;

export interface JobEvent {
  object: 'fine_tuning.job.event';
  id: string;
  created_at: number;
  level: 'info' | 'warn' | 'error';
  message: string;
  type: 'message' | 'metrics';
  data: Record<string, number | string | null> | null;
}

export interface JobsOptions {
  /** <state>: files/ and jobs/ are created under it. */
  readonly stateDir: string;
  readonly modelDir: string;
  /**
   * The profile's memory budget, bytes, and what serving keeps while a job runs, bytes: its plan
   * without the base's weights (the serving session is released during a job; the job's holds them).
   */
  readonly budgetBytes: number;
  readonly servingBytes: number;
  readonly profileId: string;
  readonly sessionOptions?: ort.InferenceSession.SessionOptions;
  /** Uploads a trained adapter directory to the hub under a name; null without the fleet agent. */
  readonly upload?: ((dir: string, name: string) => Promise<string>) | null;
  readonly log?: (line: string) => void;
}

/** The estimate of what a job adds to this process, as the trainer computes it (trainer.ts "memory plan"). */
export function estimateJobMemory(cfg: ModelConfig, quantFormat: string, modelBytes: number, hp: Resolved, longestRow: number, rows: number) {
  let dequantBytes = 0;
  if (quantFormat !== 'fp32') for (const p of LINEAR_PROJS) { const { N, K } = linearShape(cfg, p); dequantBytes = Math.max(dequantBytes, 12 * N * K); }
  return estimateTrainingMemory({
    cfg,
    baseBytes: modelBytes,
    dequantBytes,
    batch: Math.min(hp.batch_size, rows),
    seqLen: Math.min(hp.seq_len, longestRow),
    targets: loraTargets(cfg, hp.targets, () => hp.rank),
    dropout: hp.lora_dropout > 0,
    optimizer: 'adamw',
    recompute: false,
  });
}

/** The settings a job trains with: each hyperparameter given, else edgelora's default; errors are 400s naming the field. */
export function resolveHyperparameters(body: CreateJobBody, cfg: ModelConfig): Resolved {
  const hp = body.hyperparameters ?? {};
  const v = <T>(x: T | 'auto' | undefined): T | undefined => (x === 'auto' ? undefined : x);
  const steps = v(hp.steps) ?? null;
  const nEpochs = v(hp.n_epochs) ?? null;
  if (steps !== null && nEpochs !== null) throw new ServeError('give hyperparameters.steps or hyperparameters.n_epochs, not both', 400, 'invalid_hyperparameters', 'hyperparameters.steps');
  const targets: Proj[] = hp.targets === undefined ? ['q_proj', 'v_proj'] : hp.targets === 'all-linear' ? [...LINEAR_PROJS] : [...new Set(hp.targets)];
  const seqLen = v(hp.seq_len) ?? Math.min(256, cfg.maxPositionEmbeddings);
  if (seqLen > cfg.maxPositionEmbeddings) {
    throw new ServeError(`hyperparameters.seq_len ${seqLen} exceeds the model's context (${cfg.maxPositionEmbeddings})`, 400, 'invalid_hyperparameters', 'hyperparameters.seq_len');
  }
  const rank = v(hp.rank) ?? 8;
  return {
    n_epochs: steps === null ? (nEpochs ?? 1) : null,
    steps,
    learning_rate: v(hp.learning_rate) ?? v(hp.learning_rate_multiplier) ?? 2e-4,
    batch_size: v(hp.batch_size) ?? 1,
    rank,
    alpha: v(hp.alpha) ?? 2 * rank,
    targets,
    seq_len: seqLen,
    lora_dropout: v(hp.lora_dropout) ?? 0.05,
    seed: hp.seed ?? body.seed ?? 0,
    schedule: hp.schedule ?? 'linear',
    checkpoint_steps: hp.checkpoint_steps ?? 10,
  };
}

export class FineTuningJobs {
  private readonly jobs = new Map<string, JobRecord>();
  private readonly files = new Map<string, FileRecord>();
  private readonly aborts = new Map<string, AbortController>();
  private readonly queue: string[] = [];
  private running: Promise<void> | null = null;
  private stopped = false;

  private constructor(private readonly engine: ServeEngine, private readonly o: JobsOptions) {}

  private p(...parts: string[]): string {
    return path.join(this.o.stateDir, ...parts);
  }

  /** Loads files and jobs from the state directory; re-installs finished adapters and resumes unfinished jobs. */
  static async open(engine: ServeEngine, o: JobsOptions): Promise<FineTuningJobs> {
    const j = new FineTuningJobs(engine, o);
    await fs.mkdir(j.p('files'), { recursive: true });
    await fs.mkdir(j.p('jobs'), { recursive: true });
    for (const f of await fs.readdir(j.p('files'))) {
      if (!f.endsWith('.json')) continue;
      const r = FileRecord.safeParse(JSON.parse(await fs.readFile(j.p('files', f), 'utf8')));
      if (!r.success) throw new EdgeloraError(`not a file record: ${r.error.issues[0]?.message}`, { where: j.p('files', f), hint: 'remove it, or restore it from a backup' });
      j.files.set(r.data.id, r.data);
    }
    const ids = (await fs.readdir(j.p('jobs'))).filter((d) => JOB_ID.test(d));
    for (const id of ids) {
      const file = j.p('jobs', id, 'job.json');
      if (!existsSync(file)) continue;
      const r = JobRecord.safeParse(JSON.parse(await fs.readFile(file, 'utf8')));
      if (!r.success) throw new EdgeloraError(`not a job record: ${r.error.issues[0]?.message}`, { where: file, hint: 'remove the job directory, or restore it' });
      j.jobs.set(id, r.data);
    }
    const byAge = [...j.jobs.values()].sort((a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id));
    for (const job of byAge) {
      if (job.status === 'succeeded') await j.install(job).catch((err: unknown) => o.log?.(`fine-tuning: cannot re-install ${job.id}: ${(err as Error).message}`));
      else if (job.status === 'running' || job.status === 'queued' || job.status === 'validating_files') {
        await j.event(job.id, 'info', `resuming after a restart (was ${job.status})`);
        await j.save({ ...job, status: 'queued' });
        j.queue.push(job.id);
      }
    }
    j.pump();
    return j;
  }

  // ---- files ----

  /** Validates every row (a bad one is a 400 naming the line) and stores the file. */
  async addFile(filename: string, purpose: string, text: string): Promise<FileRecord> {
    if (purpose !== 'fine-tune') throw new ServeError(`purpose "${purpose}": this server takes files for "fine-tune" only`, 400, 'invalid_purpose', 'purpose');
    const rows = this.validateRows(text, filename);
    const rec: FileRecord = { id: newId('file'), object: 'file', bytes: Buffer.byteLength(text), created_at: nowS(), filename, purpose: 'fine-tune', status: 'processed', rows: rows.length };
    await writeFileAtomic(this.p('files', `${rec.id}.jsonl`), text);
    await writeFileAtomic(this.p('files', `${rec.id}.json`), JSON.stringify(rec, null, 2) + '\n');
    this.files.set(rec.id, rec);
    return rec;
  }

  private validateRows(text: string, filename: string) {
    try {
      const rows = parseJsonl(text, filename, this.engine.model.tokenizer);
      if (rows.length === 0) throw new EdgeloraError('no row has tokens to learn from', { where: filename, hint: 'each row needs text, a completion or an assistant message' });
      return rows;
    } catch (err) {
      if (err instanceof EdgeloraError) throw new ServeError(err.describe(), 400, 'invalid_file', 'file');
      throw err;
    }
  }

  listFiles(): FileRecord[] {
    return [...this.files.values()].sort((a, b) => b.created_at - a.created_at);
  }

  getFile(id: string): FileRecord {
    const f = this.files.get(id);
    if (!f) throw new ServeError(`no file "${id}"`, 404, 'file_not_found', 'file_id', { hint: 'GET /v1/files lists the uploaded files' });
    return f;
  }

  // ---- jobs ----

  /** Checks everything (files, rows, hyperparameters, name, memory budget) and queues the job; an error changes nothing. */
  async create(body: CreateJobBody): Promise<JobRecord> {
    if (body.model !== undefined && body.model !== this.engine.modelId) {
      throw new ServeError(`model "${body.model}": this server fine-tunes its base "${this.engine.modelId}" only`, 400, 'invalid_model', 'model');
    }
    const train = this.getFileParam(body.training_file, 'training_file');
    const valid = body.validation_file ? this.getFileParam(body.validation_file, 'validation_file') : null;
    if (body.upload && !this.o.upload) throw new ServeError('upload: true needs the fleet agent', 400, 'upload_unavailable', 'upload', { hint: 'start serve with --broker … to upload trained adapters to the hub' });
    const hp = resolveHyperparameters(body, this.engine.model.cfg);
    const id = newId('ftjob');
    const name = body.suffix ?? id;
    if (this.engine.adapters.has(name) || [...this.jobs.values()].some((j) => (j.suffix ?? j.id) === name && j.status !== 'failed' && j.status !== 'cancelled')) {
      throw new ServeError(`an adapter or job named "${name}" already exists`, 409, 'suffix_in_use', 'suffix', { hint: 'choose another suffix' });
    }
    const rows = this.validateRows(await fs.readFile(this.p('files', `${train.id}.jsonl`), 'utf8'), train.filename);
    const sizeOf = (f: string) => fs.stat(path.join(this.o.modelDir, f)).then((s) => s.size, () => 0);
    const modelBytes = (await sizeOf('model.onnx')) + (await sizeOf('model.onnx.data'));
    const est = estimateJobMemory(this.engine.model.cfg, this.engine.model.manifest.quant.format, modelBytes, hp, Math.max(...rows.map((r) => r.inputIds.length)), rows.length);
    const total = this.o.servingBytes + est.bytes;
    if (total > this.o.budgetBytes) {
      throw new ServeError(
        `this job needs about ${formatBytes(est.bytes)} on top of the ${formatBytes(this.o.servingBytes)} serving keeps during a job: ${formatBytes(total)}, over profile ${this.o.profileId}'s budget of ${formatBytes(this.o.budgetBytes)}`,
        400, 'insufficient_memory', 'hyperparameters',
        { hint: 'lower hyperparameters.batch_size, seq_len, rank or targets (or start serve with a smaller --max-batch / --ctx)' },
      );
    }
    const job: JobRecord = {
      id, object: 'fine_tuning.job', model: this.engine.modelId, created_at: nowS(), finished_at: null, status: 'queued',
      training_file: train.id, validation_file: valid?.id ?? null, suffix: body.suffix ?? null, fine_tuned_model: null,
      hyperparameters: hp, upload: body.upload ?? false, uploaded_sha256: null, trained_tokens: null,
      estimated_peak_bytes: est.bytes, error: null, result_files: [], seed: hp.seed,
    };
    await fs.mkdir(this.p('jobs', id), { recursive: true });
    await this.save(job);
    await this.event(id, 'info', `validated ${rows.length} rows of ${train.filename}; estimated peak ${formatBytes(est.bytes)} on top of serving (budget ${formatBytes(this.o.budgetBytes)})`);
    this.queue.push(id);
    this.pump();
    return job;
  }

  private getFileParam(id: string, param: string): FileRecord {
    const f = this.files.get(id);
    if (!f) throw new ServeError(`${param}: no file "${id}"`, 400, 'invalid_file', param, { hint: 'upload it first with POST /v1/files (purpose "fine-tune")' });
    return f;
  }

  list(): JobRecord[] {
    return [...this.jobs.values()].sort((a, b) => b.created_at - a.created_at || b.id.localeCompare(a.id));
  }

  get(id: string): JobRecord {
    const j = this.jobs.get(id);
    if (!j) throw new ServeError(`no fine-tuning job "${id}"`, 404, 'job_not_found', 'fine_tuning_job_id');
    return j;
  }

  async events(id: string): Promise<JobEvent[]> {
    this.get(id);
    const text = await fs.readFile(this.p('jobs', id, 'events.jsonl'), 'utf8').catch(() => '');
    const out: JobEvent[] = [];
    // A line cut by a crash is the only one that can fail to parse: it is the last, and skipped.
    for (const line of text.split('\n')) {
      if (!line) continue;
      try {
        out.push(JSON.parse(line) as JobEvent);
      } catch {
        /* torn tail */
      }
    }
    return out.reverse(); // newest first, as OpenAI lists them
  }

  async cancel(id: string): Promise<JobRecord> {
    const job = this.get(id);
    if (job.status === 'succeeded' || job.status === 'failed' || job.status === 'cancelled') {
      throw new ServeError(`job ${id} already ${job.status}`, 409, 'job_finished', 'fine_tuning_job_id');
    }
    const i = this.queue.indexOf(id);
    if (i >= 0) {
      this.queue.splice(i, 1);
      await this.finish(job, { status: 'cancelled' });
      await this.event(id, 'info', 'cancelled before it started');
    } else {
      this.aborts.get(id)?.abort();
      await this.event(id, 'info', 'cancel requested: stopping at the next step boundary');
    }
    return this.get(id);
  }

  /** Stops the running job at its next step boundary with a checkpoint (it resumes on the next start). */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const a of this.aborts.values()) a.abort('shutdown');
    await this.running;
  }

  // ---- running ----

  private pump(): void {
    if (this.running || this.stopped) return;
    const id = this.queue.shift();
    if (!id) return;
    this.running = this.run(id).finally(() => {
      this.running = null;
      this.pump();
    });
  }

  private async run(id: string): Promise<void> {
    let job = this.get(id);
    const hp = job.hyperparameters;
    const dir = this.p('jobs', id);
    const out = path.join(dir, 'adapter');
    const abort = new AbortController();
    this.aborts.set(id, abort);
    job = await this.save({ ...job, status: 'running' });
    const resuming = existsSync(checkpointDir(out));
    await this.event(id, 'info', resuming ? 'running: resuming from the checkpoint' : 'running');
    let startedAt = 0;
    let from = 0;
    try {
      // Killed after the adapter was written but before job.json said so: the adapter is the result.
      const res = existsSync(path.join(out, 'adapter_model.safetensors'))
        ? null
        : await this.whileServingPaused(id, () => finetune({
            model: this.o.modelDir,
            data: this.p('files', `${job.training_file}.jsonl`),
            ...(job.validation_file ? { evalData: this.p('files', `${job.validation_file}.jsonl`) } : {}),
            out,
            ...(hp.steps !== null ? { steps: hp.steps } : { epochs: hp.n_epochs ?? 1 }),
            lr: hp.learning_rate,
            batchSize: hp.batch_size,
            rank: hp.rank,
            alpha: hp.alpha,
            targets: hp.targets,
            seqLen: hp.seq_len,
            loraDropout: hp.lora_dropout,
            seed: hp.seed,
            schedule: hp.schedule,
            saveEvery: hp.checkpoint_steps,
            saveEverySeconds: 60,
            resume: 'if-present',
            signal: abort.signal,
            ...(this.o.sessionOptions ? { sessionOptions: this.o.sessionOptions } : {}),
            onWarning: (m) => void this.event(id, 'warn', m),
            onStep: (e, total) => {
              if (startedAt === 0) {
                startedAt = performance.now() - e.seconds * 1000;
                from = e.step - 1;
              }
              const elapsed = (performance.now() - startedAt) / 1000;
              const eta = (elapsed / (e.step - from)) * (total - e.step);
              void this.event(id, 'info', `step ${e.step}/${total}: loss ${e.loss.toFixed(4)}`, 'metrics', {
                step: e.step, total_steps: total, train_loss: e.loss, learning_rate: e.lr, tokens_per_s: Math.round(e.tokens / Math.max(e.seconds, 1e-9)), eta_s: Number(eta.toFixed(1)),
              });
            },
          }));
      if (res?.interrupted) {
        if (abort.signal.reason === 'shutdown') {
          await this.event(id, 'info', `stopped by shutdown at step ${res.steps}; resumes from the checkpoint on the next start`);
          await this.save({ ...this.get(id), status: 'queued' });
        } else {
          await fs.rm(checkpointDir(out), { recursive: true, force: true });
          await this.finish(this.get(id), { status: 'cancelled' });
          await this.event(id, 'info', `cancelled at step ${res.steps}`);
        }
        return;
      }
      job = await this.save({ ...this.get(id), trained_tokens: res?.tokens ?? this.get(id).trained_tokens });
      await this.install(job);
      job = await this.finish(this.get(id), { status: 'succeeded', fine_tuned_model: `${this.engine.modelId}:${job.suffix ?? job.id}`, result_files: [] });
      await this.event(id, 'info', `succeeded: serving ${job.fine_tuned_model}`);
      if (job.upload && this.o.upload) {
        try {
          const sha = await this.o.upload(out, job.suffix ?? job.id);
          await this.save({ ...this.get(id), uploaded_sha256: sha });
          await this.event(id, 'info', `uploaded to the hub: sha256 ${sha}`);
        } catch (err) {
          await this.event(id, 'error', `upload to the hub failed: ${(err as Error).message}`);
        }
      }
    } catch (err) {
      const message = err instanceof EdgeloraError ? err.describe() : (err as Error).message;
      await this.finish(this.get(id), { status: 'failed', error: { code: 'training_failed', message, param: null } });
      await this.event(id, 'error', `failed: ${message}`);
    } finally {
      this.aborts.delete(id);
    }
  }

  /**
   * Runs the training with serving paused (docs/architecture.md, "Serving during a job"): the
   * serving session is released so the process holds the base once (the training session's copy),
   * requests queue, and serving resumes when training ends, however it ends.
   */
  private async whileServingPaused<T>(id: string, train: () => Promise<T>): Promise<T> {
    const t0 = performance.now();
    const { resume } = await this.engine.pauseServing();
    await this.event(id, 'info', `serving paused for the job (${Math.round(performance.now() - t0)} ms to finish the rows in flight); requests queue until it ends`);
    try {
      return await train();
    } finally {
      const t1 = performance.now();
      await resume();
      await this.event(id, 'info', `serving resumed (${Math.round(performance.now() - t1)} ms to reload the base; ${this.engine.queueDepth} requests were waiting)`);
    }
  }

  private async install(job: JobRecord): Promise<void> {
    const name = job.suffix ?? job.id;
    if (!this.engine.adapters.has(name)) await this.engine.loadAdapter(name, path.join(this.p('jobs', job.id), 'adapter'));
  }

  private async finish(job: JobRecord, patch: Partial<JobRecord>): Promise<JobRecord> {
    return this.save({ ...job, ...patch, finished_at: nowS() });
  }

  private async save(job: JobRecord): Promise<JobRecord> {
    const checked = JobRecord.parse(job);
    await writeFileAtomic(this.p('jobs', job.id, 'job.json'), JSON.stringify(checked, null, 2) + '\n');
    this.jobs.set(job.id, checked);
    return checked;
  }

  private async event(id: string, level: JobEvent['level'], message: string, type: JobEvent['type'] = 'message', data: JobEvent['data'] = null): Promise<void> {
    const e: JobEvent = { object: 'fine_tuning.job.event', id: newId('ftevent'), created_at: nowS(), level, message, type, data };
    this.o.log?.(`fine-tuning ${id}: ${message}`);
    await fs.appendFile(this.p('jobs', id, 'events.jsonl'), JSON.stringify(e) + '\n');
  }
}
