// PEFT LoRA adapters on disk: adapter_config.json + adapter_model.safetensors (+ edgelora_adapter.json,
// which PEFT ignores, binding the adapter to its source model and recording the quantization it was
// trained on). An adapter in memory is plain data: module ("layer.proj") → {A [r, in], B [out, r], scale}.
// Loading validates everything the runtime cannot apply and every shape against the base, and refuses with a hint.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { SafetensorsReader, writeSafetensors, type StDType } from '../formats/safetensors.js';
import type { ModelConfig } from '../formats/hf-config.js';
import { EdgeloraError } from '../util/errors.js';
import { expectDir } from '../formats/dir-kind.js';
import { writeFileAtomic, writeDirAtomic } from '../util/atomic.js';
import { LINEAR_PROJS, linearShape, projModule, siteKey, compareSites, type LoraSite, type Proj } from '../model/llama.js';
import { matchBase, quantLabel, type BaseRef } from '../model/base-identity.js';

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';
export const ADAPTER_BINDING = 'edgelora_adapter.json';

/** adapter_config.json as PEFT writes it; unknown fields are kept (PEFT adds fields over versions). */
export const peftConfigSchema = z
  .object({
    peft_type: z.literal('LORA'),
    task_type: z.string().nullable().optional(),
    r: z.number().int().positive(),
    lora_alpha: z.number(),
    target_modules: z.union([z.array(z.string()), z.string()]).nullable(),
    lora_dropout: z.number().min(0).max(1).default(0),
    bias: z.string().default('none'),
    use_rslora: z.boolean().default(false),
    use_dora: z.boolean().default(false),
    fan_in_fan_out: z.boolean().default(false),
    modules_to_save: z.array(z.string()).nullable().optional(),
    rank_pattern: z.record(z.string(), z.number().int().positive()).default({}),
    alpha_pattern: z.record(z.string(), z.number()).default({}),
    layers_to_transform: z.union([z.array(z.number().int().nonnegative()), z.number().int().nonnegative()]).nullable().optional(),
    layers_pattern: z.union([z.array(z.string()), z.string()]).nullable().optional(),
    base_model_name_or_path: z.string().nullable().optional(),
    init_lora_weights: z.union([z.boolean(), z.string()]).default(true),
    inference_mode: z.boolean().optional(),
  })
  .loose();
export type PeftConfig = z.infer<typeof peftConfigSchema>;

/**
 * edgelora_adapter.json. `base_fingerprint` is the quantized model it was trained on (the only field before
 * source binding, so older edgelora still reads new files); `source_fingerprint` is the source model it
 * belongs to; `quantization` is the base's manifest `quant` in words. Unknown fields are kept.
 */
export const bindingSchema = z
  .object({
    format: z.literal('edgelora-adapter/1'),
    base_fingerprint: z.string().regex(/^[0-9a-f]{64}$/),
    source_fingerprint: z.string().regex(/^[0-9a-f]{64}$/).optional(),
    quantization: z.string().max(200).optional(),
  })
  .loose();

/** One adapted projection: A [r, K], B [N, r] in PEFT layout, PEFT scaling alpha/r (or alpha/√r). */
export interface LoraModule extends LoraSite {
  readonly r: number;
  readonly alpha: number;
  readonly scale: number;
  readonly a: Float32Array; // [r, K]
  readonly b: Float32Array; // [N, r]
}

export interface LoraAdapter {
  readonly dir: string;
  readonly config: PeftConfig;
  /** Modules by siteKey ("layer.proj"). */
  readonly modules: ReadonlyMap<string, LoraModule>;
  /** Fingerprint of the quantized base it was trained on; null for a plain PEFT adapter. */
  readonly baseFingerprint: string | null;
  /** Fingerprint of the source model it belongs to; null for a plain PEFT adapter or one from before source binding. */
  readonly sourceFingerprint: string | null;
  /** The quantization it was trained on, in words (e.g. "nf4, block 64, float table"); null when not recorded. */
  readonly trainedOn: string | null;
  /** One line to show when it is applied to another quantization of its source model; null otherwise. */
  readonly baseNote: string | null;
  /** Trainable parameters (Σ r·(K + N)). */
  readonly parameters: number;
  /** Bytes the adapter's float32 tensors take in memory. */
  readonly bytes: number;
}

/** "model.layers.3.self_attn.q_proj" — the module name PEFT matches target_modules and patterns against. */
export function moduleName(layer: number, proj: Proj): string {
  return `model.layers.${layer}.${projModule(proj)}`;
}

/** PEFT's check_target_module_exists: a regex string must fullmatch; a list matches by suffix. */
export function isTargeted(cfg: PeftConfig, layer: number, proj: Proj): boolean {
  const name = moduleName(layer, proj);
  const t = cfg.target_modules;
  let hit: boolean;
  if (t === null || t === undefined) hit = false;
  else if (typeof t === 'string') hit = new RegExp(`^(?:${t})$`).test(name);
  else hit = t.some((m) => name === m || name.endsWith(`.${m}`));
  if (!hit) return false;
  const ltt = cfg.layers_to_transform;
  if (ltt === null || ltt === undefined) return true;
  return Array.isArray(ltt) ? ltt.includes(layer) : ltt === layer;
}

/** PEFT's get_pattern_key: the first pattern key k with `(.*\.)?k$` matching the module name. */
function patternValue<T>(pattern: Record<string, T>, name: string): T | undefined {
  for (const [k, v] of Object.entries(pattern)) {
    if (new RegExp(`^(?:.*\\.)?(?:${k})$`).test(name)) return v;
  }
  return undefined;
}

export function moduleRankAlpha(cfg: PeftConfig, layer: number, proj: Proj): { r: number; alpha: number; scale: number } {
  const name = moduleName(layer, proj);
  const r = patternValue(cfg.rank_pattern, name) ?? cfg.r;
  const alpha = patternValue(cfg.alpha_pattern, name) ?? cfg.lora_alpha;
  return { r, alpha, scale: loraScale(alpha, r, cfg.use_rslora) };
}

/** The one place the LoRA scaling is computed: alpha/r, or alpha/√r with rsLoRA. */
export function loraScale(alpha: number, r: number, rslora: boolean): number {
  return rslora ? alpha / Math.sqrt(r) : alpha / r;
}

/** A PEFT LoRA tensor key: groups 1 layer, 2 self_attn|mlp, 3 projection, 4 A|B. */
export const LORA_TENSOR_KEY = /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$/;

export function tensorKey(layer: number, proj: Proj, which: 'A' | 'B'): string {
  return `base_model.model.${moduleName(layer, proj)}.lora_${which}.weight`;
}

async function readJson(file: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch {
    if (path.basename(file) === ADAPTER_CONFIG) await expectDir(path.dirname(file), 'adapter');
    throw new EdgeloraError(`cannot read ${path.basename(file)}`, { where: path.dirname(file), hint: `is this a PEFT adapter directory (${what})?` });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new EdgeloraError(`invalid JSON: ${(err as Error).message}`, { where: file });
  }
}

/** Parses and checks adapter_config.json; refuses what the runtime does not apply. */
export function parsePeftConfig(json: unknown, where: string): PeftConfig {
  if (json && typeof json === 'object') {
    for (const f of ['peft_type', 'r', 'lora_alpha', 'target_modules']) {
      if (!(f in json)) throw new EdgeloraError(`missing field "${f}"`, { where, hint: 'adapter_config.json must hold the fields PEFT writes' });
    }
  }
  const r = peftConfigSchema.safeParse(json);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new EdgeloraError(`field "${i.path.join('.')}": ${i.message}`, { where, hint: 'only LoRA adapters (peft_type "LORA") are supported' });
  }
  const c = r.data;
  const refuse = (what: string, hint: string) => {
    throw new EdgeloraError(`${what} is not supported by edgelora`, { where, hint });
  };
  if (c.use_dora) refuse('use_dora: true (DoRA)', 'train a plain LoRA adapter, or merge this one with PEFT and quantize the merged model');
  if (c.bias !== 'none') refuse(`bias "${c.bias}"`, 'use bias "none"');
  if (c.modules_to_save && c.modules_to_save.length > 0) refuse(`modules_to_save ${JSON.stringify(c.modules_to_save)}`, 'edgelora applies LoRA deltas only; drop modules_to_save');
  if (c.fan_in_fan_out) refuse('fan_in_fan_out: true', 'that layout is for GPT-2 Conv1D modules; Llama-family models use false');
  return c;
}

/** Reads and checks `<dir>/adapter_config.json` (a missing directory or another kind of directory is named as such). */
export async function readPeftConfig(dir: string): Promise<PeftConfig> {
  const cfgFile = path.join(dir, ADAPTER_CONFIG);
  return parsePeftConfig(await readJson(cfgFile, 'adapter_config.json'), cfgFile);
}

/** An adapter directory's edgelora_adapter.json, or nulls for a plain PEFT adapter. */
export async function readBinding(dir: string): Promise<{ fingerprint: string | null; sourceFingerprint: string | null; quant: string | null }> {
  const bindingFile = path.join(dir, ADAPTER_BINDING);
  if (!(await fs.stat(bindingFile).then(() => true, () => false))) return { fingerprint: null, sourceFingerprint: null, quant: null };
  const b = bindingSchema.safeParse(await readJson(bindingFile, ADAPTER_BINDING));
  if (!b.success) throw new EdgeloraError(`invalid ${ADAPTER_BINDING}: ${b.error.issues[0]!.message}`, { where: bindingFile });
  return { fingerprint: b.data.base_fingerprint, sourceFingerprint: b.data.source_fingerprint ?? null, quant: b.data.quantization ?? null };
}

/** The base an adapter is checked against: its config, and what identifies it (null fields: not known). */
export interface AdapterBase extends Partial<Omit<BaseRef, 'fingerprint'>> {
  readonly cfg: ModelConfig;
  readonly fingerprint: string | null;
}

/**
 * Loads an adapter and checks it against the base config and, when both sides are known, the base
 * (matchBase: same source model at any quantization, with `baseNote` set for another quantization).
 */
export async function loadAdapter(dir: string, base: AdapterBase): Promise<LoraAdapter> {
  const cfgFile = path.join(dir, ADAPTER_CONFIG);
  const config = await readPeftConfig(dir);
  const binding = await readBinding(dir);
  const baseFingerprint = binding.fingerprint;
  const match = matchBase(binding, { fingerprint: base.fingerprint, sourceFingerprint: base.sourceFingerprint ?? null, quant: base.quant ?? null });
  if (match.kind === 'refused') throw new EdgeloraError(match.message, { where: dir, hint: match.hint });
  const baseNote = match.kind === 'other-quantization' ? match.note : null;
  const { cfg } = base;
  // Every targeted module must exist in the base.
  const targeted = new Set<string>();
  for (let l = 0; l < cfg.numLayers; l++) for (const p of LINEAR_PROJS) if (isTargeted(config, l, p)) targeted.add(siteKey({ layer: l, proj: p }));
  const names = Array.isArray(config.target_modules) ? config.target_modules : [];
  for (const t of names) {
    const exists = [...Array(cfg.numLayers).keys()].some((l) => LINEAR_PROJS.some((p) => moduleName(l, p) === t || moduleName(l, p).endsWith(`.${t}`)));
    if (!exists) {
      throw new EdgeloraError(`target module "${t}" does not exist in the base model`, {
        where: cfgFile,
        hint: `edgelora applies LoRA to ${LINEAR_PROJS.join(', ')}`,
      });
    }
  }
  if (targeted.size === 0) throw new EdgeloraError('target_modules match no module of the base model', { where: cfgFile });

  const reader = await SafetensorsReader.open(path.join(dir, ADAPTER_WEIGHTS));
  const modules = new Map<string, LoraModule>();
  let parameters = 0;
  try {
    const found = new Map<string, { site: LoraSite; a?: string; b?: string }>();
    for (const name of reader.names()) {
      const m = LORA_TENSOR_KEY.exec(name);
      const proj = m?.[3] as Proj | undefined;
      if (!m || !proj || !LINEAR_PROJS.includes(proj) || projModule(proj) !== `${m[2]}.${proj}`) {
        throw new EdgeloraError(`tensor "${name}" is not a LoRA weight of a known module`, {
          where: reader.source,
          hint: `expected keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (modules: ${LINEAR_PROJS.join(', ')})`,
        });
      }
      const site: LoraSite = { layer: Number(m[1]), proj };
      const key = siteKey(site);
      const e = found.get(key) ?? { site };
      if (m[4] === 'A') e.a = name;
      else e.b = name;
      found.set(key, e);
    }
    for (const key of targeted) {
      if (!found.has(key)) throw new EdgeloraError(`no LoRA tensors for targeted module ${key}`, { where: reader.source, hint: 'the weights file does not match adapter_config.json' });
    }
    for (const [key, e] of found) {
      const { layer, proj } = e.site;
      if (!targeted.has(key)) {
        throw new EdgeloraError(`tensors for ${moduleName(layer, proj)}, which adapter_config.json does not target`, {
          where: reader.source,
          hint: layer >= cfg.numLayers ? 'adapter trained for another base? (more layers than this model)' : 'check target_modules / layers_to_transform',
        });
      }
      if (!e.a || !e.b) throw new EdgeloraError(`module ${moduleName(layer, proj)} lacks lora_${e.a ? 'B' : 'A'}`, { where: reader.source });
      const { N, K } = linearShape(cfg, proj);
      const { r, alpha, scale } = moduleRankAlpha(config, layer, proj);
      const check = (name: string, want: number[]) => {
        const info = reader.info(name);
        if (!['F32', 'F16', 'BF16'].includes(info.dtype)) {
          throw new EdgeloraError(`tensor "${name}" has dtype ${info.dtype}`, { where: reader.source, hint: 'adapter tensors must be F32, F16 or BF16' });
        }
        if (info.shape.length !== 2 || info.shape[0] !== want[0] || info.shape[1] !== want[1]) {
          throw new EdgeloraError(`tensor "${name}" has shape [${info.shape}] but the base model needs [${want}]`, {
            where: reader.source,
            hint: 'adapter trained for another base? (or rank_pattern does not match the tensors)',
          });
        }
      };
      check(e.a, [r, K]);
      check(e.b, [N, r]);
      const a = await reader.readF32(e.a);
      const b = await reader.readF32(e.b);
      for (const [name, arr] of [[e.a, a], [e.b, b]] as const) {
        for (let i = 0; i < arr.length; i++) {
          if (!Number.isFinite(arr[i]!)) {
            throw new EdgeloraError(`tensor "${name}" holds ${arr[i]} at index ${i}`, { where: reader.source, hint: 'the adapter is corrupt or training diverged' });
          }
        }
      }
      modules.set(key, { layer, proj, r, alpha, scale, a, b });
      parameters += a.length + b.length;
    }
  } finally {
    await reader.close();
  }
  return { dir, config, modules, baseFingerprint, sourceFingerprint: binding.sourceFingerprint, trainedOn: binding.quant, baseNote, parameters, bytes: parameters * 4 };
}

export interface AdapterToWrite {
  readonly config: PeftConfig;
  readonly modules: Iterable<LoraModule>;
  /** The quantized base it was trained on (manifest `fingerprint`); null writes no edgelora_adapter.json. */
  readonly baseFingerprint: string | null;
  /** The source model (manifest `sourceFingerprint`); absent or null for a base quantized before it existed. */
  readonly sourceFingerprint?: string | null;
  /** The base's quantization in words (quantLabel). */
  readonly trainedOn?: string | null;
}

/** The edgelora_adapter.json an adapter trained on this base gets. */
export function bindingFor(manifest: { fingerprint: string; sourceFingerprint?: string | undefined; quant: Parameters<typeof quantLabel>[0] }): Pick<AdapterToWrite, 'baseFingerprint' | 'sourceFingerprint' | 'trainedOn'> {
  return { baseFingerprint: manifest.fingerprint, sourceFingerprint: manifest.sourceFingerprint ?? null, trainedOn: quantLabel(manifest.quant) };
}

/** What identifies a loaded base, from its manifest, for loadAdapter. */
export function baseOf(manifest: { fingerprint: string; sourceFingerprint?: string | undefined; quant: Parameters<typeof quantLabel>[0] }): Omit<AdapterBase, 'cfg'> {
  return { fingerprint: manifest.fingerprint, sourceFingerprint: manifest.sourceFingerprint ?? null, quant: quantLabel(manifest.quant) };
}

/** A complete PEFT config with every field PEFT reads, for adapters written by edgelora. */
export function makePeftConfig(opts: {
  r: number;
  alpha: number;
  targets: Proj[];
  dropout?: number;
  rslora?: boolean;
  baseModel?: string | null;
  rankPattern?: Record<string, number>;
  alphaPattern?: Record<string, number>;
}): PeftConfig {
  return {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    r: opts.r,
    lora_alpha: opts.alpha,
    target_modules: [...opts.targets],
    lora_dropout: opts.dropout ?? 0,
    bias: 'none',
    use_rslora: opts.rslora ?? false,
    use_dora: false,
    fan_in_fan_out: false,
    modules_to_save: null,
    rank_pattern: opts.rankPattern ?? {},
    alpha_pattern: opts.alphaPattern ?? {},
    layers_to_transform: null,
    layers_pattern: null,
    base_model_name_or_path: opts.baseModel ?? null,
    init_lora_weights: true,
    inference_mode: true,
    revision: null,
    auto_mapping: null,
    megatron_config: null,
    megatron_core: 'megatron.core',
    loftq_config: {},
    // Fields newer than PEFT 0.9 (e.g. lora_bias, 0.14) are left out: PEFT fills their defaults,
    // while versions before 0.10 refuse keys they do not know.
  } as PeftConfig;
}

/** Writes a PEFT adapter directory atomically (tensors in the chosen float dtype, default F32). */
export async function saveAdapter(dir: string, adapter: AdapterToWrite, opts: { dtype?: StDType; replace?: boolean } = {}): Promise<void> {
  const dtype = opts.dtype ?? 'F32';
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeFileAtomic(path.join(tmp, ADAPTER_CONFIG), JSON.stringify(adapter.config, null, 2) + '\n');
      const entries = [];
      const mods = [...adapter.modules].sort(compareSites);
      for (const m of mods) {
        const K = m.a.length / m.r;
        const N = m.b.length / m.r;
        entries.push({ name: tensorKey(m.layer, m.proj, 'A'), dtype, shape: [m.r, K], data: m.a });
        entries.push({ name: tensorKey(m.layer, m.proj, 'B'), dtype, shape: [N, m.r], data: m.b });
      }
      await writeSafetensors(path.join(tmp, ADAPTER_WEIGHTS), entries, { format: 'pt' });
      if (adapter.baseFingerprint) {
        const binding = {
          format: 'edgelora-adapter/1',
          base_fingerprint: adapter.baseFingerprint,
          ...(adapter.sourceFingerprint ? { source_fingerprint: adapter.sourceFingerprint } : {}),
          ...(adapter.trainedOn ? { quantization: adapter.trainedOn } : {}),
        };
        await writeFileAtomic(path.join(tmp, ADAPTER_BINDING), JSON.stringify(binding, null, 2) + '\n');
      }
    },
    { replace: opts.replace ?? true },
  );
}
