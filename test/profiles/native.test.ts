// native/: the Jetson build script's argument handling (help, dry run, bad arguments), shellcheck, and the patcher
// that makes the Node binding forward providerOptions. The build itself needs a Jetson and cannot run here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const script = path.join(root, 'native/build-ort-jetson.sh');
const patcher = path.join(root, 'native/patch-provider-options.py');

function run(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, HOME: '/home/jetson' } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

test('--help prints usage and exits 0', () => {
  const r = run('bash', [script, '--help']);
  assert.equal(r.code, 0, r.err);
  for (const flag of ['--ort-tag', '--cuda-home', '--cudnn-home', '--tensorrt-home', '--jobs', '--out-dir', '--dry-run']) assert.ok(r.out.includes(flag), `help lacks ${flag}`);
});

test('--dry-run prints the build steps with the chosen flags and runs nothing', () => {
  const src = path.join(os.tmpdir(), 'edgelora-never-created');
  const r = run('bash', [script, '--dry-run', '--ort-tag', 'v1.29.1', '--jobs', '3', '--cuda-home', '/opt/cuda', '--tensorrt-home', '/opt/trt/lib', '--src-dir', src, '--out-dir', '/tmp/out']);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /git clone --recursive --depth 1 --branch v1\.29\.1 /);
  assert.match(r.out, /\.\/build\.sh --config Release --build_shared_lib --parallel 3 --skip_tests --use_cuda --cuda_home \/opt\/cuda --cudnn_home \S+ --use_tensorrt --tensorrt_home \/opt\/trt\/lib --build_nodejs --cmake_extra_defines CMAKE_CUDA_ARCHITECTURES=87/);
  assert.match(r.out, /libonnxruntime_providers_tensorrt\.so/);
  assert.match(r.out, /npm pack --pack-destination \/tmp\/out/);
  assert.match(r.out, /npm install \/tmp\/out\/onnxruntime-common-1\.29\.1\.tgz \/tmp\/out\/onnxruntime-node-1\.29\.1\.tgz/);
  assert.equal(spawnSync('test', ['-e', src]).status, 1, 'dry run must not create the source dir');
  const noTrt = run('bash', [script, '--dry-run', '--no-tensorrt', '--no-patch']);
  assert.equal(noTrt.code, 0, noTrt.err);
  assert.ok(!noTrt.out.includes('--use_tensorrt') && !noTrt.out.includes('patch-provider-options'), noTrt.out);
  assert.ok(noTrt.out.includes('/home/jetson/ort-jetson/onnxruntime'), 'default source dir under $HOME');
});

test('bad arguments exit non-zero and say what was wrong', () => {
  const bad: [string[], RegExp][] = [
    [['--bogus'], /unknown option: --bogus/],
    [['--jobs'], /--jobs needs a value/],
    [['--jobs', '0', '--dry-run'], /--jobs 0: expected a positive integer/],
    [['--ort-tag', 'main', '--dry-run'], /expected a release tag/],
    [['--config', 'Fast', '--dry-run'], /--config Fast/],
    [['--cuda-arch', 'sm_87', '--dry-run'], /--cuda-arch sm_87/],
  ];
  for (const [args, msg] of bad) {
    const r = run('bash', [script, ...args]);
    assert.notEqual(r.code, 0, `${args.join(' ')} should fail`);
    assert.match(r.err, msg);
  }
});

test('a real run refuses to start off a Jetson (prerequisite checks)', { skip: process.arch === 'arm64' ? 'this may be a Jetson' : false }, () => {
  const r = run('bash', [script, '--src-dir', path.join(os.tmpdir(), 'edgelora-never-created')]);
  assert.equal(r.code, 1);
  assert.match(r.err, /prerequisite failed: aarch64 host/);
});

const hasShellcheck = spawnSync('shellcheck', ['--version']).status === 0;
test('shellcheck finds nothing', { skip: hasShellcheck ? false : 'shellcheck not installed (apt-get install shellcheck)' }, () => {
  const r = run('shellcheck', [script]);
  assert.equal(r.code, 0, r.out + r.err);
});

// A synthetic excerpt with the lines the patcher anchors on (shaped like js/node/src/session_options_helper.cc).
const EXCERPT = `#include <cmath>
#include <unordered_map>

void ParseExecutionProviders(const Napi::Array epList, Ort::SessionOptions& sessionOptions) {
  for (uint32_t i = 0; i < epList.Length(); i++) {
    std::string name;
    int deviceId = 0;
    if (epValue.IsString()) {
    } else {
      auto obj = epValue.As<Napi::Object>();
      if (obj.Has("deviceId")) {
        deviceId = obj.Get("deviceId").As<Napi::Number>();
      }
    }
    if (name == "cpu") {
    } else if (name == "cuda") {
      OrtCUDAProviderOptionsV2* options;
      options->device_id = deviceId;
      sessionOptions.AppendExecutionProvider_CUDA_V2(*options);
    } else if (name == "tensorrt") {
      OrtTensorRTProviderOptionsV2* options;
      options->device_id = deviceId;
      sessionOptions.AppendExecutionProvider_TensorRT_V2(*options);
    }
  }
}
`;

test('the providerOptions patcher applies once, is idempotent, and refuses a file it does not recognise', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'edgelora-patch-'));
  const file = path.join(dir, 'session_options_helper.cc');
  writeFileSync(file, EXCERPT);
  const first = run('python3', [patcher, file]);
  assert.equal(first.code, 0, first.err);
  const patched = readFileSync(file, 'utf8');
  assert.equal(patched.split('UpdateTensorRTProviderOptions(options, keys.data()').length - 1, 1);
  assert.equal(patched.split('UpdateCUDAProviderOptions(options, keys.data()').length - 1, 1);
  // The update must come after device_id is set and before the provider is appended.
  const trt = patched.indexOf('UpdateTensorRTProviderOptions');
  assert.ok(patched.lastIndexOf('options->device_id = deviceId;', trt) > patched.indexOf('UpdateCUDAProviderOptions'));
  assert.ok(trt < patched.indexOf('AppendExecutionProvider_TensorRT_V2'));
  const again = run('python3', [patcher, file]);
  assert.equal(again.code, 0);
  assert.equal(readFileSync(file, 'utf8'), patched, 'second run changes nothing');
  const other = path.join(dir, 'other.cc');
  const changed = EXCERPT.replace('    int deviceId = 0;\n', '    int device_id = 0;\n');
  writeFileSync(other, changed);
  const refused = run('python3', [patcher, other]);
  assert.equal(refused.code, 1);
  assert.match(refused.err, /expected exactly one 'int deviceId = 0;' but found 0/);
  assert.equal(readFileSync(other, 'utf8'), changed, 'refused file is untouched');
});
