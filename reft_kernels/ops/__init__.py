"""Kernels and their ops (reference, Triton kernels, launchers, registered ops, autograd, public
functions). Modules live in reft_kernels.modules; model integration outside both."""
from .fused_edit import EditSpec, direft, edit_reference, loreft, reft_edit
from .mixed_edit import AdapterBank, AdapterParams, mixed_reft_edit, mixed_reft_edit_flat, stack_adapters
from .orthonormal import orthonormalize, orthonormalize_reference

__all__ = ["AdapterBank", "AdapterParams", "EditSpec", "direft", "edit_reference", "loreft", "mixed_reft_edit",
           "mixed_reft_edit_flat", "orthonormalize", "orthonormalize_reference", "reft_edit", "stack_adapters"]
