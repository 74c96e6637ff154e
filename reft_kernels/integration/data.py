"""Training data for ReftModel with the stock transformers Trainer: one example per prompt/answer pair,
and a collator that pads a batch of them (intervention_locations padded with -1, "no edit").

From text, in one call (pyreft's make_last_position_supervised_data_module /
make_multiple_position_supervised_data_module, which are kept as aliases of it):

    data = rk.make_data_module(tok, reft, prompts, answers)      # positions: the adapter's (reft_config)
    trainer = transformers.Trainer(model=reft, args=TrainingArguments("out", ...), **data)

From token ids:

    examples = [reft_example(tok(p).input_ids, tok(a).input_ids, reft.reft_config, reft.num_interventions)
                for p, a in pairs]
    trainer = transformers.Trainer(model=reft, train_dataset=examples, data_collator=ReftDataCollator(tok.pad_token_id),
                                   args=TrainingArguments(...))

remove_unused_columns. transformers' Trainer (5.x and 4.45 alike; it is on by default) keeps only the
dataset columns that name a parameter of inspect.signature(model.forward). ReftModel.forward's signature
shows input_ids, attention_mask, labels, intervention_locations and every named input of the base model's
forward (token_type_ids, position_ids, pixel_values, ...), so nothing these helpers or a base model needs is
dropped, and remove_unused_columns=False is needed only for columns the base model does not name either
(a field that a custom collator consumes, for instance).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .adapters import BASE
from .config import ReftConfig, check_scheme
from .model import ReftModel
from .positions import scheme_locations

IGNORE_INDEX = -100


def _token_ids(ids: Any, name: str) -> list[int]:
    """Token ids as a list: a list/tuple of ints, a 1-D tensor, or a [1, T] tensor (what
    tok(text, return_tensors="pt").input_ids gives)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be the token ids of one example: a list of ints, a [T] or a [1, T] integer "
                             f"tensor; got a {ids.dtype} tensor of shape {tuple(ids.shape)} (for a batch, call "
                             "reft_example once per row)")
        return ids.tolist()
    if isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return list(ids)
    if isinstance(ids, (list, tuple)) and len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        return _token_ids(list(ids[0]), name)  # tok([text]).input_ids: one row
    raise ValueError(f"{name} must be the token ids of one example (a list of ints, a [T] or [1, T] integer tensor), "
                     f"got {type(ids).__name__}")


def reft_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], config: ReftConfig, num_interventions: int,
                 positions: Optional[str] = None, adapter_name: Optional[str] = None) -> dict:
    """One causal-LM training example: input_ids = prompt + answer, labels = -100 on the prompt, and
    intervention_locations [n_interventions, P] from the prompt (config.positions or `positions`: "f{p}+l{s}"
    or "last"). prompt_ids / answer_ids: a list of ints, a [T] tensor or a [1, T] tensor (tokenizer output
    with return_tensors="pt"). adapter_name: the adapter this example trains (a batch of several adapters:
    the example carries "adapter_names", which ReftDataCollator collects into the forward's adapter_names)."""
    prompt_ids, answer_ids = _token_ids(prompt_ids, "prompt_ids"), _token_ids(answer_ids, "answer_ids")
    mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
    locs = scheme_locations(mask, positions if positions is not None else config.positions,
                            num_interventions=num_interventions, share_weights=config.share_weights)
    return _example(prompt_ids, answer_ids, locs[0], adapter_name)


def _example(prompt_ids: list[int], answer_ids: list[int], locations: torch.Tensor,
             adapter_name: Optional[str]) -> dict:
    example = {"input_ids": torch.tensor(prompt_ids + answer_ids, dtype=torch.long), "labels": torch.tensor(
        [IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long), "intervention_locations": locations}
    if adapter_name is not None:
        example["adapter_names"] = adapter_name
    return example


def make_data_module(tokenizer, reft_model, prompts: Sequence[str], outputs: Sequence[str], *,
                     positions: Optional[str] = None, nonstop: bool = False, padding_side: str = "right",
                     adapter_names: Optional[Sequence[str]] = None) -> dict:
    """From (prompts, outputs) text pairs to what transformers.Trainer takes:
    {"train_dataset": [examples], "eval_dataset": None, "data_collator": ReftDataCollator}, so that
    `Trainer(model=reft_model, args=..., **make_data_module(tok, reft_model, prompts, outputs))` trains.

    As pyreft's data modules: each example is tokenizer(prompt + output) (+ the EOS token unless nonstop),
    truncated to tokenizer.model_max_length, with the loss on the output's tokens only (the first
    len(tokenizer(prompt)) tokens are the prompt), and intervention locations from the prompt. (pyreft appends
    the EOS token's text before tokenizing; here its id is appended, which no truncation or tokenizer can lose.)

    positions: the position scheme ("f{p}+l{s}" or "last"); default the adapter's reft_config.positions. If
    the adapter has none yet, the one given is recorded in its reft_config (ReftModel.locations() and
    save_pretrained then use it); one that differs from the adapter's is an error.
    adapter_names: one adapter name per example, to train several adapters at once (mixed batches: each
    adapter gets the gradient of its own examples); each example's locations follow its adapter's position
    scheme (positions= does not apply). None: the active adapter (several composed: their locations one
    after the other).
    padding_side: of the collator ("right" for training)."""
    if not isinstance(reft_model, ReftModel):
        raise TypeError(f"reft_model must be the reft_kernels ReftModel (get_reft_model(model, config)), whose "
                        f"num_interventions and positions the examples follow; got {type(reft_model).__name__}")
    if isinstance(prompts, str) or isinstance(outputs, str) or len(prompts) != len(outputs):
        raise ValueError("prompts and outputs must be two lists of strings of the same length")
    if adapter_names is not None:
        if positions is not None:
            raise ValueError("positions= does not combine with adapter_names (each example follows its adapter's "
                             "scheme)")
        if isinstance(adapter_names, str) or len(adapter_names) != len(prompts):
            raise ValueError(f"adapter_names must list one adapter per example ({len(prompts)}), got "
                             f"{adapter_names!r:.80}")
        reft_model._row_names(list(adapter_names), len(prompts))  # known names (or "__base__")
        missing = sorted({n for n in adapter_names if n != BASE and reft_model.adapters[n].config.positions is None})
        if missing:
            raise ValueError(f"adapter(s) {missing} have no position scheme: set ReftConfig(positions=...)")
        layout = [(reft_model.adapters[n].config, reft_model.adapters[n].num_interventions, n) if n != BASE else
                  (None, 0, n) for n in adapter_names]
    elif len(reft_model.active_adapters) != 1:
        if positions is not None:
            raise ValueError("positions= overrides one adapter's scheme; several are active: set each ReftConfig's")
        layout = [(None, -1, None)] * len(prompts)  # composed: reft_model.locations() of each prompt
    else:
        config = reft_model.reft_config
        scheme = check_scheme(positions) if positions is not None else config.positions
        if scheme is None:
            raise ValueError("no position scheme: pass positions='f5+l5' (or 'last'), or set ReftConfig(positions=...)")
        if config.positions is None:
            config.positions = scheme
        elif scheme != config.positions:
            raise ValueError(f"positions={scheme!r}, but the adapter was configured with positions="
                             f"{config.positions!r} (what reft.locations() gives at generation): use one scheme")
        layout = [(config, reft_model.num_interventions, None)] * len(prompts)
    eos = tokenizer.eos_token_id
    if not nonstop and eos is None:
        raise ValueError("the tokenizer has no eos_token_id to end each output with; pass nonstop=True")
    longest = getattr(tokenizer, "model_max_length", None)
    if not isinstance(longest, int) or longest >= 2**31:  # transformers' "no limit" is 1e30
        longest = None
    limit = dict(truncation=True, max_length=longest) if longest else {}
    examples = []
    for prompt, output, (config, n_interventions, name) in zip(prompts, outputs, layout):
        prompt_ids = tokenizer(prompt, **limit)["input_ids"]
        ids = list(tokenizer(prompt + output, **limit)["input_ids"])
        if not nonstop and (not ids or ids[-1] != eos):
            ids = (ids[: longest - 1] if longest and len(ids) >= longest else ids) + [eos]
        n = len(prompt_ids)
        mask = torch.ones(1, n, dtype=torch.long)
        if config is not None:
            locations = scheme_locations(mask, config.positions, num_interventions=n_interventions,
                                         share_weights=config.share_weights)[0]
        elif name == BASE:  # a row trained with no edit
            locations = torch.full((1, 1), -1, dtype=torch.long)
        else:  # composed adapters: their locations one after the other
            locations = reft_model.locations(mask)[0]
        examples.append(_example(ids[:n], ids[n:], locations, name))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return {"train_dataset": examples, "eval_dataset": None,
            "data_collator": ReftDataCollator(pad_token_id=pad, padding_side=padding_side)}


def _pyreft_module(tokenizer, model, inputs, outputs, positions, num_interventions, nonstop, share_weights):
    if not isinstance(model, ReftModel):
        raise TypeError(f"model must be the reft_kernels ReftModel (get_reft_model(model, config)); pyreft's data "
                        f"modules took the base model, these take the adapter, whose interventions and positions "
                        f"the examples follow. Got {type(model).__name__}")
    if num_interventions is not None and num_interventions != model.num_interventions:
        raise ValueError(f"num_interventions={num_interventions}, but the adapter has {model.num_interventions}")
    if share_weights is not None and share_weights != model.reft_config.share_weights:
        raise ValueError(f"share_weights={share_weights}, but the adapter's ReftConfig has share_weights="
                         f"{model.reft_config.share_weights}: set it in ReftConfig(..., share_weights=...)")
    return make_data_module(tokenizer, model, inputs, outputs, positions=positions, nonstop=nonstop)


def make_last_position_supervised_data_module(tokenizer, model, inputs, outputs, num_interventions=None,
                                              nonstop=False) -> dict:
    """pyreft's name and arguments, for ported scripts: make_data_module(..., positions="last"). model is the
    ReftModel; num_interventions, if given, must equal its num_interventions."""
    return _pyreft_module(tokenizer, model, inputs, outputs, "last", num_interventions, nonstop, None)


def make_multiple_position_supervised_data_module(tokenizer, model, inputs, outputs, positions="f1+l1",
                                                  num_interventions=None, nonstop=False, share_weights=None) -> dict:
    """pyreft's name and arguments, for ported scripts: make_data_module(..., positions=positions). model is the
    ReftModel; num_interventions and share_weights, if given, must match it (pyreft's share_weights=False
    becomes ReftConfig(share_weights=False))."""
    return _pyreft_module(tokenizer, model, inputs, outputs, positions, num_interventions, nonstop, share_weights)


class ReftDataCollator:
    """Pads a list of examples into a batch.

    Each example: input_ids [T] (list or tensor), optional attention_mask [T] and labels [T],
    intervention_locations [n_interventions, P] (P may differ between examples; n too when the examples carry
    "adapter_names", one adapter name each: they become the batch's adapter_names list), and any other per-token
    field of the same length (e.g. token_type_ids, padded with 0) or scalar (e.g. a class label). A scalar
    "label" or "label_ids" becomes "labels", as transformers' collators do.
    padding_side "right" (training) or "left" (positions are shifted by each row's padding).
    """

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right", label_pad_id: int = IGNORE_INDEX):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.padding_side, self.label_pad_id = int(pad_token_id), padding_side, label_pad_id

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        T = max(len(x) for x in ids)
        left = self.padding_side == "left"
        shifts = [T - len(x) if left else 0 for x in ids]

        def pad(x, value):
            x = torch.as_tensor(x)
            n = T - x.shape[0]
            return torch.nn.functional.pad(x, (n, 0) if left else (0, n), value=value)

        batch = {"input_ids": torch.stack([pad(x, self.pad_token_id) for x in ids])}
        masks = [torch.as_tensor(f.get("attention_mask", torch.ones(len(x), dtype=torch.long))) for f, x in
                 zip(features, ids)]
        batch["attention_mask"] = torch.stack([pad(m, 0) for m in masks])
        locs = [torch.as_tensor(f["intervention_locations"], dtype=torch.long) for f in features]
        mixed = "adapter_names" in features[0]
        if any(x.dim() != 2 for x in locs) or (not mixed and len({x.shape[0] for x in locs}) != 1):
            raise ValueError(f"every example's intervention_locations must be [n_interventions, P] with one "
                             f"n_interventions (examples of several adapters: give each its adapter_names); got "
                             f"shapes {[tuple(x.shape) for x in locs]}")
        if mixed:
            names = [f.get("adapter_names") for f in features]
            if not all(isinstance(n, str) for n in names):
                raise ValueError(f"every example of a batch with adapter_names must name its adapter (a str), got "
                                 f"{names}")
            batch["adapter_names"] = names
        n = max(x.shape[0] for x in locs)  # a mixed batch: rows of adapters with fewer interventions padded
        P = max(x.shape[1] for x in locs)
        batch["intervention_locations"] = torch.stack([
            torch.nn.functional.pad(torch.where(x >= 0, x + s, -1), (0, P - x.shape[1], 0, n - x.shape[0]), value=-1)
            for x, s in zip(locs, shifts)])
        for key in features[0]:
            if key in batch:
                continue
            values = [f[key] for f in features]
            first = torch.as_tensor(values[0])
            if first.dim() == 0:
                name = "labels" if key in ("label", "label_ids") else key
                batch[name] = torch.stack([torch.as_tensor(v) for v in values])
            else:
                fill = self.label_pad_id if key == "labels" else 0
                batch[key] = torch.stack([pad(v, fill) for v in values])
        return batch


__all__ = ["IGNORE_INDEX", "ReftDataCollator", "make_data_module", "make_last_position_supervised_data_module",
           "make_multiple_position_supervised_data_module", "reft_example"]
