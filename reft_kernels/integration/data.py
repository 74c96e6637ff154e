"""Training data for ReftModel with the stock transformers Trainer: one example per prompt/answer pair,
and a collator that pads a batch of them (intervention_locations padded with -1, "no edit").

    examples = [reft_example(tok(p).input_ids, tok(a).input_ids, reft.reft_config, reft.num_interventions)
                for p, a in pairs]
    trainer = transformers.Trainer(model=reft, train_dataset=examples, data_collator=ReftDataCollator(tok.pad_token_id),
                                   args=TrainingArguments(..., remove_unused_columns=False))

Trainer needs remove_unused_columns=False: otherwise it drops the columns ReftModel.forward does not name
(intervention_locations is named, but the base model's other inputs travel as **kwargs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import ReftConfig
from .positions import scheme_locations

IGNORE_INDEX = -100


def reft_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], config: ReftConfig, num_interventions: int,
                 positions: Optional[str] = None) -> dict:
    """One causal-LM training example: input_ids = prompt + answer, labels = -100 on the prompt, and
    intervention_locations [n_interventions, P] from the prompt (config.positions or `positions`, which may
    also be "last")."""
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
    locs = scheme_locations(mask, positions if positions is not None else config.positions,
                            num_interventions=num_interventions, share_weights=config.share_weights)
    return {"input_ids": torch.tensor(prompt_ids + answer_ids), "labels": torch.tensor(
        [IGNORE_INDEX] * len(prompt_ids) + answer_ids), "intervention_locations": locs[0]}


class ReftDataCollator:
    """Pads a list of examples into a batch.

    Each example: input_ids [T] (list or tensor), optional attention_mask [T] and labels [T],
    intervention_locations [n_interventions, P] (P may differ between examples), and any other per-token
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
        n = {x.shape[0] for x in locs}
        if len(n) != 1 or any(x.dim() != 2 for x in locs):
            raise ValueError(f"every example's intervention_locations must be [n_interventions, P] with one "
                             f"n_interventions; got shapes {[tuple(x.shape) for x in locs]}")
        P = max(x.shape[1] for x in locs)
        batch["intervention_locations"] = torch.stack([
            torch.nn.functional.pad(torch.where(x >= 0, x + s, -1), (0, P - x.shape[1]), value=-1)
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


__all__ = ["IGNORE_INDEX", "ReftDataCollator", "reft_example"]
