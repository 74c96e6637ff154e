"""Kernels and their ops (reference, Triton kernels, launchers, registered ops, autograd, public
functions). Modules live in reft_kernels.modules; model integration outside both."""
from .fused_edit import EditSpec, direft, edit_reference, loreft, reft_edit
from .orthonormal import orthonormalize, orthonormalize_reference

__all__ = ["EditSpec", "direft", "edit_reference", "loreft", "orthonormalize", "orthonormalize_reference", "reft_edit"]
