"""ReftModel on a tiny Llama: forward, saving, gradient checkpointing, the stock Trainer, per-call state
and errors. Generation is in test_hf_generate.py, checkpoint corruption in test_hf_checkpoint.py, pyreft's
calling conventions in test_hf_pyreft_calls.py, architecture coverage in test_hf_components.py."""
import copy
import threading

import pytest
import torch
import transformers

import reft_kernels as rk
from hf_models import LAYERS, VOCAB, WIDTH, tiny_model


def _config(kind="loreft", layers=(0, 2), dtype=torch.float64, positions="f2+l2", **extra):
    return rk.ReftConfig([{"layer": l, "intervention": kind, "low_rank_dimension": 3, "dtype": dtype, **extra}
                          for l in layers], positions=positions)


def _randomize(reft, scale=1.0, seed=1):
    """Non-trivial adapter parameters (training would get there; init leaves LoReFT close to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reft.interventions.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * scale)


def _reference_hooks(model, reft):
    """Hand-written float64 LoReFT hooks on `model` (a copy of the base) with reft's parameters, editing
    block_output at the positions in holder["locs"] ([B, n, P])."""
    holder = {}
    layers = model.model.layers
    handles = []
    for index, (key, iv) in enumerate(reft.interventions.items()):
        layer = int(key.split("_")[1])

        def hook(module, args, output, iv=iv, index=index):
            h = output[0] if isinstance(output, tuple) else output
            locs = holder["locs"]
            if locs.shape[0] != h.shape[0]:
                locs = locs.repeat_interleave(h.shape[0] // locs.shape[0], 0)
            R, W, b = iv.lift().double(), iv.weight.double(), iv.bias.double()
            h = h.clone()
            for row in range(h.shape[0]):
                for p in set(locs[row, index].tolist()) - {-1}:
                    x = h[row, p].double()
                    h[row, p] = (x + R.T @ (W @ x + b - R @ x)).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layers[layer].register_forward_hook(hook))
    return holder, handles


def _left_padded_prompts(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, : b * 2] = 0
        ids[b, : b * 2] = 0
    return ids, mask


def _with_reference():
    """A float64 tiny Llama with a random LoReFT adapter, a copy of it with the reference hooks, left-padded
    prompts and their locations."""
    base = tiny_model("llama").double()
    ref_model = copy.deepcopy(base)
    reft = rk.get_reft_model(base, _config())
    _randomize(reft, 0.5)
    ids, mask = _left_padded_prompts()
    locs = reft.locations(mask)
    holder, _ = _reference_hooks(ref_model, reft)
    holder["locs"] = locs
    return reft, ref_model, ids, mask, locs


def test_forward_matches_reference_and_locations_default_to_the_scheme():
    reft, ref_model, ids, mask, locs = _with_reference()
    out = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    torch.testing.assert_close(out, ref_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-10, atol=1e-10)
    # omitted: the adapter's position scheme on the attention mask, the same locations reft.locations gives
    assert torch.equal(reft(input_ids=ids, attention_mask=mask).logits, out)
    reft.reft_config.positions = None
    with pytest.raises(ValueError, match="intervention_locations is required.*'default'.*positions"):
        reft(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[B=3, n_interventions=2, P\]"):
        reft(input_ids=ids, attention_mask=mask, intervention_locations=locs[:, :1])


def test_inputs_embeds_are_not_written_and_eval_reaches_dropout():
    base = tiny_model("llama")
    reft = rk.get_reft_model(base, rk.ReftConfig({"layer": 0, "component": "block_input", "dropout": 0.5,
                                                  "low_rank_dimension": 2, "dtype": torch.float32}, positions="f2+l2"))
    ids, mask = _left_padded_prompts()
    embeds = base.get_input_embeddings()(ids).detach()
    before = embeds.clone()
    reft.eval()
    a = reft(inputs_embeds=embeds, attention_mask=mask, intervention_locations=reft.locations(mask)).logits
    assert torch.equal(embeds, before)  # the caller's tensor is edited on a copy
    b = reft(inputs_embeds=embeds, attention_mask=mask, intervention_locations=reft.locations(mask)).logits
    assert torch.equal(a, b)  # eval(): dropout off (pyreft keeps it on)
    assert not all(iv.training for iv in reft.interventions.values())


def test_only_adapter_trains_and_state_dict_is_the_adapter():
    base = tiny_model("llama")
    reft = rk.get_reft_model(base, _config(dtype=torch.float32))
    trainable = {n for n, p in reft.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("interventions.") for n in trainable)
    keys = set(reft.state_dict())
    assert keys == {f"interventions.{k}" for k in reft.interventions.state_dict()}
    with pytest.raises(RuntimeError, match="unexpected keys"):
        reft.load_state_dict({**reft.state_dict(), "model.lm_head.weight": torch.zeros(1)})


def _train_steps(reft, steps=3, seed=0, **fw):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in reft.parameters() if p.requires_grad], lr=1e-2)
    reft.train()
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    locs = reft.locations(mask)
    for _ in range(steps):
        out = reft(input_ids=ids, attention_mask=mask, labels=ids, intervention_locations=locs, **fw)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return out.loss.item()


def test_save_and_load_round_trip_is_bitwise(tmp_path):
    cfg = rk.ReftConfig([{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2, "dtype": "float32"},
                         {"layer": 1, "component": "mlp_output", "intervention": "noreft", "low_rank_dimension": 3,
                          "add_bias": True, "act": "gelu", "dtype": "bfloat16"},
                         {"layer": 2, "component": "attention_output", "intervention": "lobireft", "rank": 1}],
                        positions="f1+l2", share_weights=False)
    reft = rk.get_reft_model(tiny_model("llama"), cfg)
    _train_steps(reft)
    reft.eval()
    reft.save_pretrained(tmp_path)
    loaded = rk.ReftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.reft_config == cfg
    for (k1, v1), (k2, v2) in zip(reft.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and v1.dtype == v2.dtype and torch.equal(v1, v2), k1
    ids, mask = _left_padded_prompts()
    locs = reft.locations(mask)
    assert locs.shape[1] == 6
    a = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    b = loaded(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    assert torch.equal(a, b)


def test_load_on_a_mismatched_model_fails_clearly(tmp_path):
    reft = rk.get_reft_model(tiny_model("llama"), _config(dtype=torch.float32))
    reft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 48 and 3 layers"):
        rk.ReftModel.from_pretrained(tiny_model("llama", num_hidden_layers=4), tmp_path)
    with pytest.raises(ValueError, match="hidden size 48"):
        rk.ReftModel.from_pretrained(tiny_model("llama", hidden_size=64, intermediate_size=64), tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        rk.ReftModel.from_pretrained(tiny_model("llama"), tmp_path / "nothing")


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("component", ["block_output", "mlp_output"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, component):
    grads = []
    for checkpointing in (False, True):
        base = tiny_model("llama")
        reft = rk.get_reft_model(base, rk.ReftConfig(
            [{"layer": l, "component": component, "low_rank_dimension": 2, "dtype": torch.float32, "dropout": 0.3}
             for l in (0, 2)], positions="f2+l2"))
        _randomize(reft, 0.3)
        if checkpointing:
            reft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert reft.is_gradient_checkpointing
        reft.train()
        ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        torch.manual_seed(11)  # dropout: the recomputation must redraw the same mask
        reft(input_ids=ids, attention_mask=mask, labels=ids, intervention_locations=reft.locations(mask)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in reft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_stock_trainer_trains_the_adapter(tmp_path):
    base = tiny_model("llama")
    with torch.no_grad():
        base.lm_head.weight.mul_(10)  # std 0.2: with the config's 0.02 a random model cannot memorize anything
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    reft = rk.get_reft_model(base, rk.ReftConfig(
        [{"layer": l, "low_rank_dimension": 4, "dtype": torch.float32} for l in range(LAYERS)], positions="f1+l1"))
    g = torch.Generator().manual_seed(0)
    data = [rk.reft_example(torch.randint(3, VOCAB, (int(n),), generator=g).tolist(),
                            torch.randint(3, VOCAB, (3,), generator=g).tolist(), reft.reft_config, reft.num_interventions)
            for n in torch.randint(3, 8, (8,), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=30,
                                          learning_rate=4e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=reft, args=args, train_dataset=data, data_collator=rk.ReftDataCollator())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses  # measured: 0.50
    for n, p in base.named_parameters():
        assert torch.equal(p, frozen[n]), n  # the frozen model is untouched
    trainer.save_model(str(tmp_path / "final"))  # a Trainer checkpoint holds the adapter only
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) == set(reft.state_dict())


def test_threads_do_not_share_positions():
    base = tiny_model("llama").double()
    reft = rk.get_reft_model(base, _config())
    _randomize(reft, 0.5)
    ids, mask = _left_padded_prompts()
    locs_a = reft.locations(mask)
    locs_b = torch.full_like(locs_a, -1)
    locs_b[:, :, 0] = 6
    want_a = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs_a).logits
    want_b = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs_b).logits
    errors, barrier = [], threading.Barrier(2)

    def run(locs, want):
        try:
            for _ in range(5):
                barrier.wait()
                got = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
                if not torch.equal(got, want):
                    errors.append("mixed")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=a) for a in ((locs_a, want_a), (locs_b, want_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_hooks_are_ours_only():
    base = tiny_model("llama")
    seen = []
    other = base.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(1))
    reft = rk.get_reft_model(base, _config(dtype=torch.float32))
    ids, mask = _left_padded_prompts()
    reft(input_ids=ids, attention_mask=mask, intervention_locations=reft.locations(mask))
    reft.remove_hooks()
    base(input_ids=ids, attention_mask=mask)
    assert len(seen) == 2  # another library's hook survives our calls and our removal
    assert len(base.model.layers[0]._forward_hooks) == 1
    other.remove()


def test_errors_name_what_is_wrong():
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        rk.get_reft_model(base, _config(layers=(3,)))
    with pytest.raises(ValueError, match="unfrozen_modules"):
        rk.get_reft_model(base, rk.ReftConfig({"layer": 0, "rank": 1}, unfrozen_modules=["classifier"]))
    with pytest.raises(TypeError, match="ReftConfig"):
        rk.get_reft_model(base, {"layer": 0})
    reft = rk.get_reft_model(base, rk.ReftConfig({"layer": 0, "rank": 1}))
    with pytest.raises(ValueError, match="positions is not set"):
        reft.locations(torch.ones(1, 3))
    assert reft.dim == WIDTH


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    reft = rk.get_reft_model(tiny_model("llama"), _config(dtype=torch.float32))
    before = {n: p.detach().clone() for n, p in reft.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    data = [rk.reft_example(torch.randint(3, VOCAB, (6,), generator=g).tolist(), [5, 6], reft.reft_config,
                            reft.num_interventions) for _ in range(4)]
    fields = transformers.TrainingArguments.__dataclass_fields__
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, **{flag: True})
    transformers.Trainer(model=reft, args=args, train_dataset=data, data_collator=rk.ReftDataCollator()).train()
    assert reft.is_gradient_checkpointing
    assert all(not torch.equal(p, before[n]) for n, p in reft.named_parameters() if p.requires_grad)


def test_save_pretrained_in_pyreft_format_loads_back(tmp_path):
    # the format pyreft reads (tests_pyreft/ checks it against the real pyreft); here: our own loader
    reft = rk.get_reft_model(tiny_model("llama"), _config(dtype=torch.float32))
    _randomize(reft, 0.3)
    reft.save_pretrained(tmp_path, format="pyreft")
    assert (tmp_path / "config.json").is_file() and len(list(tmp_path.glob("intkey_*.bin"))) == 2
    loaded = rk.load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32, positions="f2+l2")
    ids, mask = _left_padded_prompts()
    locs = reft.locations(mask)
    a = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    b = loaded(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="format must be"):
        reft.save_pretrained(tmp_path, format="peft")
