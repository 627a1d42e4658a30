#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in stages that each fit one device call:
#
#   bash benchmarks/gpu_session.sh tests       # GPU parity tests (triton, cuda incl. its JIT build)
#   bash benchmarks/gpu_session.sh kernels     # CMake build + ctest + compute-sanitizer memcheck/racecheck
#   bash benchmarks/gpu_session.sh ops         # fused-op benchmarks -> benchmarks/results/ops-<gpu>-<date>.json
#   bash benchmarks/gpu_session.sh step        # headline training step -> benchmarks/results/<gpu>-<date>.{json,md}
#   bash benchmarks/gpu_session.sh conv        # prologue-fused Triton conv vs cuDNN -> benchmarks/results/conv-<gpu>-<date>.json
#
# Extra arguments go to the command of the stage (e.g. `ops -k bf16` to split the op
# benchmarks over two calls, `step --steps 1 --precisions bf16` for part of the table: the
# compiled rows take minutes each to compile, so the whole step table needs several calls).
# Result files are written by the runs themselves; commit them unedited (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
gpu="$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-").lower())')"
today="$(date -u +%F)"

stage="${1:-}"
shift || true
case "$stage" in
  tests)
    python -m pytest tests -q -x -p no:cacheprovider -k "cuda or triton or fused or gpu" "$@" ;;
  kernels)
    bash .ci/build_kernels.sh
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 1 build/kernels/test_kernels
    done ;;
  ops)
    python -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider \
      --benchmark-json "benchmarks/results/ops-$gpu-$today.json" "$@" ;;
  step)
    python -m pyeuler bench --profile --no-progress --out benchmarks/results "$@" ;;
  conv)
    python -m pytest benchmarks/test_bench_conv_prologue.py -q -p no:cacheprovider \
      --benchmark-json "benchmarks/results/conv-$gpu-$today.json" "$@" ;;
  *)
    echo "usage: $0 tests|kernels|ops|step|conv" >&2
    exit 2 ;;
esac
