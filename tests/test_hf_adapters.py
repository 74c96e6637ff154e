"""Named adapters on one ReftModel (issue 15, the Hugging Face layer): mixed batches give each row what its
adapter gives alone (forward, greedy generate with and without the KV cache, beams), "__base__" rows are the
base model's bits, composition is the sequential application, a mixed batch trains each adapter with the
gradient of its own rows (the stock Trainer included), saving writes PEFT's layout and loads back bitwise,
and the registry's methods (add/load/delete/set/disable) and errors behave as PEFT users expect."""
import os
import warnings

import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels.integration import plans
from reft_kernels.modules.interventions import ReftIntervention
from hf_models import LAYERS, VOCAB, char_tokenizer, tiny_model

BASE = "__base__"


def _configs(dtype):
    """Adapters that differ in type (all six), rank, sites, components and position schemes."""
    return {
        "default": rk.ReftConfig([{"layer": l, "intervention": "loreft", "low_rank_dimension": 3, "dtype": dtype}
                                  for l in (0, 2)], positions="f2+l2"),
        "b": rk.ReftConfig([{"layer": l, "intervention": "direft", "low_rank_dimension": 2, "dtype": dtype,
                             "act": "relu"} for l in (1, 2)], positions="last"),
        "c": rk.ReftConfig([{"layer": 0, "component": "mlp_output", "intervention": "noreft", "low_rank_dimension": 4,
                             "dtype": dtype, "add_bias": True}], positions="l1"),
        "d": rk.ReftConfig([{"layer": 1, "intervention": "consreft", "low_rank_dimension": 2, "dtype": dtype}],
                           positions="f1+l1", share_weights=False),  # two interventions at one site
        "e": rk.ReftConfig([{"layer": 2, "component": "block_input", "intervention": "lobireft",
                             "low_rank_dimension": 1, "dtype": dtype},
                            {"layer": 1, "component": "attention_output", "intervention": "orthodireft",
                             "low_rank_dimension": 3, "dtype": dtype, "act": "gelu"}], positions="l2"),
    }


def _randomize(module, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * scale)


def _model(backend="cpp", names=("default", "b", "c", "d", "e"), peaked=False):
    """A tiny Llama with the adapters of _configs: fp32 for the fused backends, fp64 for torch."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    base = tiny_model("llama").to(dtype)
    if peaked:
        with torch.no_grad():
            base.get_output_embeddings().weight.mul_(5)  # tokens that depend on the edits
    configs = _configs(dtype)
    reft = rk.get_reft_model(base, configs[names[0]], adapter_name=names[0], backend=backend)
    for n in names[1:]:
        reft.add_adapter(n, configs[n])
    for k, adapter in enumerate(reft.adapters.values()):
        _randomize(adapter.interventions, seed=k + 1)
    return reft.eval()


def _prompts(B, T=8, seed=0):
    """Left-padded prompts: row b has b % 3 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : b % 3] = 0
        ids[b, : b % 3] = 0
    return ids, mask


def _slots(reft, names):
    """The (site, slot) pairs of the adapters named: the mixed launches one forward must make."""
    sites = {}
    for n in set(names) - {BASE}:
        for site, indices in reft.adapters[n].sites.items():
            sites[site] = max(sites.get(site, 0), len(indices))
    return sum(sites.values())


class _Count:
    """Counts mixed-op launches and single-adapter module calls."""

    def __init__(self, monkeypatch):
        self.mixed = self.single = 0
        op, fwd = plans.mixed_reft_edit, ReftIntervention.forward

        def mixed(*a, **k):
            self.mixed += 1
            return op(*a, **k)

        def single(*a, **k):
            self.single += 1
            return fwd(*a, **k)

        monkeypatch.setattr(plans, "mixed_reft_edit", mixed)
        monkeypatch.setattr(ReftIntervention, "forward", single)


NAMES = ["default", "b", BASE, "c", "d", "e", "b", BASE]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_batch_rows_equal_their_adapter_alone(backend, monkeypatch):
    reft = _model(backend)
    ids, mask = _prompts(len(NAMES))
    count = _Count(monkeypatch)
    with torch.no_grad():
        mixed = reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        # one mixed-op launch per site and slot for the whole batch, no single-adapter call
        assert (count.mixed, count.single) == (_slots(reft, NAMES), 0) and count.mixed == 7
        base = reft.model(input_ids=ids, attention_mask=mask).logits
        tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=1e-5, atol=1e-5)
        for name in set(NAMES) - {BASE}:
            alone = reft(input_ids=ids, attention_mask=mask, adapter_names=[name] * len(NAMES)).logits
            rows = [b for b, n in enumerate(NAMES) if n == name]
            torch.testing.assert_close(mixed[rows], alone[rows], **tol)
            assert not torch.allclose(alone[rows], base[rows])  # the adapter edits these rows
        rows = [b for b, n in enumerate(NAMES) if n == BASE]
        assert torch.equal(mixed[rows], base[rows])  # "__base__" rows: the base model's bits
        # the locations a mixed batch computes are reft.locations(mask, adapter_names=...)
        locs = reft.locations(mask, adapter_names=NAMES)
        assert locs.shape[:2] == (len(NAMES), 2) and (locs[rows] == -1).all()
        assert torch.equal(reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES,
                                intervention_locations=locs).logits, mixed)


def test_mixed_batch_on_the_triton_backend(device):
    """The Triton kernels: on a GPU, or on the CPU under the Triton interpreter (tests/conftest.py)."""
    reft = _model("triton", names=("default", "b", "d")).to(device)
    names = ["d", BASE, "default", "b"]
    ids, mask = (t.to(device) for t in _prompts(len(names)))
    with torch.no_grad():
        mixed = reft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for b, name in enumerate(names):
            if name == BASE:
                want = reft.model(input_ids=ids, attention_mask=mask).logits
            else:
                want = reft(input_ids=ids, attention_mask=mask, adapter_names=[name] * len(names)).logits
            torch.testing.assert_close(mixed[b], want[b], rtol=1e-5, atol=1e-5)


GENERATE = {"cache": {}, "no_cache": {"use_cache": False}, "beams": {"num_beams": 2},
            "beams_return_2": {"num_beams": 3, "num_return_sequences": 2}}


@pytest.mark.parametrize("mode", list(GENERATE))
def test_mixed_generate_rows_equal_their_adapter_alone(mode):
    reft = _model("cpp", peaked=True)
    names = ["b", "default", BASE, "e", "d", "c"]
    ids, mask = _prompts(len(names), T=7)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **GENERATE[mode])
    out = reft.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
    k = kwargs.get("num_return_sequences", 1)
    with reft.disable_adapter():
        base = reft.generate(input_ids=ids, attention_mask=mask, **kwargs)
    differs = 0
    for b, name in enumerate(names):
        rows = slice(b * k, (b + 1) * k)
        if name == BASE:
            assert torch.equal(out[rows], base[rows])
            continue
        alone = reft.generate(input_ids=ids, attention_mask=mask, adapter_names=[name] * len(names), **kwargs)
        assert torch.equal(out[rows], alone[rows]), (name, out[rows], alone[rows])
        differs += not torch.equal(alone[rows], base[rows])
    assert differs >= 3  # the edits change the tokens of most rows
    if mode == "cache":  # the edits follow absolute positions: the same tokens without the cache
        again = reft.generate(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=False, **kwargs)
        assert torch.equal(again, out)


def _reference_edit(module, h):
    """One row h [d] edited by a module in float64, from its parameters (the family formula)."""
    L = module.lift().double()
    b = module.bias.double()
    if module.source_linear:
        z = module.weight.double() @ h + b
        s = transformers.activations.ACT2FN[module.act](z) if module.act != "identity" else z
    else:
        s = b
    if module.subtract_proj:
        proj = L @ h
        if module._proj_bias() is not None:
            proj = proj + module._proj_bias().double()
        s = s - proj
    return h + L.T @ s


def _sequential_reference(model, adapters, locations):
    """float64 block_output hooks on `model` applying each adapter's interventions in turn at the given
    locations ([B, n_a, P] per adapter): the sequential reference of a composition."""
    layers = model.model.layers
    for adapter, locs in zip(adapters, locations):
        for (layer, component), indices in adapter.sites.items():
            assert component == "block_output"

            def hook(module, args, output, adapter=adapter, locs=locs, indices=indices):
                h = (output[0] if isinstance(output, tuple) else output).clone()
                for i in indices:
                    for row in range(h.shape[0]):
                        for p in sorted(set(locs[row, i].tolist()) - {-1}):
                            h[row, p] = _reference_edit(adapter.modules[i], h[row, p].double()).to(h.dtype)
                return (h, *output[1:]) if isinstance(output, tuple) else h

            layers[layer].register_forward_hook(hook)


@pytest.mark.parametrize("order", [["default", "b"], ["b", "default"]])
def test_composition_is_the_sequential_application(order):
    reft = _model("torch", names=("default", "b"))  # both edit layer 2's block_output
    ids, mask = _prompts(4)
    reft.set_adapter(order)
    assert reft.active_adapters == order and reft.num_interventions == 4
    adapters = [reft.adapters[n] for n in order]
    reference = tiny_model("llama").double()  # the same base model, with float64 hooks instead of ours
    _sequential_reference(reference, adapters, [a.locations(mask) for a in adapters])
    with torch.no_grad():
        out = reft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-10, atol=1e-10)
        # explicit locations: the adapters' one after the other [B, n_a + n_b, P]
        locs = reft.locations(mask)
        first = adapters[0].locations(mask)
        assert locs.shape[1] == 4 and torch.equal(locs[:, :2, :first.shape[2]], first)
        assert torch.equal(reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits, out)
        reft.set_adapter(order[::-1])
        assert not torch.allclose(reft(input_ids=ids, attention_mask=mask).logits, out)  # the order matters
    with pytest.raises(ValueError, match="2 are active"):
        reft.interventions


def _mixed_loss(reft, ids, mask, names, weight):
    return (reft(input_ids=ids, attention_mask=mask, adapter_names=names).logits * weight).sum()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_batch_gradients_reach_each_adapter_from_its_rows(backend):
    reft = _model(backend, names=("default", "b", "c", "d", "e"))
    reft.train()
    names = ["default", "b", "b", BASE, "d", "default"]  # c and e are not in the batch
    ids, mask = _prompts(len(names))
    weight = torch.randn(len(names), ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64).to(reft.model.dtype)
    params = {n: list(a.interventions.parameters()) for n, a in reft.adapters.items()}
    _mixed_loss(reft, ids, mask, names, weight).backward()
    got = {n: [None if p.grad is None else p.grad.clone() for p in ps] for n, ps in params.items()}
    for n in ("c", "e"):
        assert all(g is None for g in got[n]), n  # no gradient for adapters without rows
    tol = dict(rtol=1e-9, atol=1e-10) if backend == "torch" else dict(rtol=2e-4, atol=2e-5)
    for n in ("default", "b", "d"):
        reft.zero_grad()
        alone = [x if x == n else BASE for x in names]  # its rows, through the single-adapter path
        _mixed_loss(reft, ids, mask, alone, weight).backward()
        for p, g in zip(params[n], got[n]):
            assert g is not None and g.abs().sum() > 0
            torch.testing.assert_close(g, p.grad, **tol)


@pytest.mark.parametrize("reentrant", [True, False])
def test_mixed_batch_gradients_with_gradient_checkpointing(reentrant):
    """The recomputation in the backward builds the batch's banks (and R) again and applies the same
    dropout: the gradients are those without checkpointing."""
    names = ["d", "default", BASE, "b"]
    ids, mask = _prompts(len(names))
    weight = torch.randn(len(names), ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        reft = _model("cpp", names=("default", "b", "d"))
        for a in reft.adapters.values():
            for m in a.modules:
                m.dropout = 0.2
        if checkpointing:
            reft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        reft.train()
        torch.manual_seed(11)
        _mixed_loss(reft, ids, mask, names, weight).backward()  # (the logits of "last" positions count too)
        grads.append({n: p.grad.clone() for n, p in reft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in ("interventions.", "adapter_interventions.b.", "adapter_interventions.d."):
        assert sum(g.abs().sum() for n, g in grads[0].items() if n.startswith(name)) > 0, name
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_stock_trainer_trains_two_adapters_in_one_batch(tmp_path):
    tok = char_tokenizer()
    base = tiny_model("llama")
    reft = rk.get_reft_model(base, rk.ReftConfig([{"layer": l, "low_rank_dimension": 2, "dtype": torch.float32}
                                                  for l in (0, 2)], positions="f1+l1"))
    reft.add_adapter("b", rk.ReftConfig([{"layer": 1, "intervention": "direft", "low_rank_dimension": 3,
                                          "dtype": torch.float32}], positions="last"))
    reft.add_adapter("idle", rk.ReftConfig({"layer": 1, "low_rank_dimension": 1}, positions="last"))
    for k, adapter in enumerate(reft.adapters.values()):
        _randomize(adapter.interventions, seed=k + 5, scale=0.3)
    prompts = ["what is one?", "say hello.", "count: ", "ok?"]
    outputs = ["a", "hi", "ab", "y"]
    names = ["default", "b", "b", "default"]
    data = rk.make_data_module(tok, reft, prompts, outputs, adapter_names=names)
    assert [e["adapter_names"] for e in data["train_dataset"]] == names
    lr = 0.5
    before = {k: v.clone() for k, v in reft.state_dict().items()}
    trainable = [p for p in reft.parameters() if p.requires_grad]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                          max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=reft, args=args, optimizers=(torch.optim.SGD(trainable, lr=lr), None),
                                   **data)
    batch = next(iter(trainer.get_train_dataloader()))  # the stock collator path keeps adapter_names (shuffled rows;
    # the loss is the same for every order of the rows)
    assert sorted(batch["adapter_names"]) == sorted(names) and batch["intervention_locations"].shape[1] == 2
    # the reference: each adapter's gradient from its own rows (the others "__base__": single-adapter path)
    reference = {}
    for name in ("default", "b"):
        reft.zero_grad()
        rows = [n if n == name else BASE for n in batch["adapter_names"]]
        locations = batch["intervention_locations"][:, :reft.adapters[name].num_interventions]
        reft(**{**batch, "adapter_names": rows, "intervention_locations": locations}).loss.backward()
        reference[name] = {k: p.grad.clone() for k, p in reft.adapters[name].interventions.named_parameters()}
    reft.zero_grad()
    trainer.train()
    after = reft.state_dict()
    for name, prefix in (("default", "interventions."), ("b", "adapter_interventions.b.")):
        for k, g in reference[name].items():
            step = (before[prefix + k] - after[prefix + k]) / lr
            torch.testing.assert_close(step, g, rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
            assert g.abs().sum() > 0
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("adapter_interventions.idle."))


def test_data_module_for_a_composition_and_the_collator_of_a_mixed_batch():
    tok = char_tokenizer()
    reft = _model("cpp", names=("default", "b", "c", "d"))
    prompts, outputs = ["what is one?", "ok?"], ["a", "y"]
    reft.set_adapter(["default", "b"])
    data = rk.make_data_module(tok, reft, prompts, outputs)
    n = len(tok(prompts[1])["input_ids"])
    want = reft.locations(torch.ones(1, n, dtype=torch.long))[0]  # default's f2+l2, then b's last
    assert want.shape[0] == 4 and torch.equal(data["train_dataset"][1]["intervention_locations"], want)
    mixed = rk.make_data_module(tok, reft, prompts, outputs, adapter_names=["d", "c"], padding_side="left")
    batch = mixed["data_collator"](mixed["train_dataset"])
    assert batch["adapter_names"] == ["d", "c"] and batch["intervention_locations"].shape == (2, 2, 1)
    shift = batch["input_ids"].shape[1] - len(mixed["train_dataset"][1]["input_ids"])  # left padding
    assert batch["intervention_locations"][1].tolist() == [[n - 1 + shift], [-1]]  # c: one intervention, padded
    with pytest.raises(ValueError, match="one n_interventions"):  # without names, n must agree
        rk.ReftDataCollator()([{k: v for k, v in e.items() if k != "adapter_names"} for e in mixed["train_dataset"]])
    with pytest.raises(ValueError, match=r"no adapter named \['x'\]"):
        rk.make_data_module(tok, reft, prompts, outputs, adapter_names=["x", "b"])


def test_save_writes_peft_layout_and_loads_back_bitwise(tmp_path):
    reft = _model("cpp")
    reft.save_pretrained(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == ["b", "c", "d", "e", "reft_config.json", "reft_model.safetensors"]
    for n in "bcde":
        assert sorted(os.listdir(tmp_path / n)) == ["reft_config.json", "reft_model.safetensors"]
    again = rk.ReftModel.from_pretrained(tiny_model("llama"), tmp_path, backend="cpp")
    for n in "bcde":
        again.load_adapter(tmp_path, adapter_name=n, subfolder=n)
    again.eval()
    assert list(again.adapters) == list(reft.adapters)
    a, b = reft.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = _prompts(len(NAMES))
    with torch.no_grad():
        assert torch.equal(reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits,
                           again(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits)
    # one adapter of a save, each directory with its own integrity record
    reft.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert os.listdir(tmp_path / "only_b") == ["b"]
    weights = tmp_path / "only_b" / "b" / "reft_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the integrity record"):
        again.load_adapter(tmp_path / "only_b" / "b", adapter_name="b2")
    assert "b2" not in again.adapters
    with pytest.raises(FileNotFoundError, match=r"holds the adapters \['b'\] in subfolders.*subfolder=name"):
        rk.ReftModel.from_pretrained(tiny_model("llama"), tmp_path / "only_b")


def test_read_adapter_and_pyreft_format_of_a_chosen_adapter(tmp_path):
    reft = _model("cpp", names=("default", "b"))
    reft.save_pretrained(tmp_path / "ours")
    adapter = rk.read_adapter(tmp_path / "ours" / "b")  # no base model: config + loaded modules
    assert adapter.config.positions == "last" and adapter.base_model["hidden_size"] == 48
    live = reft.adapters["b"]
    for i in range(live.num_interventions):
        x, y = adapter.params(i), live.params(i)
        assert all(torch.equal(u, v) for u, v in ((x.lift, y.lift), (x.weight, y.weight), (x.bias, y.bias)))
        assert x.spec == y.spec
    # a ReftModel from the read adapter (what a server can do without reading files twice)
    other = rk.ReftModel(tiny_model("llama"), adapter, adapter_name="b", backend="cpp").eval()
    ids, mask = _prompts(3)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits,
                           reft(input_ids=ids, attention_mask=mask, adapter_names=["b"] * 3).logits)
        reft.save_pretrained(tmp_path / "pyreft", format="pyreft", selected_adapters=["default"])
        assert "config.json" in os.listdir(tmp_path / "pyreft")
        reft.load_adapter(tmp_path / "pyreft", "from_pyreft", positions="f2+l2", dtype=torch.float32)
        assert not any(p.requires_grad for p in reft.adapters["from_pyreft"].interventions.parameters())
        torch.testing.assert_close(
            reft(input_ids=ids, attention_mask=mask, adapter_names=["from_pyreft", "b", "from_pyreft"]).logits[0],
            reft(input_ids=ids, attention_mask=mask).logits[0], rtol=1e-5, atol=1e-5)
        pyreft_read = rk.read_adapter(tmp_path / "pyreft", positions="f2+l2", dtype=torch.float32)
        assert pyreft_read.num_interventions == 2 and pyreft_read.dim == 48


def test_set_delete_disable_and_the_state_dict():
    reft = _model("cpp", names=("default", "b", "c"))
    assert reft.active_adapters == ["default"] and reft.active_adapter == "default"
    assert reft.interventions is reft.adapters["default"].interventions
    keys = set(reft.state_dict())
    params = {n for n, _ in reft.named_parameters() if not n.startswith("model.")}
    assert params <= keys  # the state-dict keys are the module paths
    assert {k.split(".")[0] for k in keys} == {"interventions", "adapter_interventions"}
    assert any(k.startswith("adapter_interventions.b.layer_1_") for k in keys)
    state = {k: v.clone() + 1 for k, v in reft.state_dict().items()}
    reft.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in reft.state_dict().items())

    reft.set_adapter("b")  # PEFT: the active adapter trainable, the others frozen
    assert reft.reft_config is reft.adapters["b"].config and reft.num_interventions == 2
    grads = {n: all(p.requires_grad for p in a.interventions.parameters()) for n, a in reft.adapters.items()}
    assert grads == {"default": False, "b": True, "c": False}
    reft.set_adapter(["c", "b"], inference_mode=True)
    assert not any(p.requires_grad for p in reft.parameters())
    reft.set_requires_grad("c")
    assert all(p.requires_grad for p in reft.adapters["c"].interventions.parameters())

    ids, mask = _prompts(3)
    layer1 = reft.model.model.layers[1]
    hooks = len(layer1._forward_hooks)
    with torch.no_grad():
        base = reft.model(input_ids=ids, attention_mask=mask).logits
        with reft.disable_adapter():
            assert torch.equal(reft(input_ids=ids, attention_mask=mask).logits, base)
            assert torch.equal(reft(input_ids=ids, attention_mask=mask, adapter_names=["b", "c", "b"]).logits, base)
        assert not torch.equal(reft(input_ids=ids, attention_mask=mask).logits, base)
    with pytest.warns(UserWarning, match="'default' is active now"):
        reft.delete_adapter("c")
        reft.delete_adapter("b")  # both active: the first remaining adapter becomes active
    assert reft.active_adapters == ["default"] and list(reft.adapters) == ["default"]
    assert len(layer1._forward_hooks) == hooks - 1  # layer 1's hook went with b, the only adapter editing it
    assert not any(n.startswith("adapter_interventions") for n, _ in reft.named_modules())
    with pytest.raises(ValueError, match="no adapter named \\['b'\\]"):
        reft(input_ids=ids, attention_mask=mask, adapter_names=["b", "default", BASE])
    reft.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter is active"):
        reft(input_ids=ids, attention_mask=mask)
    reft.add_adapter("x", _configs(torch.float32)["b"])
    reft.set_adapter("x")
    with torch.no_grad():
        reft(input_ids=ids, attention_mask=mask)


def test_frozen_banks_are_shared_by_every_mix_until_a_parameter_changes():
    reft = _model("cpp", names=("default", "b", "d"))
    reft.set_adapter(["default", "b", "d"], inference_mode=True)  # frozen
    ids, mask = _prompts(3)
    mixes = (["b", "default", BASE], ["d", "b", "d"], ["default", "d", "b"])
    with torch.no_grad():
        first = [reft(input_ids=ids, attention_mask=mask, adapter_names=m).logits for m in mixes]
        banks = dict(reft._shared.banks)  # one bank per site and slot, of every adapter that has it
        assert len(banks) == 4 and all(b.num_adapters == len(reft._shared.members[k]) for k, b in banks.items())
        again = [reft(input_ids=ids, attention_mask=mask, adapter_names=m).logits for m in mixes]
        assert all(torch.equal(x, y) for x, y in zip(first, again))
        assert reft._shared.banks == banks and all(reft._shared.banks[k] is b for k, b in banks.items())  # reused
        reft.adapters["b"].interventions["layer_2_comp_block_output_unit_pos_nunit_1#0"].weight.mul_(3)
        changed = reft(input_ids=ids, attention_mask=mask, adapter_names=mixes[0]).logits
        alone = reft(input_ids=ids, attention_mask=mask, adapter_names=["b"] * 3).logits
        torch.testing.assert_close(changed[0], alone[0], rtol=1e-5, atol=1e-5)  # rebuilt after the write
        assert not torch.allclose(changed[0], first[0][0])
        assert torch.equal(changed[1], first[0][1])
        # trainable adapters: the batch's own bank, built for the call
        reft.set_requires_grad("d")
        trainable = reft(input_ids=ids, attention_mask=mask, adapter_names=mixes[1]).logits
        torch.testing.assert_close(trainable[[0, 2]], first[1][[0, 2]], rtol=1e-5, atol=1e-5)  # d's rows
    # trained in between (a fused optimizer need not move version counters), then frozen again: rebuilt
    reft.set_requires_grad("default")
    reft.train()
    reft(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    torch.optim.AdamW(reft.adapters["default"].interventions.parameters(), lr=0.1, fused=True).step()
    reft.set_requires_grad("default", False)
    reft.eval()
    with torch.no_grad():
        mixed = reft(input_ids=ids, attention_mask=mask, adapter_names=mixes[2]).logits
        alone = reft(input_ids=ids, attention_mask=mask, adapter_names=["default"] * 3).logits
        torch.testing.assert_close(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], first[2][0])
        for m in reft._orthonormals:  # R computed afresh: the single-adapter path held no stale R either
            m._cache = None
        assert torch.equal(reft(input_ids=ids, attention_mask=mask, adapter_names=["default"] * 3).logits, alone)
    reft.add_adapter("c", _configs(torch.float32)["c"])  # a change of adapters drops the plans and banks
    assert not reft._plans and reft._shared is None


def test_errors_name_what_is_wrong(tmp_path):
    reft = _model("cpp", names=("default", "b", "d"))
    ids, mask = _prompts(3)
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]"):
        reft(input_ids=ids, attention_mask=mask, adapter_names=["nope", "b", BASE])
    with pytest.raises(ValueError, match="2 names for a batch of 3 rows"):
        reft(input_ids=ids, attention_mask=mask, adapter_names=["b", "d"])
    with pytest.raises(TypeError, match="list of adapter names"):
        reft(input_ids=ids, attention_mask=mask, adapter_names="b")
    # a mixed batch's locations are [B, the most interventions of its adapters (d: 2), P]
    with pytest.raises(ValueError, match=r"n_interventions=2.*mixed batch of \['b', 'd', 'default'\]"):
        reft(input_ids=ids, attention_mask=mask, adapter_names=["default", "b", "d"],
             intervention_locations=torch.zeros(3, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"n_interventions=4.*composition"):
        reft.set_adapter(["default", "b"])
        reft(input_ids=ids, attention_mask=mask, intervention_locations=torch.zeros(3, 2, 2, dtype=torch.long))
    for bad in ("a.b", BASE, "", "training"):
        with pytest.raises(ValueError, match="adapter_name"):
            reft.add_adapter(bad, _configs(torch.float32)["c"])
    with pytest.raises(ValueError, match="'b' already exists"):
        reft.add_adapter("b", _configs(torch.float32)["c"])
    with pytest.raises(ValueError, match=r"no adapter named \['x'\]"):
        reft.set_adapter(["b", "x"])
    with pytest.raises(ValueError, match="named twice"):
        reft.set_adapter(["b", "b"])
    with pytest.raises(ValueError, match="'x' does not exist"):
        reft.delete_adapter("x")
    with pytest.raises(ValueError, match="out of range"):
        reft.add_adapter("deep", rk.ReftConfig({"layer": LAYERS, "low_rank_dimension": 1}))
    with pytest.raises(ValueError, match="must be the only one"):
        reft.add_adapter("head", rk.ReftConfig({"layer": 0, "low_rank_dimension": 1}, unfrozen_modules=["lm_head"]))
    # a saved adapter of another width or depth is refused, ours and pyreft's
    for kw in ({"hidden_size": 64}, {"num_hidden_layers": 2}):
        other = rk.get_reft_model(tiny_model("llama", **kw), rk.ReftConfig({"layer": 1, "low_rank_dimension": 2}))
        other.save_pretrained(tmp_path / str(kw))
        other.save_pretrained(tmp_path / f"pyreft{kw}", format="pyreft")
        with pytest.raises(ValueError, match="hidden size 64|2 layers"):
            reft.load_adapter(tmp_path / str(kw), "wide")
        if "hidden_size" in kw:
            with pytest.raises(ValueError, match="width 64"):
                reft.load_adapter(tmp_path / f"pyreft{kw}", "wide")
    assert list(reft.adapters) == ["default", "b", "d"]
    reft.remove_hooks()
    with pytest.raises(RuntimeError, match="hooks were removed"):
        reft.add_adapter("late", _configs(torch.float32)["c"])
    with pytest.raises(FileNotFoundError, match="neither reft_config.json"):
        reft.load_adapter(tmp_path, "empty")
    with pytest.raises(TypeError, match="pyreft checkpoints only"):
        reft.load_adapter(tmp_path / str({"hidden_size": 64}), "x", positions="last")


def test_single_adapter_api_is_unchanged_and_omitted_locations_follow_the_scheme():
    """One adapter, named "default": reft.interventions / reft_config / num_interventions, state-dict keys and
    locations as before named adapters; omitting intervention_locations gives reft.locations(mask)'s."""
    reft = _model("cpp", names=("default",))
    assert list(reft.adapters) == ["default"] and reft.num_interventions == 2
    assert set(reft.state_dict()) == {f"interventions.{k}" for k in reft.interventions.state_dict()}
    ids, mask = _prompts(3)
    with torch.no_grad():
        explicit = reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=reft.locations(mask),
                                 max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                         pad_token_id=0), explicit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reft(input_ids=ids, attention_mask=mask)
