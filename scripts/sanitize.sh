#!/usr/bin/env bash
# `make sanitize`: the C++ CPU kernels (csrc/) under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# REFT_KERNELS_SANITIZE=1 makes reft_kernels.extension build csrc/ with -fsanitize=address,undefined under its
# own extension name (reft_kernels_cpp_<isa>_asan_<key>, cached beside the normal build, never replacing it) and load
# that build. Then the C++ tests, the registered ops' refusals (single- and mixed-adapter) and a batch of
# property-based cases (tests/test_fuzz.py, the cpp backend, both ops) run through it. Any ASan report or UBSan finding aborts the process,
# so the run fails.
#
# Loading an ASan-instrumented library into python needs the ASan runtime first in the process: python itself
# is not instrumented, so libasan is preloaded (LD_PRELOAD, the compiler's own libasan.so; its libubsan comes
# in as a dependency of the library). libstdc++ is preloaded right after it: python does not link it, and
# without it ASan cannot resolve the real __cxa_throw, so the first C++ exception (a TORCH_CHECK) aborts with
# "CHECK failed: asan_interceptors.cpp ... real___cxa_throw". detect_leaks=0: the interpreter and torch keep
# allocations alive at exit by design, which LeakSanitizer would report as leaks. Reports go to files (pytest
# captures stderr, and an aborted process never prints what it captured); the script prints them on failure.
#
# Usage: scripts/sanitize.sh [python] (default .venv/bin/python); FUZZ_EXAMPLES=<n> sets the fuzz batch size.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CXX=${CXX:-c++}

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize: $CXX has no libasan.so (install the compiler's sanitizer runtime, e.g. libasan8)" >&2
  exit 1
fi
REPORTS=$(mktemp -d)
report() {
  status=$?
  if ls "$REPORTS"/* > /dev/null 2>&1; then
    echo "sanitize: reports ($REPORTS):" >&2
    cat "$REPORTS"/* >&2
    status=1
  fi
  [ "$status" = 0 ] && echo "sanitize: no ASan or UBSan report"
  exit "$status"
}
trap report EXIT

export REFT_KERNELS_SANITIZE=1
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"
export REFT_FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-300}"  # per fuzz test (the CI profile's cases, then more)

# the sanitized build loads (and says which it is) before any test runs
"$PY" -c "
import re
import reft_kernels.extension as e
ok, how = e.load()
assert ok and re.search(r'_asan(_[0-9a-f]+)?$', how), how  # the name ends _asan, then the build key
print('sanitize: loaded', how)
"
# The single-adapter op (test_cpp_kernels, test_op_validation) and the mixed-adapter op (test_mixed_op_validation
# whole; test_mixed_edit's C++ tests: those whose id names cpp), then the fuzz tests of the C++ backend, both ops.
# Left out: the tests that spawn their own builds or interpreters (a wheel build, the fallbacks when the
# compiler or the extension is switched off), torch.compile with inductor (it compiles and loads C++ of its own),
# and the fuzz and mixed tests of the other backends (the cpp-against-Triton mask test too: its cost is the
# Triton interpreter's, and dropout_is_repeatable[cpp] runs the same C++ path).
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_cpp_kernels.py tests/test_op_validation.py tests/test_mixed_op_validation.py tests/test_mixed_edit.py \
  tests/test_fuzz.py \
  -k "not wheel and not fallback_without and not switched_off and not mask_cpp_equals_triton and not inductor \
      and (cpp or not (fuzz or test_mixed_edit))"
