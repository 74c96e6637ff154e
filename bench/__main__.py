"""The main job: runs the suites that fit this device and writes bench/results/<device>/.

On a CPU it takes a few minutes and measures the torch reference only: the fused kernels' figures
need a GPU (under the CPU interpreter Triton is a correctness tool, not a timing one).
"""
import sys
import time

import torch

from . import bench_ops


def main():
    t0 = time.time()
    if not torch.cuda.is_available():
        print("No GPU here: timing the torch reference on the CPU only. The fused-kernel figures, floors and "
              "ratios need a CUDA GPU (see README for the latest GPU results).", flush=True)
    bench_ops.main(sys.argv[1:])
    print(f"main job done in {time.time() - t0:.0f} s; results under bench/results/", flush=True)


main()
