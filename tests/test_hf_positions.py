"""Intervention locations from attention masks, the config, and the training collator (CPU, no model)."""
import pytest
import torch

import reft_kernels as rk
from reft_kernels.integration.positions import check_locations, parse_positions


def _pyreft_locations(n: int, first: int, last: int, num: int, share: bool) -> list[list[int]]:
    """pyreft's get_intervention_locations for a prompt of n tokens, with its pad slots written as -1
    (pyreft points them at a prepended pad token; here -1 means no edit)."""
    f, l = min(n // 2, first), min(n // 2, last)
    if share or first == 0 or last == 0:
        row = list(range(f)) + list(range(n - l, n)) + [-1] * ((first - f) + (last - l))
        return [row] * num
    left = list(range(f)) + [-1] * (first - f)
    right = list(range(n - l, n)) + [-1] * (last - l)
    width = max(len(left), len(right))
    left, right = left + [-1] * (width - len(left)), right + [-1] * (width - len(right))
    return [left] * (num // 2) + [right] * (num // 2)


@pytest.mark.parametrize("spec", ["f1+l1", "f5+l5", "f3+l1", "f2", "l3"])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_suffix_matches_pyreft(spec, share, side):
    first, last = parse_positions(spec)
    lengths = [1, 2, 3, 7, 12, 4]  # short prompts exercise pyreft's min(n // 2, p) clamp
    T = max(lengths) + 2
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    num = 4
    got = rk.prefix_suffix_locations(mask, spec, num_interventions=num, share_weights=share)
    assert got.dtype == torch.long and got.shape[:2] == (len(lengths), num)
    for b, n in enumerate(lengths):
        offset = T - n if side == "left" else 0
        want = _pyreft_locations(n, first, last, num, share)
        for i in range(num):
            got_set = sorted(p for p in got[b, i].tolist() if p >= 0)
            want_set = sorted(p + offset for p in want[i] if p >= 0)
            assert got_set == want_set, (b, i, got[b, i].tolist(), want[i])
            assert got.shape[2] == len(want[i])  # same slot count as pyreft


def test_last_token_and_empty_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = rk.last_token_locations(mask, num_interventions=2)
    assert got.tolist() == [[[4], [4]], [[1], [1]], [[-1], [-1]]]
    locs = rk.prefix_suffix_locations(mask, "f2+l2", num_interventions=1)
    assert (locs[2] == -1).all()


def test_parse_positions_errors():
    assert parse_positions("f5+l5") == (5, 5) and parse_positions("l2") == (0, 2)
    for bad in ["", "f0", "x5", "f5+", "5", "f5 l5", None]:
        with pytest.raises(ValueError, match="positions"):
            parse_positions(bad)
    with pytest.raises(ValueError, match="even"):
        rk.prefix_suffix_locations(torch.ones(1, 4), "f1+l1", num_interventions=3, share_weights=False)


def test_check_locations_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"intervention_locations must be \[B=2, n_interventions=3, P\]"):
        check_locations(torch.zeros(2, 2, 1, dtype=torch.long), 2, 3)
    with pytest.raises(TypeError, match="int32 or int64"):
        check_locations(torch.zeros(2, 3, 1), 2, 3)
    out = check_locations(torch.arange(12).view(2, 3, 2), 2, 3)
    assert out.shape == (3, 2, 2) and out.is_contiguous() and out[1, 0].tolist() == [2, 3]


def test_config_round_trip_and_errors():
    cfg = rk.ReftConfig([{"layer": 1, "intervention": "LoreftIntervention", "rank": 4, "dtype": "bfloat16"},
                         {"layer": 0, "component": "mlp_output", "intervention": rk.DiReFT, "low_rank_dimension": 2,
                          "act": "relu", "dropout": 0.1}], positions="f3+l3", share_weights=False)
    assert [r.intervention for r in cfg.representations] == ["loreft", "direft"]
    assert cfg.representations[0].dtype == torch.bfloat16 and cfg.untied
    assert [(r.layer, k) for r, k in cfg.interventions()] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    again = rk.ReftConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="component"):
        rk.ReftConfig({"layer": 0, "component": "mlp_input", "rank": 1})
    with pytest.raises(ValueError, match="intervention must be one of"):
        rk.ReftConfig({"layer": 0, "intervention": "lora", "rank": 1})
    with pytest.raises(ValueError, match="unknown representation keys"):
        rk.ReftConfig({"layer": 0, "low_rank": 4})
    with pytest.raises(ValueError, match="layer"):
        rk.ReftConfig({"layer": -1, "rank": 1})
    with pytest.raises(ValueError, match="add_bias"):
        rk.ReftConfig({"layer": 0, "intervention": "loreft", "add_bias": True, "rank": 1})


def test_reft_example_and_collator():
    cfg = rk.ReftConfig({"layer": 0, "rank": 1}, positions="f1+l1")
    ex1 = rk.reft_example([5, 6, 7, 8], [9, 10], cfg, 2)
    ex2 = rk.reft_example([5, 6], [9, 10, 11], cfg, 2)
    assert ex1["labels"].tolist() == [-100] * 4 + [9, 10]
    assert ex1["intervention_locations"].tolist() == [[0, 3], [0, 3]]
    right = rk.ReftDataCollator(pad_token_id=0)([ex1, ex2])
    assert right["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 9, 10, 11, 0]]
    assert right["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert right["labels"][1].tolist() == [-100, -100, 9, 10, 11, -100]
    assert right["intervention_locations"].tolist() == [[[0, 3], [0, 3]], [[0, 1], [0, 1]]]
    left = rk.ReftDataCollator(pad_token_id=0, padding_side="left")([ex1, ex2])
    assert left["input_ids"][1].tolist() == [0, 5, 6, 9, 10, 11]
    assert left["intervention_locations"][1].tolist() == [[1, 2], [1, 2]]  # shifted by the row's padding
    ex3 = dict(ex2, intervention_locations=torch.tensor([[1], [-1]]), label=2)
    ex1b = dict(ex1, label=0)
    batch = rk.ReftDataCollator()([ex1b, ex3])
    assert batch["intervention_locations"][1].tolist() == [[1, -1], [-1, -1]] and batch["labels"].tolist() == [0, 2]
