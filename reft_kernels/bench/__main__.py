"""python -m reft_kernels.bench: the same as `reft-kernels bench` (cli.py)."""
import sys

from .cli import main

sys.exit(main())
