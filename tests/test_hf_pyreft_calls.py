"""What a pyreft user's code does on reft_kernels (issue 19): pyreft's call forms are converted where
unambiguous (and return pyreft's pair), refused with what to pass otherwise; pyreft's methods name their
replacements; config mistakes a pyreft user makes fail at once with a message that teaches."""
import warnings

import pytest
import torch

import reft_kernels as rk
from hf_models import VOCAB, tiny_model


def _reft(layers=(0, 2), positions="l1"):
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(
        [{"layer": l, "low_rank_dimension": 2, "dtype": torch.float32} for l in layers], positions=positions))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return reft


def _prompt(B=2, T=6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :2] = 0
        ids[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_pyreft_generate_call_is_converted_and_returns_the_pair():
    reft = _reft()
    prompt = _prompt()
    locs = reft.locations(prompt["attention_mask"])  # [B, n, P]
    want = reft.generate(**prompt, intervention_locations=locs, **GEN)
    unit = locs.transpose(0, 1).tolist()  # pyreft's [n][B][P]
    # pyreft's script, unchanged: the tokenizer output positionally, unit_locations, intervene_on_prompt
    original, out = reft.generate(prompt, unit_locations={"sources->base": (None, unit)}, intervene_on_prompt=True,
                                  **GEN)
    assert original is None and torch.equal(out, want)
    original, out = reft.generate(base=prompt, unit_locations={"base": unit}, output_original_output=True, **GEN)
    assert torch.equal(out, want) and torch.equal(original, reft.model.generate(**prompt, **GEN))
    # pyvene's broadcast forms: one int (every intervention, every row), a flat list of positions
    last = prompt["input_ids"].shape[1] - 1
    every = reft.generate(**prompt, intervention_locations=torch.full((2, 2, 1), last), **GEN)
    assert torch.equal(reft.generate(prompt, unit_locations={"base": last}, **GEN)[1], every)
    assert torch.equal(reft.generate(prompt, unit_locations={"sources->base": (None, last)}, **GEN)[1], every)
    assert torch.equal(reft.generate(prompt, unit_locations={"base": [last]}, **GEN)[1], every)


def test_native_generate_returns_what_transformers_returns():
    reft = _reft()
    prompt = _prompt(B=1)
    out = reft.generate(**prompt, intervention_locations=reft.locations(prompt["attention_mask"]), **GEN)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"intervene_on_prompt": False}, "intervene_on_prompt=False"),
    ({"sources": [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]}, "sources"),
    ({"subspaces": [[0]]}, "subspaces"),
    ({"unit_locations": {"sources->base": (None, [[[5]]])}}, r"n_interventions=1.*2 interventions"),
    ({"unit_locations": {"sources->base": (None, [[[5], [1, 2]], [[5], [1]]])}}, "the same P for every row"),
    ({"unit_locations": {"base": 5}, "intervention_locations": torch.zeros(2, 2, 1, dtype=torch.long)}, "not both"),
    ({"unit_locations": {"source": 5}}, "sources->base"),
])
def test_pyreft_arguments_that_cannot_convert_say_what_to_pass(kwargs, match):
    reft = _reft()
    with pytest.raises(ValueError, match=match):
        reft.generate(_prompt(), **kwargs, **GEN)


def test_pyreft_forward_call_is_converted():
    reft = _reft()
    prompt = _prompt()
    locs = reft.locations(prompt["attention_mask"])
    want = reft(**prompt, intervention_locations=locs).logits
    original, out = reft(prompt, unit_locations={"sources->base": (None, locs.transpose(0, 1).tolist())},
                         output_original_output=True)
    assert torch.equal(out.logits, want)
    assert torch.equal(original.logits, reft.model(**prompt).logits)
    with pytest.raises(ValueError, match="pass input_ids or inputs_embeds"):
        reft(intervention_locations=locs)


def test_pyreft_methods_name_their_replacements():
    reft = _reft()
    for name, use in (("save", "save_pretrained"), ("set_device", r"reft\.to\(device\)"),
                      ("get_device", r"reft\.device"), ("count_parameters", "trainable_parameters")):
        with pytest.raises(AttributeError, match=use):
            getattr(reft, name)
    with pytest.raises(AttributeError, match=r"ReftModel.from_pretrained\(model, dir\).*load_pyreft"):
        rk.ReftModel.load("adapter/", reft.model)
    assert not hasattr(reft, "save") and not hasattr(reft, "no_such_thing")
    with pytest.raises(AttributeError, match="no_such_thing"):
        reft.no_such_thing


def test_from_pretrained_takes_pyreft_argument_order(tmp_path):
    reft = _reft()
    reft.save_pretrained(tmp_path)
    prompt = _prompt()
    locs = reft.locations(prompt["attention_mask"])
    loaded = rk.ReftModel.from_pretrained(str(tmp_path), tiny_model("llama"))  # pyreft's (directory, model)
    assert torch.equal(loaded(**prompt, intervention_locations=locs).logits,
                       reft(**prompt, intervention_locations=locs).logits)
    with pytest.raises(TypeError, match="model must be the base"):
        rk.ReftModel.from_pretrained(str(tmp_path), str(tmp_path))


def test_config_mistakes_a_pyreft_user_makes():
    # positions="last", as locations(), reft_example() and the errors suggest
    cfg = rk.ReftConfig({"layer": 0, "low_rank_dimension": 2}, positions="last")
    assert not cfg.untied and rk.ReftConfig.from_json(cfg.to_json()) == cfg
    reft = rk.get_reft_model(tiny_model("llama"), cfg)
    assert reft.locations(torch.tensor([[0, 1, 1]])).tolist() == [[[2]]]
    with pytest.raises(ValueError, match="'last'"):
        rk.ReftConfig({"layer": 0, "low_rank_dimension": 2}, positions="first")
    # a representation without its rank (pyreft requires it; it used to become rank 1)
    with pytest.raises(ValueError, match=r"representations\[1\].*no low_rank_dimension"):
        rk.ReftConfig([{"layer": 0, "low_rank_dimension": 2}, {"layer": 1}])
    # pyreft's intervention instance in the representation
    with pytest.raises(TypeError, match=r"not an instance.*'intervention': 'loreft'"):
        rk.ReftConfig({"layer": 0, "low_rank_dimension": 4, "intervention": rk.LoReFT(48, 4)})
    # field types, at construction
    for bad, match in (({"dropout": 1.5}, "dropout"), ({"act": "foo"}, "act='foo'"), ({"dtype": "int8"}, "dtype"),
                       ({"parametrization": "qr"}, "parametrization"), ({"low_rank_dimension": "4"}, "int >= 1"),
                       ({"intervention": "consreft", "act": "relu"}, "no W h"), ({"add_bias": "yes"}, "add_bias")):
        with pytest.raises((TypeError, ValueError), match=match):
            rk.ReftConfig({"layer": 0, "low_rank_dimension": 2, **bad})
    with pytest.raises(TypeError, match="share_weights"):
        rk.ReftConfig({"layer": 0, "rank": 1}, share_weights="no")
    assert rk.ReftConfig({"layer": 0, "rank": 1}, unfrozen_modules="score").unfrozen_modules == ["score"]


def test_module_constructor_checks_act_and_backend():
    with pytest.raises(ValueError, match="act='foo' is not a transformers ACT2FN name"):
        rk.LoReFT(16, 2, act="foo")
    with pytest.raises(ValueError, match="no fused kernel"):
        rk.LoReFT(16, 2, act="relu6", backend="cpp")
    assert rk.LoReFT(16, 2, act="relu6", backend="torch").act == "relu6"
    with pytest.raises(ValueError, match="backend must be"):
        rk.LoReFT(16, 2, backend="cuda")
    with pytest.raises(ValueError, match="1 <= rank <= dim"):
        rk.DiReFT(16, True)


def test_a_second_adapter_on_the_same_base_warns_and_both_stay_correct():
    base = tiny_model("llama")
    first = rk.get_reft_model(base, rk.ReftConfig({"layer": 0, "low_rank_dimension": 2, "dtype": torch.float32},
                                                  positions="l1"))
    prompt = _prompt()
    locs = first.locations(prompt["attention_mask"])
    with torch.no_grad():
        for p in first.interventions.parameters():
            p.add_(0.5)
    a = first(**prompt, intervention_locations=locs).logits
    with pytest.warns(UserWarning, match="already carries the hooks of 1 other ReftModel"):
        second = rk.get_reft_model(base, rk.ReftConfig({"layer": 1, "low_rank_dimension": 2, "dtype": torch.float32},
                                                       positions="l1"))
    with torch.no_grad():
        for p in second.interventions.parameters():
            p.add_(0.5)
    b = second(**prompt, intervention_locations=locs).logits
    assert torch.equal(first(**prompt, intervention_locations=locs).logits, a)  # each edits only in its own calls
    first.remove_hooks()
    assert torch.equal(second(**prompt, intervention_locations=locs).logits, b)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        first(**prompt, intervention_locations=locs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the removed one no longer counts
        rk.get_reft_model(tiny_model("llama"), rk.ReftConfig({"layer": 0, "rank": 1})).remove_hooks()
        second.remove_hooks()
        rk.get_reft_model(base, rk.ReftConfig({"layer": 0, "rank": 1}))
