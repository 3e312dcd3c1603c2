// Execution providers: find out which ones the installed onnxruntime-node really offers, by creating and running a
// one-node session with each (in a child process, so a broken CUDA library cannot take edgelora down with it and the
// native loader's error spam stays off the user's terminal), then plan the provider list a profile asks for.
//
// What onnxruntime-node 1.30 does here (linux-x64 npm build, checked on this project's CI machine):
//   - listSupportedBackends() returns cpu, webgpu, cuda (bundled: false), tensorrt (bundled: false) even when the
//     CUDA/TensorRT provider libraries are not installed: the list is compile-time, not proof.
//   - A session asking for "cuda" or "tensorrt" without their libraries THROWS ("Failed to load shared library");
//     it does not fall back. A list ["cuda", "cpu"] throws the same way, so edgelora passes only providers that
//     passed the probe.
//   - An unknown name ("xnnpack", "bogus") throws "no available backend found".
//   - The binding passes only `deviceId` to CUDA/TensorRT; other fields of the provider object are ignored unless the
//     binding was built with native/build-ort-jetson.sh (which forwards `providerOptions`).
// A provider is "available" only when the probe session ran and ORT's profiler attributes the node to that provider.
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import onnxproto from 'onnx-proto';
import type { EpName } from './schema.js';

const { onnx } = onnxproto;

export interface EpProbe {
  name: EpName;
  available: boolean;
  /** What happened: the provider the profiler saw, or the error ORT threw. */
  detail: string;
}

export interface EpProbeReport {
  probes: EpProbe[];
  /** ort.listSupportedBackends(): what the binding was compiled to know about (not proof it works). */
  listed: { name: string; bundled: boolean }[];
  /** onnxruntime-node's package version, or null when it could not be read. */
  ortVersion: string | null;
  /** The onnxruntime-node package directory. */
  ortDir: string | null;
  /** Contents of edgelora-build.json left by native/build-ort-jetson.sh, or null for a registry build. */
  customBuild: Record<string, unknown> | null;
}

/** Probes the named providers; injectable so tests can fake "CUDA present" or "TensorRT missing". */
export type EpProber = (names: readonly EpName[]) => Promise<EpProbeReport>;

/** ORT's internal provider names, as they appear in profiles and logs. */
export const ORT_PROVIDER_NAMES: Readonly<Record<EpName, string>> = {
  tensorrt: 'TensorrtExecutionProvider',
  cuda: 'CUDAExecutionProvider',
  cpu: 'CPUExecutionProvider',
};

/** A prober that claims exactly `available` (plus nothing else); for tests and dry runs. */
export function staticProber(available: readonly EpName[], opts: { customBuild?: Record<string, unknown> | null } = {}): EpProber {
  return async (names) => ({
    probes: names.map((name) => ({
      name,
      available: available.includes(name),
      detail: available.includes(name) ? 'faked: available' : `faked: ${name} missing`,
    })),
    listed: available.map((name) => ({ name, bundled: true })),
    ortVersion: null,
    ortDir: null,
    customBuild: opts.customBuild ?? null,
  });
}

/** The one-node model the probe runs: y = Relu(x), x float [1, 4]. Relu is not optimized away, unlike Identity. */
export function probeModelBytes(): Uint8Array {
  const vi = (name: string) => ({ name, type: { tensorType: { elemType: onnx.TensorProto.DataType.FLOAT, shape: { dim: [{ dimValue: 1 }, { dimValue: 4 }] } } } });
  const model = onnx.ModelProto.fromObject({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 17 }],
    producerName: 'edgelora-ep-probe',
    graph: { name: 'probe', node: [{ opType: 'Relu', name: 'probe_relu', input: ['x'], output: ['y'] }], input: [vi('x')], output: [vi('y')] },
  });
  return onnx.ModelProto.encode(model).finish();
}

/** Runs in the child: create the session with one provider, run it with profiling, report the node's provider. */
const CHILD_SCRIPT = `
const fs = require('fs'), os = require('os'), path = require('path');
let input = '';
process.stdin.on('data', (d) => { input += d; });
process.stdin.on('end', async () => {
  const req = JSON.parse(input);
  const out = { listed: [], available: false, detail: '' };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgelora-ep-'));
  try {
    const ort = require(req.ortPath);
    ort.env.logLevel = 'fatal';
    try { out.listed = ort.listSupportedBackends(); } catch (e) { out.listed = []; }
    const ep = req.name === 'cpu' ? 'cpu' : { name: req.name, deviceId: 0 };
    const session = await ort.InferenceSession.create(Buffer.from(req.model, 'base64'), {
      executionProviders: [ep], enableProfiling: true, profileFilePrefix: path.join(dir, 'probe'), logSeverityLevel: 3,
    });
    const res = await session.run({ x: new ort.Tensor('float32', Float32Array.from([-1, 0, 1, 2]), [1, 4]) });
    const y = Array.from(res.y.data);
    session.endProfiling();
    await session.release();
    if (y.join(',') !== '0,0,1,2') { out.detail = 'session ran but Relu gave ' + y.join(','); }
    else {
      const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json'));
      const events = files.length ? JSON.parse(fs.readFileSync(path.join(dir, files[0]), 'utf8')) : [];
      const providers = [...new Set(events.filter((e) => e.cat === 'Node' && e.args && e.args.provider).map((e) => e.args.provider))];
      if (providers.length === 0) { out.available = true; out.detail = 'session ran; profiler named no provider'; }
      else if (providers.includes(req.ortName)) { out.available = true; out.detail = 'ran on ' + providers.join(', '); }
      else { out.detail = 'session created but the node ran on ' + providers.join(', ') + ' (silent fallback)'; }
    }
  } catch (e) {
    out.detail = String(e && e.message ? e.message : e).split('\\n')[0];
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(out));
});
`;

interface ChildResult {
  listed: { name: string; bundled: boolean }[];
  available: boolean;
  detail: string;
}

function runChild(input: string, timeoutMs: number): Promise<{ stdout: string; stderr: string; code: number | null; signal: string | null }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['-e', CHILD_SCRIPT], { stdio: ['pipe', 'pipe', 'pipe'], timeout: timeoutMs });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => resolve({ stdout, stderr: stderr + err.message, code: null, signal: null }));
    child.on('close', (code, signal) => resolve({ stdout, stderr, code, signal }));
    child.stdin.end(input);
  });
}

/** Where onnxruntime-node is installed, as seen from this module (the bundle or src/). */
export function locateOrt(): { entry: string; dir: string } | null {
  try {
    const entry = createRequire(import.meta.url).resolve('onnxruntime-node');
    // entry is <pkg>/dist/index.js; walk up to the directory holding its package.json.
    let dir = path.dirname(entry);
    while (!existsSync(path.join(dir, 'package.json')) && path.dirname(dir) !== dir) dir = path.dirname(dir);
    return { entry, dir };
  } catch {
    return null;
  }
}

function readJson(file: string): Record<string, unknown> | null {
  try {
    const v: unknown = JSON.parse(readFileSync(file, 'utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

/**
 * The real prober: one child process per provider (sequential, so GPU probes do not contend). A TensorRT probe
 * builds an engine, which takes seconds on a Jetson; `timeoutMs` (default 120 000) bounds each probe. Results are
 * cached per process (generate then eval in one process probes once); `fresh: true` probes again.
 */
const probeCache = new Map<string, EpProbe>();
const listedCache = new Map<string, EpProbeReport['listed']>();

export function ortProber(opts: { timeoutMs?: number; fresh?: boolean } = {}): EpProber {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  return async (names) => {
    const ort = locateOrt();
    const pkg = ort ? readJson(path.join(ort.dir, 'package.json')) : null;
    const report: EpProbeReport = {
      probes: [],
      listed: [],
      ortVersion: pkg && typeof pkg.version === 'string' ? pkg.version : null,
      ortDir: ort?.dir ?? null,
      customBuild: ort ? readJson(path.join(ort.dir, 'edgelora-build.json')) : null,
    };
    if (!ort) {
      report.probes = names.map((name) => ({ name, available: false, detail: 'onnxruntime-node is not installed' }));
      return report;
    }
    const model = Buffer.from(probeModelBytes()).toString('base64');
    report.listed = opts.fresh ? [] : (listedCache.get(ort.entry) ?? []);
    for (const name of names) {
      const cached = opts.fresh ? undefined : probeCache.get(`${ort.entry}|${name}`);
      if (cached) {
        report.probes.push(cached);
        continue;
      }
      const r = await runChild(JSON.stringify({ ortPath: ort.entry, name, ortName: ORT_PROVIDER_NAMES[name], model }), timeoutMs);
      let parsed: ChildResult | null = null;
      try {
        parsed = JSON.parse(r.stdout) as ChildResult;
      } catch {
        parsed = null;
      }
      if (parsed) {
        if (report.listed.length === 0) report.listed = parsed.listed;
        listedCache.set(ort.entry, parsed.listed);
        const probe: EpProbe = { name, available: parsed.available, detail: parsed.detail };
        probeCache.set(`${ort.entry}|${name}`, probe);
        report.probes.push(probe);
      } else {
        const why = r.signal ? `probe process killed by ${r.signal}` : `probe process exited with code ${r.code}`;
        const tail = r.stderr.trim().split('\n').filter((l) => l.trim() !== '').slice(-1)[0] ?? '';
        report.probes.push({ name, available: false, detail: tail ? `${why}: ${tail}` : why });
      }
    }
    return report;
  };
}

export interface ProviderPlan {
  /** Providers to pass to ORT, in the profile's order: only those that passed the probe. */
  use: EpName[];
  /** Providers the profile wanted that are missing, with the probe's reason. */
  missing: { name: EpName; detail: string }[];
  /** One line per fallback, naming what was missing and what is used instead. */
  warnings: string[];
}

export const EP_LABELS: Readonly<Record<EpName, string>> = { tensorrt: 'TensorRT', cuda: 'CUDA', cpu: 'CPU' };

/** Keeps the profile's providers that the probe found, warning for each one skipped. */
export function planProviders(wanted: readonly EpName[], report: EpProbeReport): ProviderPlan {
  const use: EpName[] = [];
  const missing: ProviderPlan['missing'] = [];
  for (const name of wanted) {
    const probe = report.probes.find((p) => p.name === name);
    if (probe?.available) use.push(name);
    else missing.push({ name, detail: probe?.detail ?? 'not probed' });
  }
  const warnings = missing.map((m) => {
    const next = use.find((u) => wanted.indexOf(u) > wanted.indexOf(m.name));
    const instead = next ? `falling back to ${EP_LABELS[next]}` : 'no provider after it in the profile';
    return `${EP_LABELS[m.name]} execution provider is not available in this onnxruntime-node (${m.detail}); ${instead}`;
  });
  return { use, missing, warnings };
}
