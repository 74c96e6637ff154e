"""reft-kernels: fused GPU kernels for ReFT (representation finetuning).

    import reft_kernels
    hidden = reft_kernels.loreft(hidden, positions, R, W, b)      # LoReFT, in place
    hidden = reft_kernels.direft(hidden, positions, W1, b, W2)    # DiReFT, in place
"""
from .backend import BACKEND_ENV
from .ops import EditSpec, direft, loreft, reft_edit

__version__ = "0.1.0"
__all__ = ["BACKEND_ENV", "EditSpec", "direft", "loreft", "reft_edit", "__version__"]
