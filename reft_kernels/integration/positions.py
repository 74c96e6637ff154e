"""Intervention locations from an attention mask, on the mask's device, with no host sync.

ReftModel.forward takes `intervention_locations` [B, n_interventions, P] int64 in pyreft's layout:
intervention i edits row b at positions locations[b, i, :], and -1 means "no edit" (pyreft points such
slots at a prepended pad token instead; here they are simply skipped).

    locs = prefix_suffix_locations(prompt_mask, "f5+l5", num_interventions=16)          # tied
    locs = prefix_suffix_locations(prompt_mask, "f5+l5", num_interventions=32, share_weights=False)
    locs = last_token_locations(prompt_mask, num_interventions=16)

The mask marks the prompt tokens (1) of each row; they must be contiguous, which holds for left and right
padding alike: a row's prompt starts at its first 1 and is mask.sum() long. For training data the mask is
the prompt's (not the prompt + answer's): positions are counted in the prompt, which sits at the same
offsets in the full sequence when the answer follows it.

"f{p}+l{s}" follows pyreft's get_intervention_locations: a prompt of n tokens gets its first min(p, n//2)
and last min(s, n//2) tokens edited (so the two never overlap), and the rest of the p + s slots are -1.
- share_weights=True (or only one of p, s): every intervention sees prefix and suffix: P = p + s.
- share_weights=False with both: the first half of the interventions sees the prefix, the second half the
  suffix (pyreft's layers + layers convention; see ReftConfig), P = max(p, s).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

_SPEC = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
    """"f5+l5" -> (5, 5); "f3" -> (3, 0); "l1" -> (0, 1)."""
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if m is None or (m.group(1) is None and m.group(2) is None) or ("+" in spec and None in m.groups()):
        raise ValueError(f"positions must look like 'f{{p}}+l{{s}}', 'f{{p}}' or 'l{{s}}' (e.g. 'f5+l5'), got {spec!r}")
    first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    if first + last == 0:
        raise ValueError(f"positions {spec!r} selects no token")
    return first, last


def _prompt_bounds(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start [B] and length [B] (int64) of each row's prompt."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a [B, T] tensor of 0/1, got {shape}")
    mask = attention_mask != 0
    length = mask.sum(1)
    start = mask.to(torch.uint8).argmax(1)  # the first 1 (0 for an empty row, whose length is 0 anyway)
    return start, length


def prefix_suffix_locations(attention_mask: torch.Tensor, positions: str = "f1+l1", *, num_interventions: int,
                            share_weights: bool = True) -> torch.Tensor:
    """Locations [B, num_interventions, P] int64 for "f{p}+l{s}" (module docstring), on the mask's device."""
    first, last = parse_positions(positions)
    if not isinstance(num_interventions, int) or num_interventions < 1:
        raise ValueError(f"num_interventions must be a positive int, got {num_interventions!r}")
    untied = not share_weights and first > 0 and last > 0
    if untied and num_interventions % 2:
        raise ValueError(f"share_weights=False with {positions!r} needs an even num_interventions (prefix half, "
                         f"suffix half), got {num_interventions}")
    start, length = _prompt_bounds(attention_mask)
    half = length // 2
    n_first, n_last = half.clamp(max=first), half.clamp(max=last)  # pyreft: min(n // 2, p)
    dev = attention_mask.device
    i = torch.arange(first, device=dev)
    j = torch.arange(last, device=dev)
    # prefix slot i: start + i while i < n_first; suffix slot j: start + length - n_last + j while j < n_last
    pre = torch.where(i < n_first[:, None], start[:, None] + i, -1)
    suf = torch.where(j < n_last[:, None], (start + length - n_last)[:, None] + j, -1)
    B = attention_mask.shape[0]
    if not untied:
        row = torch.cat([pre, suf], 1)  # [B, p + s]
        return row[:, None, :].expand(B, num_interventions, row.shape[1]).contiguous()
    P = max(first, last)
    pre = torch.nn.functional.pad(pre, (0, P - first), value=-1)
    suf = torch.nn.functional.pad(suf, (0, P - last), value=-1)
    h = num_interventions // 2
    return torch.cat([pre[:, None, :].expand(B, h, P), suf[:, None, :].expand(B, h, P)], 1).contiguous()


def last_token_locations(attention_mask: torch.Tensor, *, num_interventions: int) -> torch.Tensor:
    """Locations [B, num_interventions, 1]: each row's last prompt token (-1 for an empty row)."""
    if not isinstance(num_interventions, int) or num_interventions < 1:
        raise ValueError(f"num_interventions must be a positive int, got {num_interventions!r}")
    start, length = _prompt_bounds(attention_mask)
    last = torch.where(length > 0, start + length - 1, -1)
    return last[:, None, None].expand(-1, num_interventions, 1).contiguous()


def scheme_locations(attention_mask: torch.Tensor, positions: Optional[str], *, num_interventions: int,
                     share_weights: bool = True) -> torch.Tensor:
    """Locations [B, num_interventions, P] for an adapter's position scheme: "last" or "f{p}+l{s}"
    (ReftConfig.positions; None raises, naming the fix)."""
    if positions is None:
        raise ValueError("the ReftConfig's positions is not set; pass positions='f5+l5' (or 'last')")
    if positions == "last":
        return last_token_locations(attention_mask, num_interventions=num_interventions)
    return prefix_suffix_locations(attention_mask, positions, num_interventions=num_interventions,
                                   share_weights=share_weights)


def check_locations(locations, batch: int, num_interventions: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Validates [B, n, P] locations (shape and dtype only: values on a GPU would need a sync; the kernels
    skip out-of-range positions) and returns them as int64 [n, B, P], contiguous, on `device`: one slice per
    intervention, so no per-layer copy is needed."""
    if isinstance(locations, (list, tuple)):
        locations = torch.as_tensor(locations, dtype=torch.long)
    if not isinstance(locations, torch.Tensor):
        raise TypeError(f"intervention_locations must be a tensor [B, n_interventions, P], got {type(locations).__name__}")
    if locations.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"intervention_locations must be int32 or int64, got {locations.dtype}")
    if locations.dim() != 3 or locations.shape[0] != batch or locations.shape[1] != num_interventions:
        raise ValueError(f"intervention_locations must be [B={batch}, n_interventions={num_interventions}, P], got "
                         f"shape {tuple(locations.shape)}")
    if device is not None and locations.device != device:
        locations = locations.to(device, non_blocking=True)
    return locations.transpose(0, 1).to(torch.long).contiguous()


__all__ = ["check_locations", "last_token_locations", "parse_positions", "prefix_suffix_locations",
           "scheme_locations"]
