"""Interop with pyreft 0.1.0 (on pyvene 0.1.8).

- pyreft_checkpoint: load_pyreft / save_pyreft read and write pyreft's checkpoint directories with a
  ReftModel (no pyreft import needed).
- pyreft_dropin: pyreft's six intervention classes, same names, keywords and state-dict keys, computing
  with the fused op; for people who stay on pyreft's API (imports pyvene, so it is not imported here).
"""
from .pyreft_checkpoint import load_pyreft, orthogonal_state, orthogonal_weight, save_pyreft

__all__ = ["load_pyreft", "orthogonal_state", "orthogonal_weight", "save_pyreft"]
