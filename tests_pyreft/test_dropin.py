"""reft_kernels.interop.pyreft_dropin against the real pyreft 0.1.0 (on pyvene 0.1.8).

For each of the six classes, a tiny Llama (tests/hf_models.py) goes through pyreft.get_reft_model once
with pyreft's class and once with the drop-in, both holding the same parameters (the drop-in is built
from the same seed, which reproduces pyreft's random draws, and its state is copied over as well), and
runs the same batch, made by pyreft's own pieces (get_intervention_locations with pad_mode="first", the
prepended pad token, pyreft's make_data_collator: right padding, dummy positions pointing at the pad).

Tolerances. Everything is fp32 (model, W, b, R). The two computations are the same math in a different
order (one fused edit against pyreft's ~8 ops; R read once instead of twice): fp32 rounding,
~1e-7 relative per op, grows through the 3-layer model and the loss, so outputs and gradients are
compared with rtol 1e-5 (atol 1e-6 on logits, 1e-7-scaled on gradients, see _close); the Triton backend
(under the interpreter on a CPU) sums in another order again and gets rtol 1e-4. Training for a few
Trainer steps compares parameters after AdamW, whose normalised steps magnify relative gradient noise
on near-zero gradient entries: rtol 1e-4, atol 1e-5. The bf16 checkpoint test compares against pyreft's
stock classes with a bf16 tolerance (pyreft computes W h + b in bf16, the drop-in in fp32).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import torch

import pytest  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

import pyreft  # noqa: E402
import transformers  # noqa: E402
from hf_models import VOCAB, WIDTH, tiny_model  # noqa: E402

import reft_kernels  # noqa: E402
from reft_kernels.interop import pyreft_dropin as D  # noqa: E402

RANK = 4
PAD, EOS = 0, 2
NAMES = list(D.CLASSES)
# constructor keywords per type, besides embed_dim, low_rank_dimension and dtype: activations and add_bias
# vary so that every term of the edit is exercised against pyreft
EXTRA = {
    "LoreftIntervention": {},
    "NoreftIntervention": {"add_bias": True},
    "ConsreftIntervention": {},
    "LobireftIntervention": {},
    "DireftIntervention": {"act_fn": "gelu"},
    "NodireftIntervention": {"add_bias": False, "act_fn": "relu"},
}


# ------------------------------------------------------------------------------------------------
# building: the same interventions, pyreft's and ours
# ------------------------------------------------------------------------------------------------


def _kwargs(name, dtype=torch.float32, **over):
    return {"embed_dim": WIDTH, "low_rank_dimension": RANK, "dtype": dtype, **EXTRA[name], **over}


def _perturb(intervention, seed):
    """Moves every parameter away from its initialisation (a zero-init or identity-like state would hide
    mistakes): small random noise, the same for pyreft's and ours given the seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(torch.nn.Module.named_parameters(intervention)):
            noise = 0.3 * torch.randn(p.shape, generator=gen)
            if name.endswith("original"):
                # torch's Householder map reads the strictly lower triangle; its diagonal is a sign read
                # with .int(), which noise (like weight decay, see reft-semantics.md) would truncate to 0
                noise = noise.tril(-1)
            p.add_(noise.to(p.dtype))


def pair(name, seed=0, dtype=torch.float32, **over):
    """(pyreft's intervention, ours) with identical parameters and buffers."""
    torch.manual_seed(seed)
    theirs = getattr(pyreft, name)(**_kwargs(name, dtype, **over))
    _perturb(theirs, seed)
    torch.manual_seed(seed)
    ours = D.CLASSES[name](**_kwargs(name, dtype, **over))
    ours.load_state_dict(torch.nn.Module.state_dict(theirs))  # the full state, whatever the seed gave
    return theirs, ours


def reft_model(interventions, layers, model):
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
            for layer, iv in zip(layers, interventions)]
    return pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))


def built_pair(name, layers=(0, 2), seed=0, **over):
    """Two ReftModels on two copies of the same tiny Llama: one intervention per layer in `layers`."""
    pairs = [pair(name, seed + i, **over) for i in range(len(layers))]
    theirs = reft_model([p[0] for p in pairs], layers, tiny_model("llama"))
    ours = reft_model([p[1] for p in pairs], layers, tiny_model("llama"))
    return theirs, ours


# ------------------------------------------------------------------------------------------------
# data: what pyreft's data module produces
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary, built in memory (no download)."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": PAD, "<unk>": 1, "<eos>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                               pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                               clean_up_tokenization_spaces=False)
    tok.padding_side = "right"
    return tok


def examples(n, *, positions="f3+l3", num_interventions=2, share_weights=True, seed=0, min_prompt=2):
    """pyreft's ReftGenerationDataset items for random prompts and completions: a pad token prepended
    (pad_mode "first"), labels -100 on it and the prompt, intervention_locations from pyreft's own
    get_intervention_locations shifted by the pad, dummy slots pointing at the pad (short prompts)."""
    gen = torch.Generator().manual_seed(seed)
    first_n, last_n = pyreft.parse_positions(positions)
    out = []
    for _ in range(n):
        lp = int(torch.randint(min_prompt, 12, (1,), generator=gen))
        lc = int(torch.randint(2, 6, (1,), generator=gen))
        prompt = torch.randint(3, VOCAB, (lp,), generator=gen)
        ids = torch.cat([torch.tensor([PAD]), prompt, torch.randint(3, VOCAB, (lc,), generator=gen), torch.tensor([EOS])])
        labels = ids.clone()
        labels[: lp + 1] = -100
        locs = pyreft.get_intervention_locations(last_position=lp - 1, first_n=first_n, last_n=last_n,
                                                 num_interventions=num_interventions, pad_mode="first",
                                                 share_weights=share_weights)
        out.append({"input_ids": ids.tolist(), "attention_mask": (ids != PAD).int().tolist(),
                    "labels": labels.tolist(), "intervention_locations": (torch.tensor(locs) + 1).tolist()})
    return out


def collate(items, model):
    return pyreft.reft_trainer.make_data_collator(tokenizer(), model)(copy.deepcopy(items))


def run(reft, batch):
    """pyreft's ReftTrainer.compute_loss (it never reads self), returning the model outputs."""
    _, out = pyreft.ReftTrainer.compute_loss(None, reft, batch, return_outputs=True)
    return out


def grads(reft):
    return {n: p.grad.detach().clone() for n, p in reft.named_parameters() if p.grad is not None}


def _close(a, b, rtol=1e-5, what=""):
    """allclose with the absolute tolerance scaled to the tensor (rounding of a sum is relative to its
    terms, not to the result, for entries that cancel to near zero)."""
    atol = rtol * 0.1 * b.abs().max().item() + 1e-12
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def forward_backward(reft, batch, embed_grad=True):
    """Logits, loss and gradients (intervention parameters, plus the input embeddings' so that the
    gradient through the edited hidden states is compared too)."""
    emb = reft.model.get_input_embeddings().weight
    emb.requires_grad_(embed_grad)
    emb.grad = None
    reft.zero_grad()
    out = run(reft, batch)
    out.loss.backward()
    g = grads(reft)
    if embed_grad:
        g["embeddings"] = emb.grad.detach().clone()
    emb.requires_grad_(False)
    return out.logits.detach(), out.loss.detach(), g


def assert_same_model_outputs(theirs, ours, batch, rtol=1e-5):
    lt, losst, gt = forward_backward(theirs, batch)
    lo, losso, go = forward_backward(ours, batch)
    _close(lo, lt, rtol, "logits")
    _close(losso, losst, rtol, "loss")
    assert sorted(go) == sorted(gt)
    assert len(gt) > 1
    for k in gt:
        _close(go[k], gt[k], rtol, f"gradient of {k}")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_interface_and_state_dict(name):
    theirs, ours = pair(name)
    for base in (pyreft.interventions.SourcelessIntervention, pyreft.interventions.TrainableIntervention,
                 pyreft.interventions.DistributedRepresentationIntervention):
        assert isinstance(ours, base)
    assert type(ours).__name__ == type(theirs).__name__ == name
    assert ours.keep_last_dim and ours.is_source_constant and ours.trainable and ours.is_repr_distributed
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    # the state dicts pyvene saves: same keys, shapes, dtypes, values
    st, so = theirs.state_dict(), ours.state_dict()
    assert list(so) == list(st)
    for k in st:
        assert so[k].shape == st[k].shape and so[k].dtype == st[k].dtype, k
        torch.testing.assert_close(so[k], st[k], rtol=0, atol=0)
    # the same random draws as pyreft from one seed (so a seeded pyreft script trains the same model)
    torch.manual_seed(5)
    a = getattr(pyreft, name)(**_kwargs(name))
    torch.manual_seed(5)
    b = D.CLASSES[name](**_kwargs(name))
    for (k, x), (_, y) in zip(torch.nn.Module.state_dict(a).items(), torch.nn.Module.state_dict(b).items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_gradients_match_pyreft(name):
    theirs, ours = built_pair(name)
    batch = collate(examples(3, num_interventions=2, seed=1), theirs.model)
    # short prompts: some rows carry dummy slots (position 0, the prepended pad), named several times
    locs = batch["intervention_locations"]
    assert any(len(set(row.tolist())) < row.numel() for row in locs[:, 0])
    assert_same_model_outputs(theirs, ours, batch)


@pytest.mark.parametrize("name", ["LoreftIntervention", "NodireftIntervention"])
def test_batch_of_one_and_untied_prefix_suffix(name):
    """Batch 1, and pyreft's share_weights=False layout: two interventions per layer, the prefix ones
    first (slots 0, 1) then the suffix ones (slots 2, 3), on the same two layers."""
    pairs = [pair(name, seed) for seed in range(4)]
    layers = [0, 2, 0, 2]
    theirs = reft_model([p[0] for p in pairs], layers, tiny_model("llama"))
    ours = reft_model([p[1] for p in pairs], layers, tiny_model("llama"))
    items = examples(1, positions="f2+l3", num_interventions=4, share_weights=False, seed=3, min_prompt=9)
    assert_same_model_outputs(theirs, ours, collate(items, theirs.model))
    # prompts of >= 4 tokens: shorter ones make pyreft's get_intervention_locations fall back to its tied
    # layout for that row (another length), which no collator can batch
    items = examples(4, positions="f2+l3", num_interventions=4, share_weights=False, seed=4, min_prompt=5)
    assert_same_model_outputs(theirs, ours, collate(items, theirs.model))


def _run_triton_check():
    assert reft_kernels.backend.resolve("triton", torch.zeros(1, 1, 1)) == "triton"
    for name in ("LoreftIntervention", "NoreftIntervention"):
        theirs, ours = built_pair(name, backend="triton")  # pyreft's classes ignore the extra keyword
        assert all(iv.backend == "triton" for iv in ours.interventions.values())
        batch = collate(examples(2, seed=7), theirs.model)
        assert_same_model_outputs(theirs, ours, batch, rtol=1e-4)
    # the GPU setting: bf16 rows, pyreft's default bf16 W, fp32 R (mixed dtypes in one kernel call)
    theirs, ours = pair("LoreftIntervention", dtype=torch.bfloat16, backend="triton")
    h = torch.randn(3, 5, WIDTH, dtype=torch.bfloat16)
    ya, yb = theirs(h.clone().requires_grad_()), ours(h.clone().requires_grad_())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=0.02, atol=0.02)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [p for _, p in sorted(theirs.named_parameters())], g)
    gb = torch.autograd.grad(yb, [p for _, p in sorted(ours.named_parameters())], g)
    for a, b in zip(ga, gb):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05 * a.abs().max().item())


def test_triton_backend():
    """The fused Triton kernels (the GPU path; under the Triton interpreter on a CPU, which
    tests_pyreft/conftest.py switches on before reft_kernels is imported) against pyreft."""
    assert torch.cuda.is_available() or reft_kernels.backend.INTERPRET
    _run_triton_check()


def _trainer(reft, items, out_dir, steps=3):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True)
    return pyreft.ReftTrainerForCausalLM(model=reft, tokenizer=tokenizer(), args=args, train_dataset=items,
                                         data_collator=pyreft.reft_trainer.make_data_collator(tokenizer(), reft.model))


@pytest.mark.parametrize("name", ["LoreftIntervention", "NoreftIntervention", "DireftIntervention"])
def test_pyreft_trainer_trains_the_same(name, tmp_path):
    """pyreft's ReftTrainerForCausalLM (HF Trainer: its optimizer, data order, loop) for a few steps:
    the drop-in trains, and lands where pyreft's classes land from the same start."""
    theirs, ours = built_pair(name)
    items = examples(6, seed=11)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    results = {}
    for tag, reft in (("pyreft", theirs), ("ours", ours)):
        trainer = _trainer(reft, items, tmp_path / tag)
        out = trainer.train()
        results[tag] = (out.training_loss, {n: p.detach().clone() for n, p in reft.named_parameters()})
    assert torch.isfinite(torch.tensor(results["ours"][0]))
    assert results["ours"][0] == pytest.approx(results["pyreft"][0], rel=1e-4)
    after_t, after_o = results["pyreft"][1], results["ours"][1]
    assert any(not torch.equal(before[n], after_o[n]) for n in before)  # it trained
    for n in after_t:
        torch.testing.assert_close(after_o[n], after_t[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    for iv in ours.interventions.values():  # R stayed orthonormal
        if hasattr(iv, "rotate_layer"):
            assert reft_kernels.orthonormality_error(iv.rotation()) < 1e-5
    # the trainer's own checkpoint writer (save_intervention) takes them: pyreft's keys in every file
    trainer.save_model(str(tmp_path / "ckpt"))
    for key, iv in ours.interventions.items():
        saved = torch.load(tmp_path / "ckpt" / "intervenable_model" / f"intkey_{key}.bin", weights_only=True)
        assert list(saved) == list(theirs.interventions[key].state_dict())


def _read_states(directory, reft):
    return {k: torch.load(os.path.join(directory, f"intkey_{k}.bin"), weights_only=True) for k in reft.interventions}


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_into_pyreft_classes(name, tmp_path):
    """pyreft.ReftModel.save of a drop-in model writes what pyreft's classes write; pyreft's classes load
    the files (as pyvene's loader does: construct, then load_state_dict) and reproduce the outputs."""
    theirs, ours = built_pair(name, seed=20)
    batch = collate(examples(3, seed=21), ours.model)
    with torch.no_grad():
        ours_logits = run(ours, batch).logits
    ours.save(str(tmp_path / "ours"))
    theirs.save(str(tmp_path / "theirs"))
    so, st = _read_states(tmp_path / "ours", ours), _read_states(tmp_path / "theirs", theirs)
    for k in st:
        assert list(so[k]) == list(st[k])
        for key in st[k]:
            assert so[k][key].shape == st[k][key].shape and so[k][key].dtype == st[k][key].dtype
            torch.testing.assert_close(so[k][key], st[k][key], rtol=0, atol=0)  # same state -> same file
    cfg_o = json.load(open(tmp_path / "ours" / "config.json"))
    cfg_t = json.load(open(tmp_path / "theirs" / "config.json"))
    assert all("reft_kernels.interop.pyreft_dropin." + name in t for t in cfg_o["intervention_types"])
    # fresh pyreft-class interventions (other random state) load the drop-in's files
    fresh = reft_model([getattr(pyreft, name)(**_kwargs(name)) for _ in range(2)], (0, 2), tiny_model("llama"))
    for k, iv in fresh.interventions.items():
        iv.load_state_dict(so[k])
    with torch.no_grad():
        _close(run(fresh, batch).logits, ours_logits, 1e-5, "logits after loading into pyreft's classes")
    # after switching the class names, the two directories are the same files byte for byte
    assert D.set_checkpoint_classes(tmp_path / "ours", "pyreft") == 2
    assert cfg_t["intervention_types"] == [f"<class 'pyreft.interventions.{name}'>"] * 2
    for f in sorted(os.listdir(tmp_path / "theirs")):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f


@pytest.mark.parametrize("name", NAMES)
def test_pyreft_loader_roundtrip(name, tmp_path):
    """pyreft.ReftModel.load on a directory saved from drop-ins: rebuilds the drop-ins (the names in
    config.json) with the outputs bit for bit; after set_checkpoint_classes(dir, "pyreft") it builds
    pyreft's stock classes, which reproduce them to bf16 rounding (pyreft's W h + b runs in bf16).
    bf16 throughout: pyreft's loader rebuilds W in its default bf16, whatever it was saved in. pyreft's
    loader cannot rebuild NoReFT/NodiReFT at all (KeyError 'add_bias'); the drop-ins default it, and take
    b2 from the file."""
    torch.manual_seed(30)
    # act_fn None: no checkpoint records it, so any loader rebuilds pyreft's default (identity)
    ivs = [D.CLASSES[name](**_kwargs(name, torch.bfloat16, act_fn=None)) for _ in range(2)]
    for i, iv in enumerate(ivs):
        _perturb(iv, 30 + i)
    model = tiny_model("llama").to(torch.bfloat16)
    ours = reft_model(ivs, (0, 2), model)
    batch = collate(examples(3, seed=31), model)
    with torch.no_grad():
        ref = run(ours, batch).logits
    ours.save(str(tmp_path))
    back = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama").to(torch.bfloat16))
    assert all(type(iv) is D.CLASSES[name] for iv in back.interventions.values())
    with torch.no_grad():
        assert torch.equal(run(back, batch).logits, ref)
    D.set_checkpoint_classes(tmp_path, "pyreft")
    if name in ("NoreftIntervention", "NodireftIntervention"):
        with pytest.raises(KeyError, match="add_bias"):
            pyreft.ReftModel.load(str(tmp_path), tiny_model("llama").to(torch.bfloat16))
        return
    stock = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama").to(torch.bfloat16))
    assert all(type(iv) is getattr(pyreft, name) for iv in stock.interventions.values())
    with torch.no_grad():
        got = run(stock, batch).logits
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_generate_matches_pyreft():
    """pyreft's generation path (intervene_on_prompt=True, the prompt edited once at prefill, decode steps
    untouched), greedy: the same tokens; the in-place edit of pyvene's gathered rows is safe here too."""
    theirs, ours = built_pair("LoreftIntervention", seed=40)
    items = examples(2, seed=41, min_prompt=8)
    prompt_len = min(len(x["input_ids"]) for x in items) - 4
    ids = torch.tensor([x["input_ids"][1:prompt_len + 1] for x in items])
    locs = [[list(range(3)) + list(range(prompt_len - 3, prompt_len))] * 2] * 2  # [n][B][P]
    outs = []
    for reft in (theirs, ours):
        with torch.no_grad():
            _, gen = reft.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                   unit_locations={"sources->base": (None, locs)}, intervene_on_prompt=True,
                                   max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        outs.append(gen)
    assert torch.equal(outs[0], outs[1])


def test_rotation_cache_inplace_and_dropout():
    torch.manual_seed(0)
    iv = D.LoreftIntervention(embed_dim=WIDTH, low_rank_dimension=RANK, dtype=torch.float32)
    # trainable: computed on every call (a fresh graph); frozen: computed once, until the state changes
    calls = []
    weight_param = iv.rotate_layer.parametrizations.weight
    hook = weight_param.register_forward_hook(lambda *a: calls.append(1))
    iv.rotation(), iv.rotation()
    assert len(calls) == 2
    iv.requires_grad_(False)
    R = iv.rotation()
    iv.rotation(), iv.rotation()
    assert len(calls) == 3
    state = copy.deepcopy(iv.state_dict())
    torch.manual_seed(1)
    other = D.LoreftIntervention(embed_dim=WIDTH, low_rank_dimension=RANK, dtype=torch.float32)
    iv.load_state_dict(other.state_dict())  # pyreft's compact dict: R imported exactly
    assert torch.equal(iv.rotation(), other.rotation()) and not torch.equal(iv.rotation(), R)
    assert reft_kernels.orthonormality_error(weight_param[0].base.t()) < 1e-5  # the d x d base stays orthogonal
    iv.load_state_dict(state)
    assert torch.equal(iv.rotation(), R)
    hook.remove()

    # copies (pyvene's save deep-copies its config, interventions included) keep R and rotate_layer one module
    twin = copy.deepcopy(iv)
    assert twin.__dict__["_orthonormal"].householder is twin.rotate_layer
    assert torch.equal(twin.rotation(), R) and twin.rotate_layer is not iv.rotate_layer

    # a parent module's state dict holds the full state and round-trips (pyreft's drops LoReFT)
    parent = torch.nn.ModuleDict({"a": iv})
    sd = parent.state_dict()
    assert "a.rotate_layer.parametrizations.weight.original" in sd
    torch.nn.ModuleDict({"a": other}).load_state_dict(sd)
    assert torch.equal(other.rotation(), iv.rotation())

    # in place on a tensor pyvene would pass; a copy where that is not allowed or not wanted
    iv.requires_grad_(True)
    x = torch.randn(2, 3, WIDTH)
    y = iv(x)
    assert y is x
    leaf = torch.randn(2, 3, WIDTH, requires_grad=True)
    y = iv(leaf)
    assert y is not leaf and y.requires_grad
    y.sum().backward()
    assert leaf.grad is not None
    keep = torch.randn(2, 3, WIDTH)
    copy_iv = D.LoreftIntervention(embed_dim=WIDTH, low_rank_dimension=RANK, dtype=torch.float32, inplace=False)
    before = keep.clone()
    copy_iv(keep)
    assert torch.equal(keep, before)
    # any leading shape, as pyreft's forward takes
    rows = torch.randn(5, WIDTH)
    assert iv(rows.clone()).shape == (5, WIDTH)
    torch.testing.assert_close(iv(rows.clone()), iv(rows[None].clone())[0])

    # dropout: the whole edited row, only in training mode (the nn.Dropout's flag, as pyreft)
    drop = D.LoreftIntervention(embed_dim=WIDTH, low_rank_dimension=RANK, dtype=torch.float32, dropout=0.5)
    no_drop = D.LoreftIntervention(embed_dim=WIDTH, low_rank_dimension=RANK, dtype=torch.float32)
    no_drop.load_state_dict(torch.nn.Module.state_dict(drop))
    h = torch.randn(4, 6, WIDTH)
    ref = no_drop(h.clone())
    out = drop(h.clone())
    kept = out != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(out[kept], 2 * ref[kept])
    drop.eval()
    torch.testing.assert_close(drop(h.clone()), ref)


def test_mixed_dtypes_and_bf16_against_pyreft():
    """bf16 model with pyreft's default bf16 W: the drop-in agrees with pyreft to bf16 rounding (it computes
    W h + b in fp32); fp32 hidden states with bf16 W, which pyreft refuses, run."""
    theirs, ours = pair("LoreftIntervention", dtype=torch.bfloat16)
    h = torch.randn(3, 5, WIDTH, dtype=torch.bfloat16)
    a, b = theirs(h.clone()), ours(h.clone())
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=0.02, atol=0.02)
    with pytest.raises(RuntimeError):
        theirs(h.float())
    torch.testing.assert_close(ours(h.float()), b.float(), rtol=0.02, atol=0.02)


def test_import_does_not_pull_in_pyreft():
    code = ("import sys, reft_kernels; assert 'pyvene' not in sys.modules and 'pyreft' not in sys.modules; "
            "import reft_kernels.interop.pyreft_dropin; assert 'pyreft' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
