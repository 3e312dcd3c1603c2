// Shared by generate/eval: resolve the device profile (--profile, --profile-set), check the memory
// plan against its budget, load the quantized model with the profile's execution providers, then the
// --adapter dir[:scale] list, activated in order.
import path from 'node:path';
import { ModelRuntime, type LoraFeeds } from '../runtime/model.js';
import { AdapterManager, parseAdapterSpec } from '../adapters/manager.js';
import { readManifest, type Manifest } from '../model/manifest.js';
import { parseHfConfig, type ModelConfig } from '../formats/hf-config.js';
import { resolveProfile, parseProfileSets, estimateInferenceMemory, type ResolvedProfile, type MemoryPlan } from '../profiles/index.js';
import type { FlagSpec } from './command.js';
import { expectDir } from '../formats/dir-kind.js';
import { LINEAR_PROJS, linearShape } from '../model/llama.js';

export interface Loaded {
  model: ModelRuntime;
  adapters: AdapterManager;
  lora: LoraFeeds | undefined;
  profile: ResolvedProfile;
}

/** The flags every model-running command takes. */
export const PROFILE_FLAGS = {
  profile: { type: 'string' },
  'profile-set': { type: 'string', multiple: true },
} as const satisfies FlagSpec;

export const PROFILE_HELP = `  --profile P            device profile: auto (detect; default), a profile id, or a JSON file
  --profile-set K=V      override one profile field, e.g. budget=4e9 (repeatable)`;

export interface LoadRequest {
  readonly dir: string;
  readonly adapters: string[];
  readonly profile?: string | undefined;
  readonly profileSets?: string[] | undefined;
  /** Tokens of context the job needs (prompt + new tokens, or the longest row); 0 = the model's maximum. */
  readonly context: number;
  readonly batch?: number;
  /** Flags that lower the plan, named in the refusal. */
  readonly lower: string[];
}

/** The pre-flight memory plan for running a quantized model at `context` tokens (prefill included). */
export function modelMemoryPlan(
  manifest: Manifest,
  cfg: ModelConfig,
  job: { context: number; prefillTokens: number; batch?: number },
  opts: { what?: string; lower?: string[] } = {},
): MemoryPlan {
  return estimateInferenceMemory(
    {
      modelBytes: manifest.bytes.model + manifest.bytes.data,
      layers: cfg.numLayers,
      kvHeads: cfg.numKvHeads,
      headDim: cfg.headDim,
      context: job.context,
      batch: job.batch ?? 1,
      runtime: {
        format: manifest.quant.format,
        vocab: cfg.vocabSize,
        hidden: cfg.hiddenSize,
        intermediate: cfg.intermediateSize,
        tiedEmbeddings: cfg.tieWordEmbeddings,
        prefillTokens: job.prefillTokens,
        ...(manifest.quant.embeddings ? { embeddings: manifest.quant.embeddings } : {}),
        ...(manifest.quant.embeddingBlockSize ? { embeddingBlockSize: manifest.quant.embeddingBlockSize } : {}),
        blockSize: manifest.quant.blockSize,
        linearParams: cfg.numLayers * LINEAR_PROJS.reduce((a, p) => {
          const { N, K } = linearShape(cfg, p);
          return a + N * K;
        }, 0),
      },
    },
    opts,
  );
}

export async function loadModelWithAdapters(req: LoadRequest): Promise<Loaded> {
  // Everything the user typed is checked before the model is read: the adapter specs (scale) and
  // that each adapter directory is one.
  const specs = req.adapters.map(parseAdapterSpec);
  for (const { dir } of specs) await expectDir(dir, 'adapter');
  const manifest = await readManifest(req.dir);
  const profile = await resolveProfile({
    profile: req.profile ?? 'auto',
    modelFormat: manifest.quant.format,
    overrides: parseProfileSets(req.profileSets ?? []),
  });
  const cfg = parseHfConfig(manifest.sourceConfig, path.join(req.dir, 'manifest.json'));
  const context = req.context > 0 ? Math.min(req.context, cfg.maxPositionEmbeddings) : cfg.maxPositionEmbeddings;
  profile.checkMemoryPlan(
    modelMemoryPlan(manifest, cfg, { context, prefillTokens: context, batch: req.batch ?? 1 }, { what: path.basename(path.resolve(req.dir)), lower: req.lower }),
  );
  const model = await ModelRuntime.load(req.dir, { sessionOptions: profile.sessionOptions({ graphOptimizationLevel: 'all' }) });
  const adapters = new AdapterManager(model);
  for (const { dir: adir, scale } of specs) {
    const id = await adapters.load(adir);
    adapters.activate(id, scale);
    // Another quantization of the adapter's source model: allowed, said once on stderr.
    const note = adapters.list().find((a) => a.id === id)?.baseNote;
    if (note) process.stderr.write(`edgelora: note: ${adir}: ${note}\n`);
  }
  return { model, adapters, lora: req.adapters.length > 0 ? adapters.feeds() : undefined, profile };
}
