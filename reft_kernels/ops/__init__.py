"""Kernels and their ops. Model integration lives outside this package."""
from .fused_edit import EditSpec, direft, edit_reference, loreft, reft_edit

__all__ = ["EditSpec", "direft", "edit_reference", "loreft", "reft_edit"]
