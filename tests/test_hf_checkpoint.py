"""Checkpoints that cannot load wrong (issue 18, items 4 and 5): save_pretrained's integrity record, the
checks of every tensor against the config, and an error naming the file and the field for every corruption
of issue 18's campaign: truncation, flipped bytes, tensors missing, extra, reshaped or of another dtype,
config fields missing, wrong or of the wrong type, malformed JSON."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import reft_kernels as rk
from reft_kernels.integration.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from hf_models import VOCAB, tiny_model


def _saved(tmp_path, kind="loreft", act=None):
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(
        [{"layer": 0, "intervention": kind, "low_rank_dimension": 2, "dtype": "float32", "act": act},
         {"layer": 2, "component": "mlp_output", "intervention": "noreft", "low_rank_dimension": 3,
          "add_bias": True, "dtype": "bfloat16"}], positions="f1+l1"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    reft.save_pretrained(tmp_path)
    return reft


def _load(path, **kw):
    return rk.ReftModel.from_pretrained(tiny_model("llama"), path, **kw)


def _edit_json(path, change):
    with open(path / CONFIG_NAME) as f:
        meta = json.load(f)
    change(meta)
    with open(path / CONFIG_NAME, "w") as f:
        json.dump(meta, f)


def _edit_tensors(path, change):
    tensors = load_file(str(path / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def _logits(reft):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    return reft(input_ids=ids, attention_mask=mask, intervention_locations=reft.locations(mask)).logits


def test_round_trip_and_the_record(tmp_path):
    reft = _saved(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and set(meta["integrity"]) == {"algorithm", CONFIG_NAME, WEIGHTS_NAME}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = _load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(reft))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["header", "data", "end"])
def test_flipped_bytes_are_refused(tmp_path, where):
    _saved(tmp_path)
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    index = {"header": 20, "data": header + 37, "end": len(data) - 1}[where]
    data[index] ^= 0x10
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} does not match the integrity record.*verify=False"):
        _load(tmp_path)
    if where == "data":  # verify=False: a file edited on purpose loads (its structure still checked)
        _load(tmp_path, verify=False)


@pytest.mark.parametrize("keep", [0, 5, 100, -4])
def test_truncated_weights_are_refused(tmp_path, keep):
    _saved(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match="does not match the integrity record"):
        _load(tmp_path)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} cannot be read as safetensors.*truncated or corrupted"):
        _load(tmp_path, verify=False)


def test_truncated_or_broken_config_names_the_file_and_line(tmp_path):
    _saved(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} is not valid JSON \(.* at line \d+"):
        _load(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not UTF-8"):
        _load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        _load(tmp_path)


def _set(path, value):
    def change(meta):
        *parents, last = path
        node = meta
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


# (path into reft_config.json, new value or KeyError to delete it, what the error must say)
CONFIG_DAMAGE = [
    (("config",), KeyError, "the field 'config' is missing"),
    (("base_model",), KeyError, "the field 'base_model' is missing"),
    (("format_version",), KeyError, "'format_version' is missing"),
    (("format_version",), "2", "format_version must be int"),
    (("format_version",), 7, "format_version 7 .* newer reft_kernels"),
    (("format",), "pyreft", "format must be 'reft_kernels'"),
    (("config",), [], "config must be an object"),
    (("base_model", "hidden_size"), "48", "base_model.hidden_size must be int"),
    (("base_model", "num_layers"), KeyError, "the field 'base_model.num_layers' is missing"),
    (("base_model", "layers_path"), 3, "base_model.layers_path must be str or null"),
    (("config", "representations"), KeyError, "'representations' is missing"),
    (("config", "representations"), None, "representations must be a dict, a Representation or a list"),
    (("config", "representations"), [], "representations is empty"),
    (("config", "representations", 1, "low_rank_dimension"), KeyError, r"representations\[1\].*no low_rank_dimension"),
    (("config", "representations", 1, "low_rank_dimension"), "3", r"representations\[1\]: low_rank_dimension must be"),
    (("config", "representations", 0, "layer"), None, r"representations\[0\]: layer must be an int"),
    (("config", "representations", 0, "intervention"), "lora", r"representations\[0\]: intervention must be one of"),
    (("config", "representations", 0, "dtype"), "int32", r"representations\[0\]: dtype must be"),
    (("config", "representations", 0, "act"), 5, "act must be None or a transformers ACT2FN name"),
    (("config", "representations", 0, "dropout"), "0.1", "dropout must be a float"),
    (("config", "representations", 0, "colour"), "red", "unknown representation keys"),
    (("config", "positions"), "first", "positions must be None, 'last'"),
    (("config", "share_weights"), "true", "share_weights must be a bool"),
    (("config", "unfrozen_modules"), [3], "unfrozen_modules must be a list"),
    (("config", "extra"), 1, "unknown fields"),
    (("integrity",), KeyError, "'integrity' is missing"),
    (("integrity",), "abc", "integrity must be an object"),
    (("integrity", WEIGHTS_NAME), None, "must be a hex SHA-256 string"),
]


@pytest.mark.parametrize("path,value,match", CONFIG_DAMAGE, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in
                                                                    CONFIG_DAMAGE])
def test_damaged_config_fields_name_the_file_and_field(tmp_path, path, value, match):
    _saved(tmp_path)
    _edit_json(tmp_path, _set(path, value))
    with pytest.raises(ValueError, match=match) as info:
        _load(tmp_path)  # fields are checked before the record, so the error names the field
    assert CONFIG_NAME in str(info.value)
    if path[0] != "integrity":  # verify=False skips the record, never the field checks
        with pytest.raises(ValueError, match=match):
            _load(tmp_path, verify=False)


@pytest.mark.parametrize("path,value", [
    (("config", "representations", 0, "intervention"), "orthodireft"),  # same tensors, another edit
    (("config", "representations", 0, "act"), "relu"),
    (("config", "representations", 1, "dropout"), 0.5),
    (("config", "positions"), "f2+l2"),
    (("base_model", "class"), "MistralForCausalLM"),
])
def test_a_config_changed_to_another_valid_value_is_refused(tmp_path, path, value):
    reft = _saved(tmp_path)
    _edit_json(tmp_path, _set(path, value))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} does not match its integrity record.*verify=False"):
        _load(tmp_path)
    loaded = _load(tmp_path, verify=False)  # edited on purpose: loads, as edited
    if path[1] == "representations" and path[-1] == "intervention":
        assert loaded.reft_config.representations[0].intervention == "orthodireft"
        assert not torch.equal(_logits(loaded), _logits(reft))


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop(next(iter(t))), "missing tensors"),
    (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensors \['extra'\]"),
    (lambda t: t.update({k: v[:1] for k, v in t.items() if k.endswith(".bias")}), r"has shape \(1,\), the config gives"),
    (lambda t: t.update({k: v.reshape(v.shape[1], v.shape[0]) for k, v in t.items() if k.endswith("proj_weight")}),
     r"proj_weight has shape \(48, 3\), the config gives \(3, 48\)"),
    (lambda t: t.update({k: v.half() for k, v in t.items() if k.endswith("#0.weight")}), "is float16, the config gives float32"),
    (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.endswith("#0.bias")}), "is int32, the config gives"),
    (lambda t: t.update({k: v.float() for k, v in t.items() if "mlp_output" in k and k.endswith(".weight")}),
     "is float32, the config gives bfloat16"),
    (lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items() if k.endswith("0.weight")}),
     "non-finite"),
])
def test_tensors_that_do_not_fit_the_config_are_refused(tmp_path, damage, match):
    _saved(tmp_path)
    _edit_tensors(tmp_path, damage)
    with pytest.raises(ValueError, match="does not match the integrity record"):
        _load(tmp_path)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} does not fit .*{CONFIG_NAME}: .*{match}"):
        _load(tmp_path, verify=False)


def test_a_failed_load_leaves_no_hooks(tmp_path):
    _saved(tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update(extra=torch.zeros(2)))
    base = tiny_model("llama")
    with pytest.raises(ValueError):
        rk.ReftModel.from_pretrained(base, tmp_path, verify=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_old_checkpoints_without_the_record_load_with_a_warning(tmp_path):
    reft = _saved(tmp_path)

    def to_version_1(meta):
        meta["format_version"] = 1
        del meta["integrity"]
    _edit_json(tmp_path, to_version_1)
    with pytest.warns(UserWarning, match="no integrity record.*save_pretrained again"):
        loaded = _load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(reft))
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["format_version"] == 2


def test_missing_files_and_pyreft_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        _load(tmp_path / "nothing")
    _saved(tmp_path / "a")
    os.remove(tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} not found"):
        _load(tmp_path / "a")
    reft = _saved(tmp_path / "b")
    reft.save_pretrained(tmp_path / "p", format="pyreft")
    with pytest.raises(FileNotFoundError, match=r"pyreft checkpoint.*load_pyreft\(model, directory\)"):
        _load(tmp_path / "p")


# -- pyreft's format (load_pyreft): no integrity record exists in it; the zip archives' CRC-32s, the
# config's fields and every tensor are checked --------------------------------------------------------

def _pyreft_dir(tmp_path):
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(
        [{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2, "dtype": "float32"},
         {"layer": 2, "intervention": "consreft", "low_rank_dimension": 3}]))
    reft.save_pretrained(tmp_path, format="pyreft")
    return sorted(tmp_path.glob("intkey_*.bin"))[0]


def _state(change):
    def damage(path):
        state = torch.load(path)
        change(state)
        torch.save(state, path)
    return damage


def _config(change):
    def damage(path):
        config = json.loads((path.parent / "config.json").read_text())
        change(config)
        (path.parent / "config.json").write_text(json.dumps(config))
    return damage


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


PYREFT_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read by torch.load"),
    "flipped": (_flip, "fails its CRC-32 check"),
    "missing": (_state(lambda s: s.pop("weight")), r"needs \['R', 'weight', 'bias'\]"),
    "extra": (_state(lambda s: s.update(x=torch.zeros(1))), r"unexpected entries \['x'\]"),
    "reshaped": (_state(lambda s: s.update(bias=s["bias"][:1])), r"bias has shape \(1,\), expected \(2,\)"),
    "int_bias": (_state(lambda s: s.update(bias=s["bias"].to(torch.int32))), "bias is int32"),
    "int_R": (_state(lambda s: s.update(rotate_layer=s["rotate_layer"].to(torch.int32))), "rotate_layer is int32"),
    "nan": (_state(lambda s: s.update(weight=s["weight"] * float("nan"))), "non-finite"),
    "R_not_orthonormal": (_state(lambda s: s.update(rotate_layer=s["rotate_layer"] * 1.1)), "orthonormal rows"),
    "not_a_state_dict": (lambda p: torch.save([1, 2], p), "must hold a state dict"),
    "config_truncated": (lambda p: (p.parent / "config.json").write_text('{"representations": [[0, "bl'),
                         "config.json is not valid JSON"),
    "config_not_object": (lambda p: (p.parent / "config.json").write_text("[1]"), "must hold a JSON object"),
    "layer_type": (_config(lambda c: c["representations"][0].__setitem__(0, "zero")),
                   r"representations\[0\]: layer must be an int"),
    "rank_type": (_config(lambda c: c["representations"][0].__setitem__(4, "2")),
                  r"representations\[0\]: low_rank_dimension must be an int"),
    "rank_missing": (_config(lambda c: c["representations"][0].__setitem__(4, None)), "no low_rank_dimension"),
    "rank_changed": (_config(lambda c: c["representations"][0].__setitem__(4, 3)), r"R has shape \(2, 48\)"),
    "component_type": (_config(lambda c: c["representations"][0].__setitem__(1, 5)), "component must be a string"),
    "representation_type": (_config(lambda c: c["representations"].__setitem__(0, 5)), "must be a list"),
    "type_unknown": (_config(lambda c: c["intervention_types"].__setitem__(0, "Lora")), r"intervention_types\[0\]"),
    "types_swapped": (_config(lambda c: c.__setitem__("intervention_types", c["intervention_types"][::-1])),
                      "is the intervention type right"),
    "types_missing": (_config(lambda c: c.pop("intervention_types")), "one type per representation"),
    "sorted_keys_type": (_config(lambda c: c.__setitem__("sorted_keys", "abc")), "sorted_keys must be a list"),
    "dimensions_type": (_config(lambda c: c.__setitem__("intervention_dimensions", ["48", "48"])),
                        "intervention_dimensions must list"),
}


@pytest.mark.parametrize("name", sorted(PYREFT_DAMAGE))
def test_damaged_pyreft_checkpoints_name_the_file_and_what_is_wrong(tmp_path, name):
    damage, match = PYREFT_DAMAGE[name]
    path = _pyreft_dir(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=match) as info:
        rk.load_pyreft(tiny_model("llama"), tmp_path, dtype=None)
    assert str(tmp_path) in str(info.value)


def test_load_state_dict_refuses_integer_tensors_and_checks_keys_first():
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig({"layer": 0, "low_rank_dimension": 2,
                                                                 "dtype": torch.float32}))
    state = {k: v.clone() for k, v in reft.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    bias = next(k for k in state if k.endswith(".bias"))
    damaged = {**{k: v + 1 for k, v in state.items()}, bias: state[bias].to(torch.int32)}
    with pytest.raises(RuntimeError, match=f"{bias} is torch.int32"):
        reft.load_state_dict(damaged)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        reft.load_state_dict({**{k: v + 1 for k, v in state.items()}, "x": torch.zeros(1)})
    assert all(torch.equal(v, before[k]) for k, v in reft.state_dict().items())  # nothing was copied
