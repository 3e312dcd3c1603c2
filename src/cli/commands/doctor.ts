// `edgelora doctor`: what this device is, which execution providers onnxruntime-node really offers (by running a
// one-node session with each), which device profile applies and why, and the resulting plan.
import type { Command } from '../command.js';
import { numberFlag, parseFlags } from '../command.js';
import { describeError, EdgeloraError } from '../../util/errors.js';
import { formatBytes } from '../../profiles/memory.js';
import { parseProfileSets } from '../../profiles/load.js';
import { EP_LABELS, ortProber, type EpProbeReport } from '../../profiles/providers.js';
import { readDeviceFacts, type DeviceFacts } from '../../profiles/detect.js';
import { resolveProfile, type ResolvedProfile } from '../../profiles/resolve.js';
import { EP_NAMES } from '../../profiles/schema.js';

const help = `Usage: edgelora doctor [--json] [--profile auto|<id>|<file.json>] [--profile-set KEY=VALUE ...] [--root DIR]

Reads /proc/device-tree/model, /etc/nv_tegra_release, /proc/meminfo, the CPU count and arch; probes which
execution providers (TensorRT, CUDA, CPU) the installed onnxruntime-node really runs, by creating and running a
one-node session with each; picks the device profile and prints what it found and why.

Flags:
  --profile SPEC        auto (default: detect), a shipped profile id (e.g. jetson-orin-nano-8gb) or a JSON file
  --profile-set K=V     override one profile field (repeatable), e.g. memoryBudgetBytes=4e9, finetune.seqLen=128
  --root DIR            read the device files under DIR instead of / (to check a copy of another device's files)
  --cpus N              pretend the host has N CPUs (default: detected)
  --arch A              pretend the arch is A, as Node names it: arm64, x64 (default: this process's)
  --timeout-ms N        per-provider probe limit in milliseconds (default 120000; a TensorRT probe builds an engine)
  --json                print one JSON object instead of text
  -h, --help            this text`;

function facts(f: DeviceFacts): string[] {
  const mem = f.memTotalBytes === null ? 'unknown' : `MemTotal ${formatBytes(f.memTotalBytes)}` + (f.memAvailableBytes === null ? '' : `, MemAvailable ${formatBytes(f.memAvailableBytes)}`);
  return [
    'Device',
    `  model         ${f.model ?? '(no /proc/device-tree/model)'}`,
    `  L4T           ${f.tegraRelease ?? '(no /etc/nv_tegra_release: not a Jetson)'}`,
    `  memory        ${mem}`,
    `  CPUs          ${f.cpus}`,
    `  arch          ${f.arch}`,
    ...(f.root === '/' ? [] : [`  read under    ${f.root}`]),
  ];
}

function probeLines(r: EpProbeReport): string[] {
  const build = r.customBuild ? `custom build (${JSON.stringify(r.customBuild)})` : 'npm registry build (no edgelora-build.json)';
  const lines = [
    'onnxruntime-node',
    `  version       ${r.ortVersion ?? 'unknown'}${r.ortDir ? `  (${r.ortDir})` : ''}`,
    `  build         ${build}`,
    `  compiled in   ${r.listed.map((l) => (l.bundled ? l.name : `${l.name} (libraries not bundled)`)).join(', ') || 'unknown'}`,
    '  probed (one-node session per provider):',
  ];
  for (const p of r.probes) lines.push(`    ${EP_LABELS[p.name].padEnd(9)} ${p.available ? 'yes' : 'no '}  ${p.detail}`);
  return lines;
}

function profileLines(rp: ResolvedProfile): string[] {
  const p = rp.profile;
  const ft = rp.finetuneDefaults;
  const chain = p.executionProviders.map((e) => `${EP_LABELS[e.name]} ${rp.providers.use.includes(e.name) ? '✓' : '✗'}`).join(' → ');
  return [
    'Profile',
    `  chosen        ${p.id} — ${p.name}`,
    `  file          ${rp.file}`,
    `  why           ${rp.why.join('; ')}`,
    `  memory budget ${formatBytes(rp.memoryBudgetBytes)} (${rp.memoryBudgetWhy})`,
    `  providers     ${chain}   → session uses: ${rp.providers.use.map((n) => EP_LABELS[n]).join(', ')}`,
    `  threads       ${rp.threads}`,
    `  4-bit format  ${rp.defaultFormat}${rp.defaultFormat !== p.defaultFormat ? ` (profile says ${p.defaultFormat})` : ''}`,
    `  max context   ${rp.maxContext} tokens`,
    `  fine-tune     batch ${ft.batchSize} × ${ft.seqLen} tokens, rank ${ft.rank} (alpha ${ft.alpha}) on ${ft.targets.join(', ')}, recompute ${ft.recompute ? 'on' : 'off'} (finetune's defaults)`,
  ];
}

export const doctorCommand: Command = {
  name: 'doctor',
  summary: 'Detect the device and execution providers, pick the device profile and show why',
  help,
  async run(argv) {
    const { values, help: wantHelp } = parseFlags(
      'doctor',
      argv,
      {
        json: { type: 'boolean' },
        profile: { type: 'string' },
        'profile-set': { type: 'string', multiple: true },
        root: { type: 'string' },
        cpus: { type: 'string' },
        arch: { type: 'string' },
        'timeout-ms': { type: 'string' },
      },
      { positionals: [] },
    );
    if (wantHelp) {
      process.stdout.write(help + '\n');
      return 0;
    }
    const cpus = values.cpus === undefined ? undefined : numberFlag('cpus', values.cpus, 1, { integer: true, min: 1 });
    const timeoutMs = numberFlag('timeout-ms', values['timeout-ms'], 120_000, { integer: true, min: 1000 });
    const overrides = parseProfileSets(values['profile-set'] ?? []);
    const detectOpts = { root: values.root, cpus, arch: values.arch };

    // Probe every provider once (doctor shows them all); the profile's plan reuses the result.
    const report = await ortProber({ timeoutMs })(EP_NAMES);
    const probe = async (names: readonly string[]) => ({ ...report, probes: report.probes.filter((p) => names.includes(p.name)) });

    let resolved: ResolvedProfile | null = null;
    let error: EdgeloraError | Error | null = null;
    try {
      resolved = await resolveProfile({ profile: values.profile ?? 'auto', overrides, ...detectOpts, probe, warn: () => {} });
    } catch (err) {
      error = err instanceof Error ? err : new Error(String(err));
    }
    const f = resolved?.facts ?? readDeviceFacts(detectOpts);

    if (values.json) {
      const out = {
        facts: f,
        onnxruntime: report,
        profile: resolved && {
          id: resolved.profile.id,
          name: resolved.profile.name,
          file: resolved.file,
          chosenBy: resolved.chosenBy,
          why: resolved.why,
          candidates: resolved.candidates,
          memoryBudgetBytes: resolved.memoryBudgetBytes,
          memoryBudgetWhy: resolved.memoryBudgetWhy,
          providers: resolved.providers,
          sessionOptions: resolved.sessionOptions(),
          defaultFormat: resolved.defaultFormat,
          threads: resolved.threads,
          maxContext: resolved.maxContext,
          finetuneDefaults: resolved.finetuneDefaults,
          resolvedProfile: resolved.profile,
        },
        warnings: resolved?.warnings ?? [],
        error: error ? describeError(error) : null,
      };
      process.stdout.write(JSON.stringify(out, null, 2) + '\n');
      return error ? 1 : 0;
    }

    const lines = [...facts(f), '', ...probeLines(report), ''];
    if (resolved) {
      lines.push(...profileLines(resolved));
      if (resolved.warnings.length > 0) lines.push('', 'Warnings', ...resolved.warnings.map((w) => `  - ${w}`));
    }
    process.stdout.write(lines.join('\n') + '\n');
    if (error) {
      process.stderr.write(`edgelora doctor: ${describeError(error)}\n`);
      return 1;
    }
    return 0;
  },
};
