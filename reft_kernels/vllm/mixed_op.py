"""The mixed-adapter edit the vLLM plugin calls (issue 15's op, reft_kernels.ops.mixed_edit): the one place
the plugin takes it from.

A site's bank is an AdapterBank.empty serving bank (slots written in place by set_slot / clear_slot), and
one step's edit of a site and pass is one mixed_reft_edit_flat(hidden, rows, ids, bank, rows_unique=True)
call: one launch whatever the number of adapters (C++ kernel on CPU tensors, Triton on CUDA), no host sync.
The rows are unique by construction (state.py), hence rows_unique=True.
"""
from ..ops.mixed_edit import AdapterBank, AdapterParams, mixed_reft_edit_flat

__all__ = ["AdapterBank", "AdapterParams", "mixed_reft_edit_flat"]
