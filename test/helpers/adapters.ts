// Random PEFT adapters for tests, written with the project's saveAdapter.
import { Rng } from '../../src/util/rng.js';
import type { ModelConfig } from '../../src/formats/hf-config.js';
import { LINEAR_PROJS, linearShape, type Proj } from '../../src/model/llama.js';
import { saveAdapter, makePeftConfig, moduleRankAlpha, isTargeted, type LoraModule } from '../../src/adapters/peft.js';
import type { RefLora } from './reference.js';

export interface RandomAdapterOptions {
  r: number;
  alpha: number;
  targets: Proj[];
  seed: number;
  rslora?: boolean;
  /** lora_dropout in adapter_config.json; default 0. */
  dropout?: number;
  rankPattern?: Record<string, number>;
  alphaPattern?: Record<string, number>;
  fingerprint?: string | null;
  /** Standard deviation of A and B entries (B nonzero so the delta matters). */
  std?: number;
}

export async function randomAdapter(dir: string, cfg: ModelConfig, o: RandomAdapterOptions): Promise<LoraModule[]> {
  const config = makePeftConfig({
    r: o.r,
    alpha: o.alpha,
    targets: o.targets,
    rslora: o.rslora ?? false,
    ...(o.dropout !== undefined ? { dropout: o.dropout } : {}),
    ...(o.rankPattern ? { rankPattern: o.rankPattern } : {}),
    ...(o.alphaPattern ? { alphaPattern: o.alphaPattern } : {}),
  });
  const rng = new Rng(o.seed);
  const std = o.std ?? 0.05;
  const modules: LoraModule[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    for (const p of LINEAR_PROJS) {
      if (!isTargeted(config, l, p)) continue;
      const { N, K } = linearShape(cfg, p);
      const { r, alpha, scale } = moduleRankAlpha(config, l, p);
      const a = Float32Array.from({ length: r * K }, () => rng.normal() * std);
      const b = Float32Array.from({ length: N * r }, () => rng.normal() * std);
      modules.push({ layer: l, proj: p, r, alpha, scale, a, b });
    }
  }
  await saveAdapter(dir, { config, modules, baseFingerprint: o.fingerprint ?? null });
  return modules;
}

/** Reference LoRA terms for referenceForward, with each scale given explicitly by the test. */
export function refLoras(sets: { modules: LoraModule[]; scale: (m: LoraModule) => number }[]): (layer: number, proj: string) => RefLora[] {
  return (layer, proj) =>
    sets.flatMap((s) => s.modules.filter((m) => m.layer === layer && m.proj === proj).map((m) => ({ a: m.a, b: m.b, r: m.r, scale: s.scale(m) })));
}
