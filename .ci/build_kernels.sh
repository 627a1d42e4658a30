#!/usr/bin/env bash
# Builds the CUDA kernels standalone (CMake + nvcc, sm_80 and sm_90, no torch), syntax-checks
# the torch host code in csrc/ against the installed torch's headers, and runs the GPU tests
# when a GPU is present.  Works on a machine without a GPU: compiling needs only nvcc.
#
#   .ci/build_kernels.sh            # BUILD_DIR (default build/kernels), JOBS (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/kernels}"
JOBS="${JOBS:-2}"

NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ ! -x "$NVCC" ]]; then
  echo "build_kernels: nvcc not found (set CUDACXX)" >&2
  exit 1
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

echo "== configure ($NVCC, sm_80 + sm_90)"
cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="80;90" -DCMAKE_BUILD_TYPE=Release
echo "== build"
cmake --build "$BUILD_DIR" -j "$JOBS"

echo "== syntax-check csrc/ against torch's headers"
if python -c "import torch" 2>/dev/null; then
  mapfile -t TORCH_INCLUDES < <(python -c "
import sysconfig, torch.utils.cpp_extension as ext
for path in ext.include_paths() + [sysconfig.get_paths()['include']]:
    print('-isystem' + path)")
  # the toolkit CMake found (nvcc may be a wrapper script outside the toolkit)
  CUDA_INCLUDE="$(sed -n 's/^set(CMAKE_CUDA_COMPILER_TOOLKIT_ROOT "\(.*\)")$/\1/p' \
    "$BUILD_DIR"/CMakeFiles/*/CMakeCUDACompiler.cmake)/include"
  pids=()
  for source in "$ROOT"/csrc/*.cpp; do
    "${CXX:-g++}" -fsyntax-only -std=c++17 -Wall -Wextra -Werror "${TORCH_INCLUDES[@]}" \
      -isystem "$CUDA_INCLUDE" -I"$ROOT/kernels" -DTORCH_EXTENSION_NAME=_C "$source" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  [[ $status -eq 0 ]] || { echo "build_kernels: csrc/ syntax check failed" >&2; exit 1; }
  echo "csrc/ OK"
else
  echo "torch is not importable here: skipped"
fi

echo "== test"
if nvidia-smi >/dev/null 2>&1; then
  ctest --test-dir "$BUILD_DIR" --output-on-failure
else
  echo "no GPU (nvidia-smi failed): skipped the kernel tests"
fi
