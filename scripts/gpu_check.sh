#!/usr/bin/env bash
# Everything a GPU session checks, in one command for the device tool (see README "GPU checks"):
#   the test suite on the GPU (bf16 too), then the op benchmark (with pyreft beside it when its wheels are
#   carried) and, with --tune, the block-shape sweep. Logs and a tarball of the run folder (bench/runs/) go to $OUT.
# Usage (repo root, on the GPU machine):  bash scripts/gpu_check.sh [--tests-only|--bench-only] [--tune]
#                                          [--suites=ops,orthonormal,convergence,train_step,generate,pyreft_dropin,adapters]
# The CUDA host path (csrc/edit_cuda.cu) is built with nvcc on first use, by tests/test_cuda_host.py and by
# the ops suite's small-N figures: expect about a minute once per machine (cached under TORCH_EXTENSIONS_DIR;
# a later call that gets a fresh machine builds it again).
# One device call runs at most 10 minutes; tests plus the whole benchmark will not fit in one, and the
# benchmark alone has not been timed on a GPU yet. Split it, e.g.
#   --tests-only;  --bench-only --suites=ops,orthonormal,convergence;  --bench-only --suites=train_step,generate,pyreft_dropin;
#   --bench-only --suites=adapters
# Carried folders (ignored by git): .gpu/whl (expecttest, which opcheck needs; accelerate, which the Trainer
# tests need; matplotlib and its wheels for the plots, optional: without it the suites note "not drawn")
# and .gpu/pyreft-whl (pyreft, pyvene, transformers 4.45.1 and friends: ../shared/tools/pyreft-wheels.sh).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
run_tests=1; run_bench=1; tune=""; suites=""
for a in "$@"; do
  case $a in
    --tests-only) run_bench=0 ;; --bench-only) run_tests=0 ;; --tune) tune="--tune" ;;
    --suites=*) suites="--suites ${a#--suites=}" ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
status=0
if [ $run_tests = 1 ]; then
  python3 -m pytest tests -q -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25
  status=${PIPESTATUS[0]}
fi
if [ $run_bench = 1 ]; then
  bench_path=$PYTHONPATH
  if [ -d .gpu/pyreft-whl ]; then
    # pyreft pins transformers 4.45.1: its own folder, first on the path of the benchmark process only
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyreft-site .gpu/pyreft-whl/*.whl \
      && bench_path=/tmp/pyreft-site:$PYTHONPATH
  fi
  PYTHONPATH=$bench_path python3 -m bench $suites $tune 2>&1 | tee "$OUT/bench.log" | grep -v "^  ops:" | tail -60
  status=$(( status | PIPESTATUS[0] ))
  tar czf "$OUT/results.tar.gz" bench/runs
fi
exit $status
