#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in stages that each fit one device call:
#
#   bash benchmarks/gpu_session.sh first       # a first session in ONE call of <= 10 min: tests, K=1 bf16 step rows, kernels
#   bash benchmarks/gpu_session.sh tests       # GPU parity tests (triton, cuda incl. its JIT build) -> tests-<gpu>-<date>.log
#   bash benchmarks/gpu_session.sh kernels     # CMake build + ctest + compute-sanitizer memcheck/racecheck -> kernels-<gpu>-<date>.log
#   bash benchmarks/gpu_session.sh ops         # fused-op benchmarks -> ops-<gpu>-<date>.json
#   bash benchmarks/gpu_session.sh step        # headline training step -> <gpu>-<date>.{json,md}
#   bash benchmarks/gpu_session.sh conv        # prologue-fused Triton conv vs cuDNN -> conv-<gpu>-<date>.json
#
# Files go to $PYEULER_RESULTS (default benchmarks/results): on a lent machine from which
# only one folder comes back, point it there.  Extra arguments go to the command of the
# stage (e.g. `ops -k bf16` to split the op benchmarks over two calls, `step --steps 1
# --precisions bf16` for part of the table: the compiled rows take minutes each to compile,
# so the whole step table needs several calls).  Result files are written by the runs
# themselves; commit them unedited (docs/benchmarks.md §7).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results="$(realpath -m "${PYEULER_RESULTS:-benchmarks/results}")"
mkdir -p "$results"
gpu="$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-").lower())')"
today="$(date -u +%F)"

stage="${1:-}"
shift || true
case "$stage" in
  first)
    # Each stage is capped so that the next one still runs inside one 10-minute call; the
    # step rows are written after each row and the logs as they go, so a capped stage
    # still leaves what it finished.  K=1 first: the headline row.
    status=0
    timeout 290 bash "$0" tests || status=1
    timeout 200 bash "$0" step --steps 1 0 --grads unrolled --precisions bf16 \
      --backends reference triton cuda --no-compile --cuda-graph --warmup 2 --iters 10 || status=1
    timeout 80 bash "$0" kernels || status=1
    exit "$status" ;;
  tests)
    # The kernels that never ran compiled first (a capped run may not reach the rest); no -x:
    # on a first GPU run one failure must not hide the others; -v names each result as it
    # happens, so a capped run still says which passed and which failed.
    first_files=(tests/test_triton_primitives.py tests/test_fused_backends.py
                 tests/test_gradient_relay.py tests/test_capture.py tests/test_cuda_backend.py)
    others=(tests)
    for file in "${first_files[@]}"; do others+=(--ignore="$file"); done
    options=(-v --tb=short -rfE --maxfail=50 -p no:cacheprovider -k "cuda or triton or fused or gpu")
    {
      status=0
      python -m pytest "${first_files[@]}" "${options[@]}" "$@" || status=1
      python -m pytest "${others[@]}" "${options[@]}" "$@" || status=1
      exit "$status"
    } 2>&1 | tee -a "$results/tests-$gpu-$today.log" ;;
  kernels)
    {
      bash .ci/build_kernels.sh
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 1 build/kernels/test_kernels
      done
    } 2>&1 | tee -a "$results/kernels-$gpu-$today.log" ;;
  ops)
    python -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider \
      --benchmark-json "$results/ops-$gpu-$today.json" "$@" ;;
  step)
    python -m pyeuler bench --profile --no-progress --out "$results" "$@" 2>&1 \
      | tee -a "$results/step-$gpu-$today.log" ;;
  conv)
    python -m pytest benchmarks/test_bench_conv_prologue.py -q -p no:cacheprovider \
      --benchmark-json "$results/conv-$gpu-$today.json" "$@" ;;
  *)
    echo "usage: $0 first|tests|kernels|ops|step|conv" >&2
    exit 2 ;;
esac
