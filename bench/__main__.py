"""The main job: runs the suites that fit this device and writes bench/results/<device>/.

Suites: ops (the fused edit), orthonormal (keeping R orthonormal per training step), convergence (the
default R parametrization against pyreft's exact one on a memorization task). On a CPU it takes a few
minutes and times the torch providers only: the fused kernels' figures need a GPU (under the CPU
interpreter Triton is a correctness tool, not a timing one).
"""
import sys
import time

import torch

from . import bench_convergence, bench_ops, bench_orthonormal


def main():
    t0 = time.time()
    if not torch.cuda.is_available():
        print("No GPU here: timing the torch providers on the CPU only. The fused-kernel figures, floors and "
              "ratios need a CUDA GPU (see README for the latest GPU results).", flush=True)
    argv = sys.argv[1:]
    out = argv[argv.index("--out") + 1:argv.index("--out") + 2] if "--out" in argv else []
    print("suite 1/3: ops", flush=True)
    bench_ops.main(argv)
    print("suite 2/3: orthonormal", flush=True)
    bench_orthonormal.main(["--out", *out] if out else [])
    print("suite 3/3: convergence", flush=True)
    bench_convergence.main(["--out", *out] if out else [])
    print(f"main job done in {time.time() - t0:.0f} s; results under bench/results/", flush=True)


main()
