"""reft-kernels: fused GPU kernels for ReFT (representation finetuning).

    import reft_kernels as rk
    hidden = rk.loreft(hidden, positions, R, W, b)      # the fused ops: LoReFT, in place
    hidden = rk.direft(hidden, positions, W1, b, W2)    # DiReFT (the paper's), in place
    edit = rk.LoReFT(4096, 4)                           # modules: LoReFT, NoReFT, ConsReFT, LobiReFT,
    hidden = edit(hidden, positions)                    #   DiReFT, OrthoDiReFT
    bank = rk.stack_adapters([...])                     # many adapters at one site, an adapter per row:
    hidden = rk.mixed_reft_edit(hidden, positions, adapter_ids, bank)   # (flat: rk.mixed_reft_edit_flat)
    with rk.orthonormal_batch(model): ...               # every R of a model in one batched computation
    reft = rk.get_reft_model(hf_model, rk.ReftConfig(...))   # Hugging Face models: train, generate, save
    reft.load_adapter("dir/", adapter_name="b")              # named adapters; reft(..., adapter_names=[...])
    data = rk.make_data_module(tok, reft, prompts, answers)  # Trainer(model=reft, args=..., **data)
    reft = rk.load_pyreft(hf_model, "pyreft_dir/")           # pyreft checkpoints in (rk.save_pyreft: out)

CUDA tensors run the Triton kernels; CPU tensors the fused C++ kernels of csrc/ (compiled on first use,
see reft_kernels.extension), or the PyTorch reference where no compiler is available.
"""
from ._version import __version__
from . import extension  # the C++ CPU kernels (csrc/), built or loaded on first use: rk.extension.available()
from .backend import BACKEND_ENV
from .modules import (BY_PYREFT_NAME, INTERVENTIONS, ConsReFT, DiReFT, LobiReFT, LoReFT, NoReFT, OrthoDiReFT,
                      Orthonormal, ReftIntervention, orthonormal_batch, orthonormality_error)
from .integration import (COMPONENTS, Adapter, ReftConfig, ReftDataCollator, ReftModel, Representation,
                          get_reft_model, last_token_locations, make_data_module,
                          make_last_position_supervised_data_module, make_multiple_position_supervised_data_module,
                          prefix_suffix_locations, read_adapter, reft_example)
from .interop import load_pyreft, save_pyreft
from .ops import (AdapterBank, AdapterParams, EditSpec, direft, loreft, mixed_reft_edit, mixed_reft_edit_flat,
                  orthonormalize, reft_edit, stack_adapters)

__all__ = [
    "Adapter", "AdapterBank", "AdapterParams", "BACKEND_ENV", "BY_PYREFT_NAME", "COMPONENTS", "ReftConfig",
    "ReftDataCollator", "ReftModel", "Representation", "get_reft_model", "last_token_locations", "load_pyreft",
    "make_data_module", "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
    "save_pyreft", "prefix_suffix_locations", "read_adapter", "reft_example", "ConsReFT", "DiReFT", "EditSpec",
    "INTERVENTIONS", "LoReFT", "LobiReFT",
    "NoReFT", "OrthoDiReFT", "Orthonormal", "ReftIntervention", "direft", "loreft", "orthonormal_batch",
    "mixed_reft_edit", "mixed_reft_edit_flat", "orthonormality_error", "orthonormalize", "reft_edit",
    "stack_adapters", "__version__",
]
