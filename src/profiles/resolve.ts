// Profile selection: what generate, eval, finetune and doctor call. Resolves `--profile` (auto, an id or a file) and
// overrides into a ResolvedProfile: the providers this onnxruntime-node really offers in the profile's order, the
// memory budget, threads, default 4-bit format, context and fine-tune defaults, and the memory-plan check.
import os from 'node:os';
import type { InferenceSession } from 'onnxruntime-node';
import { EdgeloraError } from '../util/errors.js';
import { chooseProfile, checkRules, readDeviceFacts, type DeviceFacts } from './detect.js';
import { applyOverrides, builtinProfilesDir, findProfile, loadBuiltinProfiles, looksLikeFile, type LoadedProfile } from './load.js';
import { checkMemoryPlan, formatBytes, type MemoryPlan } from './memory.js';
import { EP_LABELS, ortProber, planProviders, type EpProbeReport, type EpProber, type ProviderPlan } from './providers.js';
import type { DeviceProfile, EpName, ExecutionProviderEntry, FinetuneDefaults } from './schema.js';

export interface ResolveOptions {
  /** "auto" (default: detect), a shipped profile id, or a path to a profile JSON file. */
  profile?: string;
  /** Single-field overrides by dotted path (see applyOverrides), e.g. { memoryBudgetBytes: 4e9 }. */
  overrides?: Record<string, unknown>;
  /** Directory standing in for "/" when reading device files; default "/". */
  root?: string;
  /** Injected CPU count and arch; default os.availableParallelism() and process.arch. */
  cpus?: number;
  arch?: string;
  /** Execution-provider prober; default ortProber() (real sessions in a child process). */
  probe?: EpProber;
  /** Where the shipped profiles live; default the package's device-profiles/. */
  profilesDir?: string;
  /**
   * The quantization of the model directory this run uses (generate, eval, serve, finetune). Absent: no
   * model yet, a format is being chosen (doctor's advice for quantize), so the int4 fallback is named.
   */
  modelFormat?: 'fp32' | 'nf4' | 'fp4' | 'int4';
  /** Receives each warning (fallbacks, mismatches); default prints "edgelora: warning: …" to stderr. */
  warn?: (message: string) => void;
}

export interface ResolvedProfile {
  profile: DeviceProfile;
  /** The profile's file. */
  file: string;
  /** How it was chosen: "auto", "id" or "file". */
  chosenBy: 'auto' | 'id' | 'file';
  /** Why: the match rules that held (auto) or the flag that named it. */
  why: string[];
  /** Every shipped profile's verdict when chosen automatically (for doctor); empty otherwise. */
  candidates: { id: string; matched: boolean; rules: number; reasons: string[]; failed: string[]; held: string[] }[];
  facts: DeviceFacts;
  probe: EpProbeReport;
  providers: ProviderPlan;
  /** Bytes the runtime may use. */
  memoryBudgetBytes: number;
  /** How the budget was derived (profile figure, fraction of MemTotal, override). */
  memoryBudgetWhy: string;
  /** The 4-bit format to default to here: nf4 needs CUDA in the plan, otherwise int4. */
  defaultFormat: 'nf4' | 'int4';
  threads: number;
  maxContext: number;
  finetuneDefaults: FinetuneDefaults;
  /** Everything worth a user's attention, already passed to `warn`. */
  warnings: string[];
  /** Session options: providers that passed the probe in profile order, intra-op threads; `extra` wins. */
  sessionOptions(extra?: InferenceSession.SessionOptions): InferenceSession.SessionOptions;
  /** Throws an EdgeloraError naming the estimate, the budget, the biggest items and what to lower. */
  checkMemoryPlan(plan: MemoryPlan): void;
}

/**
 * What the 4-bit format means here. With a model directory at hand its format is fixed: say what runs (an
 * nf4/fp4 model's MatMulBnb4 on the CPU without CUDA, whatever the profile prefers). Without one (a format is
 * being chosen) say which format to quantize to.
 */
function formatWarning(preferred: 'nf4' | 'int4', cuda: boolean, modelFormat: ResolveOptions['modelFormat']): string | null {
  // A CPU profile (int4 preferred) says nothing, as before: only a GPU profile that lost CUDA has news.
  if (cuda || preferred !== 'nf4') return null;
  if (modelFormat === undefined) {
    return 'profile prefers nf4, but without the CUDA provider MatMulBnb4 runs on the CPU (about 7x slower than int4 there); defaulting to int4 (quantize with --format int4)';
  }
  if (modelFormat === 'nf4' || modelFormat === 'fp4') {
    return `model is ${modelFormat}: without the CUDA provider its MatMulBnb4 runs on the CPU here (about 7x slower than int4); re-quantize the source checkpoint with --format int4 for speed`;
  }
  // An int4 or fp32 model is what the CPU runs well: nothing to say.
  return null;
}

function defaultWarn(message: string): void {
  process.stderr.write(`edgelora: warning: ${message}\n`);
}

function expandHome(v: string): string {
  return v.startsWith('~/') ? `${os.homedir()}/${v.slice(2)}` : v;
}

/** The object onnxruntime-node receives for one provider; providerOptions only matter to a native/ build. */
export function providerConfig(ep: ExecutionProviderEntry): InferenceSession.ExecutionProviderConfig {
  if (ep.name === 'cpu') return 'cpu';
  const providerOptions: Record<string, string> = {};
  if (ep.name === 'tensorrt' && ep.fp16 !== undefined) providerOptions.trt_fp16_enable = ep.fp16 ? '1' : '0';
  for (const [k, v] of Object.entries(ep.providerOptions ?? {})) {
    providerOptions[k] = typeof v === 'boolean' ? (v ? '1' : '0') : typeof v === 'string' ? expandHome(v) : String(v);
  }
  const config: InferenceSession.ExecutionProviderOption & { deviceId: number; providerOptions?: Record<string, string> } = {
    name: ep.name,
    deviceId: ep.deviceId ?? 0,
  };
  if (Object.keys(providerOptions).length > 0) config.providerOptions = providerOptions;
  return config;
}

function pickProfile(spec: string, builtins: LoadedProfile[], facts: DeviceFacts, warnings: string[]) {
  if (spec === 'auto') {
    const choice = chooseProfile(facts, builtins);
    if (!choice) {
      throw new EdgeloraError(`no device profile matches this device (arch ${facts.arch}, model ${facts.model ?? 'unknown'})`, {
        where: '--profile auto',
        hint: 'name one with --profile <id>, or write your own and pass --profile ./my-device.json (docs/device-profiles.md)',
      });
    }
    // A Jetson whose model matched but whose memory did not (an Orin Nano 4 GB) deserves a word.
    for (const c of choice.candidates) {
      if (!c.matched && c.held.includes('model')) {
        warnings.push(`profile ${c.id} matched the device-tree model but not: ${c.failed.join('; ')}; using ${choice.chosen.profile.id}`);
      }
    }
    return { loaded: choice.chosen, chosenBy: 'auto' as const, why: choice.why, candidates: choice.candidates };
  }
  const loaded = findProfile(spec, builtins);
  const check = checkRules(loaded.profile, facts);
  if (!check.matched && check.rules > 0) {
    warnings.push(`profile ${loaded.profile.id} was named with --profile but does not match this device: ${check.reasons.join('; ')}`);
  }
  const chosenBy = looksLikeFile(spec) ? ('file' as const) : ('id' as const);
  return { loaded, chosenBy, why: [`named with --profile ${spec}`], candidates: [] };
}

export async function resolveProfile(opts: ResolveOptions = {}): Promise<ResolvedProfile> {
  const warn = opts.warn ?? defaultWarn;
  const warnings: string[] = [];
  const builtins = loadBuiltinProfiles(opts.profilesDir ?? builtinProfilesDir());
  const facts = readDeviceFacts({ root: opts.root, cpus: opts.cpus, arch: opts.arch });
  const spec = opts.profile ?? 'auto';
  const picked = pickProfile(spec, builtins, facts, warnings);

  const overrides = opts.overrides ?? {};
  const profile = Object.keys(overrides).length > 0 ? applyOverrides(picked.loaded.profile, overrides) : picked.loaded.profile;

  // Memory budget.
  let memoryBudgetBytes: number;
  let memoryBudgetWhy: string;
  const overridden = 'memoryBudgetBytes' in overrides || 'budget' in overrides || 'memoryBudgetFraction' in overrides;
  if (profile.memoryBudgetBytes !== undefined) {
    memoryBudgetBytes = profile.memoryBudgetBytes;
    memoryBudgetWhy = overridden ? 'override' : `profile ${profile.id}`;
  } else {
    const fraction = profile.memoryBudgetFraction ?? 1;
    if (facts.memTotalBytes === null) {
      throw new EdgeloraError(`profile ${profile.id} sizes its budget from MemTotal, but ${facts.root}/proc/meminfo could not be read`, {
        where: `${facts.root}/proc/meminfo`,
        hint: 'give the budget in bytes: --profile-set memoryBudgetBytes=4e9',
      });
    }
    memoryBudgetBytes = Math.floor(facts.memTotalBytes * fraction);
    memoryBudgetWhy = `${fraction} × MemTotal ${formatBytes(facts.memTotalBytes)}${overridden ? ' (override)' : ''}`;
  }
  if (facts.memTotalBytes !== null && memoryBudgetBytes > facts.memTotalBytes) {
    warnings.push(`memory budget ${formatBytes(memoryBudgetBytes)} is more than this device's MemTotal ${formatBytes(facts.memTotalBytes)}`);
  }

  // Execution providers: ask for the profile's, keep what the probe confirms.
  const wanted: EpName[] = profile.executionProviders.map((e) => e.name);
  const probe = await (opts.probe ?? ortProber())(wanted);
  const providers = planProviders(wanted, probe);
  warnings.push(...providers.warnings);
  if (providers.use.length === 0) {
    throw new EdgeloraError(`none of profile ${profile.id}'s execution providers (${wanted.map((n) => EP_LABELS[n]).join(', ')}) is available`, {
      where: `profile ${profile.id}`,
      hint: 'add {"name": "cpu"} last in executionProviders, or install a GPU build of onnxruntime-node (native/README.md)',
    });
  }
  const used = profile.executionProviders.filter((e) => providers.use.includes(e.name));
  if (probe.customBuild?.providerOptionsPatch !== true && used.some((e) => e.name !== 'cpu' && (e.fp16 !== undefined || e.providerOptions !== undefined))) {
    warnings.push('this onnxruntime-node passes only deviceId to GPU providers: fp16 and providerOptions in the profile are ignored (a native/build-ort-jetson.sh build without --no-patch honours them)');
  }

  // 4-bit format: MatMulBnb4 (nf4) runs on the GPU only through the CUDA provider; on CPU int4 is the fast one.
  let defaultFormat = profile.defaultFormat;
  const cuda = providers.use.includes('cuda');
  if (defaultFormat === 'nf4' && !cuda) defaultFormat = 'int4';
  const warning = formatWarning(profile.defaultFormat, cuda, opts.modelFormat);
  if (warning) warnings.push(warning);

  const threads = profile.threads === 'auto' ? facts.cpus : Math.min(profile.threads, facts.cpus);

  for (const w of warnings) warn(w);

  return {
    profile,
    file: picked.loaded.file,
    chosenBy: picked.chosenBy,
    why: picked.why,
    candidates: picked.candidates,
    facts,
    probe,
    providers,
    memoryBudgetBytes,
    memoryBudgetWhy,
    defaultFormat,
    threads,
    maxContext: profile.maxContext,
    finetuneDefaults: profile.finetune,
    warnings,
    sessionOptions(extra: InferenceSession.SessionOptions = {}) {
      return { executionProviders: used.map(providerConfig), intraOpNumThreads: threads, ...extra };
    },
    checkMemoryPlan(plan: MemoryPlan) {
      checkMemoryPlan(plan, memoryBudgetBytes, profile.id);
    },
  };
}
