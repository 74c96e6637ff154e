"""pyreft's calling conventions on a ReftModel: what converts, what errors and what they say.

A pyreft user's code calls `reft_model.generate(prompt, unit_locations={"sources->base": (None, locs)},
intervene_on_prompt=True, ...)` and unpacks `_, out = ...` (pyvene returns the pair (original output or
None, intervened output)). ReftModel.forward and .generate accept that form where it is unambiguous, and then
return pyreft's pair, so that ported code runs unchanged and correct; the native form
(`reft.generate(input_ids=..., attention_mask=..., intervention_locations=...)`) returns what transformers'
generate returns. Without this, `_, out = reft.generate(...)` on a native call with a batch of two rows
silently unpacks the two rows.

What a pyreft-style call is: any of pyreft's arguments `base` (a tokenizer output, by keyword or as the first
positional argument), `unit_locations`, `intervene_on_prompt`, `sources`, `source_representations`,
`subspaces`, `output_original_output`. Converted:
- base: its entries (input_ids, attention_mask, ...) become the base model's inputs.
- unit_locations: {"sources->base": (None, L)} or {"base": L} with L nested [n_interventions][B][P] (or a
  tensor of that shape), an int (every intervention, every row, that position), or a flat list of positions
  (every intervention, every row) becomes intervention_locations [B, n_interventions, P].
- intervene_on_prompt=True: what ReftModel.generate always does (the prompt is edited, generated tokens
  are not); dropped.
- output_original_output=True: the first element of the pair is the unedited output (the base model called
  with the same arguments), as in pyvene.
Refused with a ValueError that says what to pass instead: source (interchange) interventions (`sources`,
`source_representations`, a source side in unit_locations with sources given), `subspaces`,
`intervene_on_prompt=False` (pyvene then edits every generated token, which ReftModel does not do), both
unit_locations and intervention_locations, and unit_locations whose shape does not fit the adapter.

PYREFT_METHODS maps the pyreft/pyvene methods a ReftModel does not have to their replacements, for the
AttributeError that ReftModel raises when one is called.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

PYREFT_ARGUMENTS = ("base", "unit_locations", "intervene_on_prompt", "sources", "source_representations",
                    "subspaces", "output_original_output", "intervention_additional_kwargs")

_NATIVE = ("reft.generate(input_ids=..., attention_mask=..., intervention_locations=reft.locations("
           "attention_mask), max_new_tokens=...)")

# pyvene's IntervenableModel / pyreft's ReftModel methods -> what to use on a reft_kernels ReftModel
PYREFT_METHODS = {
    "save": "reft.save_pretrained(dir) (reft_kernels' format), or reft.save_pretrained(dir, format='pyreft') "
            "for a directory pyreft's ReftModel.load reads",
    "load": "reft_kernels.ReftModel.from_pretrained(model, dir) for a directory written by save_pretrained, "
            "reft_kernels.load_pyreft(model, dir) for one written by pyreft's ReftModel.save",
    "save_intervention": "reft.save_pretrained(dir)",
    "load_intervention": "reft_kernels.ReftModel.from_pretrained(model, dir)",
    "set_device": "reft.to(device) (moves the base model and the interventions)",
    "get_device": "reft.device",
    "count_parameters": "reft.trainable_parameters() (trainable, total)",
    "get_trainable_parameters": "[p for p in reft.parameters() if p.requires_grad] (only the interventions and "
                                "unfrozen_modules train)",
    "set_zero_grad": "reft.zero_grad()",
    "enable_model_gradients": "ReftConfig(unfrozen_modules=[...]) (base-model modules trained and saved with the "
                              "adapter), or get_reft_model(model, config, freeze=False)",
    "disable_model_gradients": "get_reft_model(model, config) (it freezes the base model)",
    "disable_intervention_gradients": "reft.interventions.requires_grad_(False)",
    "set_temperature": "nothing: reft_kernels' interventions have no temperature",
    "get_cached_activations": "a forward hook on the base model's block (reft.model): ReftModel collects no "
                              "activations",
}


def pyreft_method_hint(cls_name: str, name: str) -> Optional[str]:
    """The AttributeError message for a pyreft method `name`, or None when it is not one."""
    use = PYREFT_METHODS.get(name)
    if use is None:
        return None
    return f"{cls_name} has no {name}() (pyreft's ReftModel has): use {use}"


def is_pyreft_call(first: Any, kwargs: dict) -> bool:
    """Whether a forward/generate call uses pyreft's conventions (module docstring)."""
    return isinstance(first, Mapping) or any(k in kwargs for k in PYREFT_ARGUMENTS)


def _base_inputs(base: Any, kwargs: dict) -> dict:
    if not isinstance(base, Mapping):
        raise TypeError(f"pyreft's base must be the tokenizer's output (a dict with input_ids, attention_mask), "
                        f"got {type(base).__name__}; or write {_NATIVE}")
    clash = sorted(set(base) & set(kwargs))
    if clash:
        raise ValueError(f"{clash} given both in pyreft's base dict and as keyword arguments; give them once")
    return dict(base)


def _nested(value: Any, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"unit_locations: {what} must be [n_interventions][B][P] integer positions, the same P for "
                         f"every row ({e}); or pass intervention_locations [B, n_interventions, P] with -1 for no "
                         "edit (reft.locations(attention_mask) builds it)") from None
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 3:
        raise ValueError(f"unit_locations: {what} must be [n_interventions][B][P] integer positions, got shape "
                         f"{tuple(t.shape)} of {t.dtype}; or pass intervention_locations [B, n_interventions, P]")
    return t


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _locations(unit_locations: Any, batch: int, num_interventions: int, has_sources: bool) -> torch.Tensor:
    """pyvene's unit_locations, read as its _broadcast_unit_locations reads them (base side) -> [B, n, P]."""
    if not isinstance(unit_locations, Mapping) or len(unit_locations) != 1 or \
            next(iter(unit_locations)) not in ("sources->base", "base"):
        raise ValueError(f"unit_locations must be {{'sources->base': (None, locations)}} or {{'base': locations}} "
                         f"(pyreft's forms), got {unit_locations!r}")
    key, value = next(iter(unit_locations.items()))
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if _is_int(value):  # one position for every intervention and row
        return torch.full((batch, num_interventions, 1), value, dtype=torch.long)
    if pair and (_is_int(value[0]) or value[0] is None) and _is_int(value[1]):  # (source, base) positions
        return torch.full((batch, num_interventions, 1), value[1], dtype=torch.long)
    if pair and _is_int(value[0]) and value[1] is None:
        raise ValueError("unit_locations gives a source position only; reft_kernels edits the base: "
                         "{'sources->base': (None, base_locations)}")
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):  # [p0, p1, ...]: every row
        row = torch.as_tensor(value, dtype=torch.long)
        return row.expand(batch, num_interventions, row.numel()).clone()
    if key == "sources->base":
        if not pair:
            raise ValueError(f"unit_locations['sources->base'] must be (source_locations, base_locations), e.g. "
                             f"(None, [[[position]]]), got {value!r}")
        if value[0] is not None and has_sources:
            raise ValueError("source (interchange) interventions are not supported by reft_kernels: pass "
                             "unit_locations={'sources->base': (None, base_locations)} without sources")
        value = value[1]  # the base side; a source side without sources is ignored, as pyvene does
    if value is None:
        raise ValueError("unit_locations: the base locations are None (pyvene then edits every position); give "
                         "the positions to edit")
    locs = _nested(value, "the base locations")
    if locs.shape[0] != num_interventions or locs.shape[1] != batch:
        raise ValueError(f"unit_locations gives [n_interventions={locs.shape[0]}][B={locs.shape[1]}][P] locations; this "
                         f"adapter has {num_interventions} interventions and the batch {batch} rows. pyreft's "
                         f"[[[pos]]] covers one intervention: give one list per intervention, or pass "
                         "intervention_locations=reft.locations(attention_mask)")
    return locs.transpose(0, 1).to(torch.long)


def convert(first: Any, kwargs: dict, num_interventions: int, generating: bool) -> tuple[dict, bool]:
    """A pyreft-style call's arguments as ReftModel's (module docstring): returns (kwargs for the native call,
    output_original_output). `first` is the first positional argument (pyreft's base, or input_ids)."""
    kwargs = dict(kwargs)
    if isinstance(first, Mapping):
        if "base" in kwargs:
            raise ValueError("pyreft's base given twice (positionally and as base=)")
        kwargs["base"] = first
    elif first is not None:
        if "input_ids" in kwargs:
            raise ValueError("input_ids given twice")
        kwargs["input_ids"] = first
    sources = kwargs.pop("sources", None)
    if sources is not None and any(s is not None for s in (sources if isinstance(sources, list) else [sources])):
        raise ValueError("sources (interchange interventions) are not supported by reft_kernels' ReftModel; a ReFT "
                         f"adapter edits the base's own hidden states: {_NATIVE}")
    if kwargs.pop("source_representations", None) is not None:
        raise ValueError("source_representations are not supported by reft_kernels' ReftModel (ReFT edits need no "
                         "source)")
    if kwargs.pop("subspaces", None) is not None:
        raise ValueError("subspaces are not supported by reft_kernels' ReftModel: an intervention edits its whole "
                         "rank-r subspace")
    if kwargs.pop("intervention_additional_kwargs", None):
        raise ValueError("intervention_additional_kwargs are not supported by reft_kernels' ReftModel")
    on_prompt = kwargs.pop("intervene_on_prompt", None)
    if on_prompt is not None and not generating:
        raise ValueError("intervene_on_prompt is a generate() argument")
    if on_prompt is False:
        raise ValueError("intervene_on_prompt=False (pyvene then edits every generated token, not the prompt) is not "
                         "supported: reft_kernels' generate edits the prompt at intervention_locations, as pyreft's "
                         "intervene_on_prompt=True does; drop the argument")
    original = bool(kwargs.pop("output_original_output", False))
    if "base" in kwargs:
        base = _base_inputs(kwargs.pop("base"), kwargs)
        kwargs.update(base)
    unit_locations = kwargs.pop("unit_locations", None)
    if unit_locations is not None:
        if kwargs.get("intervention_locations") is not None:
            raise ValueError("give unit_locations (pyreft's form) or intervention_locations, not both")
        batch = _batch_size(kwargs)
        kwargs["intervention_locations"] = _locations(unit_locations, batch, num_interventions, sources is not None)
    return kwargs, original


def _batch_size(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        x = kwargs.get(key)
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    raise ValueError(f"pass the prompt: pyreft's base dict with input_ids (tok(prompt, return_tensors='pt')), or "
                     f"{_NATIVE}")


__all__ = ["PYREFT_ARGUMENTS", "PYREFT_METHODS", "convert", "is_pyreft_call", "pyreft_method_hint"]
