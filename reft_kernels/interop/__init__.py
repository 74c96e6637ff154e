"""Interop with pyreft 0.1.0 (on pyvene 0.1.8).

- pyreft_checkpoint: load_pyreft / save_pyreft read and write pyreft's checkpoint directories with a
  ReftModel (no pyreft import needed). Importing it registers the "pyreft" checkpoint format with the
  integration layer (integration/formats.py), which never imports this package: rk.read_adapter and
  ReftModel.load_adapter read pyreft directories, save_pretrained(format="pyreft") writes them.
- pyreft_dropin: pyreft's six intervention classes, same names, keywords and state-dict keys, computing
  with the fused op; for people who stay on pyreft's API (imports pyvene, so it is not imported here).
"""
from .pyreft_checkpoint import load_pyreft, orthogonal_state, orthogonal_weight, save_pyreft

__all__ = ["load_pyreft", "orthogonal_state", "orthogonal_weight", "save_pyreft"]
