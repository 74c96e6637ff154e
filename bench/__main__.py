"""The main job: runs the suites that fit this device and writes bench/results/<device>/.

Suites: ops (the fused edit), orthonormal (keeping R orthonormal per training step), convergence (the
default R parametrization against pyreft's exact one on a memorization task), train_step (a whole
training step of a Llama-shaped model against the bias-hook floor, pyreft and LoRA), generate (time to
first token and per generated token against plain generate) and pyreft_dropin (pyreft's own training
loop with its interventions against reft_kernels' drop-in classes; only where pyreft imports) and adapters
(mixed-adapter batches: the mixed op against a loop over adapters and plain torch, A = 1 to 512). On a CPU
it takes about 4 minutes on a fresh 2-core machine, setup included, and times the fused C++ CPU kernels
(csrc/) and the torch providers: the fused Triton kernels' figures need a GPU (under the CPU interpreter
Triton is a correctness tool, not a timing one). Each suite writes <suite>.md, .csv,
.json and PNG plots (bench/plots.py); on a terminal a progress bar runs over the suites and their cases.

    python -m bench                                  # every suite
    python -m bench --suites train_step generate     # some of them (names as above); other arguments go
                                                     # to the ops suite (--n, --tune) and --out to all
"""
import sys
import time

import torch

from . import (bench_adapters, bench_convergence, bench_generate, bench_ops, bench_orthonormal, bench_pyreft_dropin,
               bench_train_step)
from . import harness as H

SUITES = ("ops", "orthonormal", "convergence", "train_step", "generate", "pyreft_dropin", "adapters")


def _take_suites(argv):
    """(suites to run, argv without --suites and its names)."""
    if "--suites" not in argv:
        return list(SUITES), argv
    i = argv.index("--suites")
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    names = [n for arg in argv[i + 1:j] for n in arg.split(",") if n]
    unknown = sorted(set(names) - set(SUITES))
    if unknown or not names:
        sys.exit(f"--suites takes names from {', '.join(SUITES)}; got {argv[i + 1:j]}")
    return [s for s in SUITES if s in names], argv[:i] + argv[j:]


def main():
    t0 = time.time()
    if not torch.cuda.is_available():
        print("No GPU here: timing the fused C++ CPU kernels and the torch providers on the CPU. The fused "
              "Triton kernels' figures, floors and ratios need a CUDA GPU (see README for the latest GPU "
              "results).", flush=True)
    suites, argv = _take_suites(sys.argv[1:])
    out = argv[argv.index("--out") + 1:argv.index("--out") + 2] if "--out" in argv else []
    out_args = ["--out", *out] if out else []
    runs = {
        "ops": lambda: bench_ops.main(argv),
        "orthonormal": lambda: bench_orthonormal.main(out_args),
        "convergence": lambda: bench_convergence.main(out_args),
        "train_step": lambda: bench_train_step.main(out_args),
        "generate": lambda: bench_generate.main(out_args),
        "pyreft_dropin": lambda: bench_pyreft_dropin.main(out_args),
        "adapters": lambda: bench_adapters.main(out_args),
    }
    # a bar over the suites on a terminal ("suite k/n: name" lines in a log); long suites nest their own
    for name in H.progress(suites, "suite", label=str):
        t = time.time()
        if name == "pyreft_dropin" and H.import_pyreft()[0] is None:
            # pyreft pins transformers 4.45.1, so the main environment does not have it; the GPU script
            # carries it (scripts/gpu_check.sh), and tests_pyreft/ checks the drop-ins against it in CI
            print(f"suite pyreft_dropin skipped: pyreft does not import here ({H.import_pyreft()[1]})", flush=True)
            continue
        runs[name]()
        print(f"suite {name} done in {time.time() - t:.0f} s", flush=True)
    where = out[0] if out else f"bench/results/{H.device_slug()}"
    print(f"main job done in {time.time() - t0:.0f} s; results (markdown, CSV, JSON, PNG plots) under {where}/",
          flush=True)
    if not torch.cuda.is_available():
        print("These are CPU figures: the fused C++ CPU kernels (provider cpp) against the torch reference. The "
              "fused Triton kernels' times, their floors and the training and generation overheads that the "
              "README quotes need a CUDA GPU (bash scripts/gpu_check.sh).", flush=True)


main()
