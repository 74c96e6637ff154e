"""Hugging Face integration: ReftConfig, ReftModel / get_reft_model, intervention locations, training data.
Kernels and modules live in reft_kernels.ops and reft_kernels.modules; this package only hooks them in."""
from .adapters import Adapter, read_adapter
from .config import ReftConfig, Representation
from .data import (IGNORE_INDEX, ReftDataCollator, make_data_module, make_last_position_supervised_data_module,
                   make_multiple_position_supervised_data_module, reft_example)
from .locate import COMPONENTS, component_site, find_layers
from .model import ReftModel, get_reft_model
from .positions import last_token_locations, parse_positions, prefix_suffix_locations

__all__ = ["Adapter", "COMPONENTS", "IGNORE_INDEX", "ReftConfig", "ReftDataCollator", "ReftModel", "Representation",
           "component_site", "find_layers", "get_reft_model", "last_token_locations", "make_data_module",
           "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
           "parse_positions", "prefix_suffix_locations", "read_adapter", "reft_example"]
