#!/usr/bin/env bash
# Builds ONNX Runtime with the CUDA and TensorRT execution providers and its Node.js binding on a Jetson running
# JetPack 6 (aarch64, CUDA 12.x), and packs it as an onnxruntime-node tarball that replaces the CPU-only npm one.
# See native/README.md. Run with --dry-run first: it prints every step without running any.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ORT_REPO="https://github.com/microsoft/onnxruntime.git"
ORT_TAG="v1.30.0"            # match the onnxruntime-node version in edgelora's package.json
SRC_DIR="${HOME:-.}/ort-jetson/onnxruntime"
OUT_DIR="${HOME:-.}/ort-jetson/dist"
CUDA_HOME_DIR="/usr/local/cuda"
CUDNN_HOME_DIR="/usr/lib/aarch64-linux-gnu"
TENSORRT_HOME_DIR="/usr/lib/aarch64-linux-gnu"
CUDA_ARCH="87"               # Orin (Nano, NX, AGX); Xavier (72) is JetPack 5 only and not supported here
CONFIG="Release"
JOBS=""                      # default: chosen from CPU count and memory, see pick_jobs
USE_TENSORRT=1
PATCH_OPTIONS=1
SKIP_CLONE=0
DRY_RUN=0

usage() {
  cat <<'EOF'
Usage: native/build-ort-jetson.sh [options]

Builds ONNX Runtime (CUDA + TensorRT execution providers) and its Node.js binding on a Jetson with JetPack 6,
then writes onnxruntime-node-<version>.tgz and onnxruntime-common-<version>.tgz to the output directory.

Options:
  --ort-tag TAG         ONNX Runtime git tag to build (default: v1.30.0, the version edgelora depends on)
  --src-dir DIR         where to clone the source (default: ~/ort-jetson/onnxruntime; needs ~15 GB free)
  --out-dir DIR         where to write the tarballs (default: ~/ort-jetson/dist)
  --cuda-home DIR       CUDA toolkit (default: /usr/local/cuda)
  --cudnn-home DIR      cuDNN libraries (default: /usr/lib/aarch64-linux-gnu, where JetPack puts them)
  --tensorrt-home DIR   TensorRT libraries (default: /usr/lib/aarch64-linux-gnu)
  --cuda-arch SM        CMAKE_CUDA_ARCHITECTURES (default: 87, Jetson Orin)
  --config NAME         Release | RelWithDebInfo | Debug (default: Release)
  -j, --jobs N          parallel compile jobs (default: min(CPUs, GB of RAM / 3), at least 1)
  --no-tensorrt         build the CUDA provider only
  --no-patch            do not patch the Node binding to forward providerOptions (fp16, engine cache)
  --skip-clone          use the source already in --src-dir
  --dry-run             print the steps without running them
  -h, --help            this text
EOF
}

die() {
  echo "build-ort-jetson: $*" >&2
  exit 2
}

need_value() {
  # $1 flag, $2 number of remaining args (including the flag)
  [[ "$2" -ge 2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --ort-tag) need_value "$1" "$#"; ORT_TAG="$2"; shift 2 ;;
    --src-dir) need_value "$1" "$#"; SRC_DIR="$2"; shift 2 ;;
    --out-dir) need_value "$1" "$#"; OUT_DIR="$2"; shift 2 ;;
    --cuda-home) need_value "$1" "$#"; CUDA_HOME_DIR="$2"; shift 2 ;;
    --cudnn-home) need_value "$1" "$#"; CUDNN_HOME_DIR="$2"; shift 2 ;;
    --tensorrt-home) need_value "$1" "$#"; TENSORRT_HOME_DIR="$2"; shift 2 ;;
    --cuda-arch) need_value "$1" "$#"; CUDA_ARCH="$2"; shift 2 ;;
    --config) need_value "$1" "$#"; CONFIG="$2"; shift 2 ;;
    -j|--jobs) need_value "$1" "$#"; JOBS="$2"; shift 2 ;;
    --no-tensorrt) USE_TENSORRT=0; shift ;;
    --no-patch) PATCH_OPTIONS=0; shift ;;
    --skip-clone) SKIP_CLONE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[[ "$ORT_TAG" =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--ort-tag $ORT_TAG: expected a release tag like v1.30.0"
[[ "$CUDA_ARCH" =~ ^[0-9]+(\;[0-9]+)*$ ]] || die "--cuda-arch $CUDA_ARCH: expected a number like 87"
case "$CONFIG" in Release|RelWithDebInfo|Debug) ;; *) die "--config $CONFIG: expected Release, RelWithDebInfo or Debug" ;; esac
if [[ -n "$JOBS" ]]; then
  [[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs $JOBS: expected a positive integer"
fi

pick_jobs() {
  # nvcc on ONNX Runtime's CUDA kernels needs about 3 GB per job; an 8 GB Orin Nano runs out with more than 2.
  local cpus mem_gb by_mem
  cpus=$(nproc 2>/dev/null || echo 1)
  mem_gb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1000000 }' /proc/meminfo 2>/dev/null || echo 3)
  by_mem=$(( mem_gb / 3 ))
  if (( by_mem < 1 )); then by_mem=1; fi
  if (( cpus < by_mem )); then echo "$cpus"; else echo "$by_mem"; fi
}
[[ -n "$JOBS" ]] || JOBS=$(pick_jobs)

ORT_VERSION="${ORT_TAG#v}"
BUILD_DIR="$SRC_DIR/build/Linux/$CONFIG"
NODE_BIN="$SRC_DIR/js/node/bin/napi-v6/linux/arm64"

# Runs a step, or prints it under --dry-run. Arguments are the command; printed shell-quoted.
step() {
  local desc="$1"
  shift
  echo "==> $desc"
  printf '   '
  printf ' %q' "$@"
  echo
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

check() {
  # A prerequisite check: fatal for a real build, only listed in a dry run.
  local desc="$1"
  shift
  if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "==> check: $desc"
    return 0
  fi
  if ! "$@"; then
    echo "build-ort-jetson: prerequisite failed: $desc" >&2
    exit 1
  fi
}

version_ge() {
  # version_ge A B: A >= B for dotted versions
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

have_cmake() {
  local v
  command -v cmake >/dev/null || { echo "cmake not found: python3 -m pip install --user 'cmake>=3.28'" >&2; return 1; }
  v=$(cmake --version | awk 'NR==1 { print $3 }')
  version_ge "$v" 3.28 || { echo "cmake $v is too old (ONNX Runtime's build docs ask for 3.28+): python3 -m pip install --user 'cmake>=3.28'" >&2; return 1; }
}

have_cuda12() {
  local v
  [[ -x "$CUDA_HOME_DIR/bin/nvcc" ]] || { echo "no nvcc under $CUDA_HOME_DIR (install JetPack's cuda-toolkit, or pass --cuda-home)" >&2; return 1; }
  v=$("$CUDA_HOME_DIR/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  [[ "$v" == 12.* ]] || { echo "CUDA $v found; this script targets JetPack 6 (CUDA 12.x)" >&2; return 1; }
  echo "    CUDA $v"
}

have_header() {
  # have_header NAME DIR...: NAME exists in one of the include dirs
  local name="$1"
  shift
  local d
  for d in "$@"; do
    if [[ -f "$d/$name" ]]; then
      echo "    $d/$name"
      return 0
    fi
  done
  echo "$name not found in: $*" >&2
  return 1
}

have_node20() {
  local v
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node and npm are needed (Node 20+)" >&2
    return 1
  fi
  v=$(node -p 'process.versions.node')
  version_ge "$v" 20.0.0 || { echo "node $v is too old (need 20+)" >&2; return 1; }
}

echo "build-ort-jetson: ONNX Runtime $ORT_TAG, CUDA arch $CUDA_ARCH, $CONFIG, $JOBS jobs, TensorRT $([[ $USE_TENSORRT -eq 1 ]] && echo on || echo off)$([[ $DRY_RUN -eq 1 ]] && echo ', dry run')"

check "aarch64 host (a Jetson)" test "$(uname -m)" = aarch64
check "JetPack 6: L4T R36 in /etc/nv_tegra_release" grep -q '^# R36' /etc/nv_tegra_release
check "CUDA 12.x nvcc in $CUDA_HOME_DIR" have_cuda12
check "cuDNN headers" have_header cudnn_version.h /usr/include "/usr/include/$(uname -m)-linux-gnu" "$CUDNN_HOME_DIR/../include" "$CUDNN_HOME_DIR/include"
if [[ "$USE_TENSORRT" -eq 1 ]]; then
  check "TensorRT headers" have_header NvInferVersion.h /usr/include "/usr/include/$(uname -m)-linux-gnu" "$TENSORRT_HOME_DIR/../include" "$TENSORRT_HOME_DIR/include"
fi
check "cmake 3.28+" have_cmake
check "Node.js 20+ and npm" have_node20
check "git and python3" command -v git python3

if [[ "$SKIP_CLONE" -eq 0 ]]; then
  if [[ -e "$SRC_DIR" && "$DRY_RUN" -eq 0 ]]; then
    die "$SRC_DIR exists: remove it, or pass --skip-clone to build what is there"
  fi
  step "clone ONNX Runtime $ORT_TAG" git clone --recursive --depth 1 --branch "$ORT_TAG" "$ORT_REPO" "$SRC_DIR"
fi

if [[ "$PATCH_OPTIONS" -eq 1 ]]; then
  # The stock binding passes only deviceId to CUDA/TensorRT; this forwards `providerOptions` (ORT's C API keys such
  # as trt_fp16_enable) through Update{CUDA,TensorRT}ProviderOptions. It stops if the source does not look as expected.
  step "patch the Node binding to forward providerOptions" python3 "$SCRIPT_DIR/patch-provider-options.py" "$SRC_DIR/js/node/src/session_options_helper.cc"
fi

BUILD_ARGS=(
  ./build.sh
  --config "$CONFIG"
  --build_shared_lib
  --parallel "$JOBS"
  --skip_tests
  --use_cuda
  --cuda_home "$CUDA_HOME_DIR"
  --cudnn_home "$CUDNN_HOME_DIR"
)
if [[ "$USE_TENSORRT" -eq 1 ]]; then
  BUILD_ARGS+=(--use_tensorrt --tensorrt_home "$TENSORRT_HOME_DIR")
fi
BUILD_ARGS+=(
  --build_nodejs
  --cmake_extra_defines "CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" "onnxruntime_BUILD_UNIT_TESTS=OFF"
)
# build.sh must run from the source root; env -C changes directory for that command only.
step "build ONNX Runtime and the Node.js binding (hours on an Orin Nano)" env -C "$SRC_DIR" "${BUILD_ARGS[@]}"

# js/node's CMake copies only libonnxruntime.so next to the binding; the providers must sit beside it too.
PROVIDER_LIBS=(libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so)
if [[ "$USE_TENSORRT" -eq 1 ]]; then PROVIDER_LIBS+=(libonnxruntime_providers_tensorrt.so); fi
for lib in "${PROVIDER_LIBS[@]}"; do
  step "copy $lib next to the binding" cp -L "$BUILD_DIR/$lib" "$NODE_BIN/"
done

STAGE="$OUT_DIR/stage/onnxruntime-node"
step "stage the onnxruntime-node package" mkdir -p "$STAGE/bin/napi-v6/linux" "$OUT_DIR"
step "copy the JavaScript (dist/)" cp -R "$SRC_DIR/js/node/dist" "$STAGE/dist"
# npm drops symbolic links from tarballs, so the libraries are copied as plain files (-L).
step "copy the native binaries" cp -RL "$NODE_BIN" "$STAGE/bin/napi-v6/linux/arm64"
step "write package.json and edgelora-build.json" python3 - "$SRC_DIR" "$STAGE" "$ORT_VERSION" "$CUDA_ARCH" "$USE_TENSORRT" "$PATCH_OPTIONS" "$CUDA_HOME_DIR" <<'PY'
import json, subprocess, sys, datetime, pathlib
src, stage, version, arch, trt, patched, cuda_home = sys.argv[1:8]
pkg = json.loads((pathlib.Path(src) / "js/node/package.json").read_text())
out = {k: pkg[k] for k in ("name", "description", "license", "repository", "main", "types", "os") if k in pkg}
out["version"] = version
# No install scripts: the registry package's postinstall downloads x64 CUDA binaries, which do not apply here.
out["dependencies"] = {"onnxruntime-common": version}
out["files"] = ["dist", "bin", "edgelora-build.json"]
(pathlib.Path(stage) / "package.json").write_text(json.dumps(out, indent=2) + "\n")
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip() or None
    except Exception:
        return None
build = {
    "builtBy": "edgelora native/build-ort-jetson.sh",
    "onnxruntime": version,
    "cudaArchitectures": arch,
    "providers": ["cuda", "tensorrt"] if trt == "1" else ["cuda"],
    "providerOptionsPatch": patched == "1",
    "cuda": sh(f"'{cuda_home}/bin/nvcc' --version | sed -n 's/.*release \\([0-9.]*\\).*/\\1/p'"),
    "l4t": sh("head -n1 /etc/nv_tegra_release"),
    "builtAt": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
(pathlib.Path(stage) / "edgelora-build.json").write_text(json.dumps(build, indent=2) + "\n")
PY
step "pack onnxruntime-node" npm pack --pack-destination "$OUT_DIR" "$STAGE"
step "pack onnxruntime-common (same version, from the same source)" npm pack --ignore-scripts --pack-destination "$OUT_DIR" "$SRC_DIR/js/common"

cat <<EOF

Next, in your edgelora checkout (or the project that depends on it):
  npm install $OUT_DIR/onnxruntime-common-$ORT_VERSION.tgz $OUT_DIR/onnxruntime-node-$ORT_VERSION.tgz
  edgelora doctor      # should list TensorRT and CUDA as "yes" under "probed"
EOF
