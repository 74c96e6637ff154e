"""pyreft checkpoints <-> reft_kernels (reft_kernels/interop/pyreft_checkpoint.py), against the real pyreft 0.1.0.

Every comparison runs the same inputs and positions through a pyreft model (pyvene's unit_locations) and
through our ReftModel, each on its own copy of the same tiny base model (pyvene removes every hook of the
model it wraps on each call). fp32 comparisons use fp32 interventions on both sides: relative error of the
logits < 1e-5, and the edit itself must move the logits by far more than that.

Where pyreft's own loader cannot rebuild a model (fp32 W, NoReFT, NodiReFT), we compare against pyreft's
in-memory model, and a test pins what pyreft's loader does instead.
"""
import copy
import json
import os
import shutil

import pytest
import torch

from hf_models import tiny_model
from reft_kernels.interop.pyreft_checkpoint import load_pyreft, orthogonal_state, orthogonal_weight, save_pyreft
from reft_kernels.modules.orthonormal import orthonormality_error

D = 48  # tiny_model width
RANK = 3
TYPES = ("LoreftIntervention", "NoreftIntervention", "ConsreftIntervention", "LobireftIntervention",
         "DireftIntervention", "NodireftIntervention")
KIND = {"LoreftIntervention": "loreft", "NoreftIntervention": "noreft", "ConsreftIntervention": "consreft",
        "LobireftIntervention": "lobireft", "DireftIntervention": "orthodireft", "NodireftIntervention": "direft"}
LAYERS = (2, 0, 2)  # a repeated site: keys layer_2#0, layer_0#0, layer_2#1; two edits applied in order at layer 2


# -- helpers ----------------------------------------------------------------------------------------

def pyreft_model(pyreft, base, specs, *, dtype=torch.float32, seed=0, act=None):
    """A pyreft model with one intervention per spec (type name, layer[, component]) and random parameters.
    NoReFT/NodiReFT get add_bias=True (NoReFT's b2 is then used; NodiReFT's is not)."""
    reps = []
    for spec in specs:
        name, layer = spec[:2]
        component = spec[2] if len(spec) > 2 else "block_output"
        kwargs = dict(embed_dim=D, low_rank_dimension=RANK, dtype=dtype)
        if name in ("NoreftIntervention", "NodireftIntervention"):
            kwargs["add_bias"] = True
        if act is not None:
            kwargs["act_fn"] = act
        reps.append({"layer": layer, "component": component, "low_rank_dimension": RANK,
                     "intervention": getattr(pyreft, name)(**kwargs)})
    model = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=reps))
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(pyreft_model, seed):
    """Random values for every trained tensor. The Householder `original` keeps its ±1 diagonal (torch's
    map reads its sign) and gets a random strict lower triangle, so R is a non-trivial Householder product
    of the (orthogonal, random) base; the ignored upper triangle gets noise too."""
    gen = torch.Generator().manual_seed(seed)
    for intervention in pyreft_model.interventions.values():
        for name, p in intervention.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            if name.endswith("original"):
                noise.diagonal().zero_()
                p.add_(noise)
            else:
                p.copy_(noise.to(p.dtype))


def inputs(batch=3, length=10, seed=0, n=len(LAYERS), positions=2):
    """Random ids; row 1 left padded, row 2 right padded; positions [B, n, P] inside each row's tokens,
    distinct within a row (pyreft has no "no edit" slot, so no -1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, :3] = 0
    if batch > 2:
        mask[2, -2:] = 0
    locs = torch.empty(batch, n, positions, dtype=torch.long)
    for b in range(batch):
        valid = mask[b].nonzero().flatten()
        for i in range(n):
            locs[b, i] = valid[torch.randperm(len(valid), generator=gen)[:positions]]
    return ids, mask, locs


@torch.no_grad()
def pyreft_logits(model, ids, mask, locs):
    out = model(base={"input_ids": ids, "attention_mask": mask},
                unit_locations={"sources->base": (None, locs.permute(1, 0, 2).tolist())})
    return out[1].logits.float()


@torch.no_grad()
def our_logits(reft, ids, mask, locs):
    return reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits.float()


@torch.no_grad()
def base_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def to_dotted(directory):
    """Rewrites a checkpoint into pyvene < 0.1.7's key spelling (layer.{l}.comp.{c}.unit.pos.nunit.1#{k})."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    old = config["sorted_keys"]
    new = []
    for key in old:
        site, copy = key.split("#")
        layer = site.split("_comp_")[0][len("layer_"):]
        component = site.split("_comp_")[1].split("_unit_")[0]
        new.append(f"layer.{layer}.comp.{component}.unit.pos.nunit.1#{copy}")
        os.rename(os.path.join(directory, f"intkey_{key}.bin"), os.path.join(directory, f"intkey_{new[-1]}.bin"))
    config["sorted_keys"] = new
    with open(path, "w") as f:
        json.dump(config, f)
    return new


def pyreft_R(intervention):
    """pyreft's R as [rank, dim]."""
    return intervention.rotate_layer.weight.detach().t()


# -- pyreft checkpoint -> load_pyreft ------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["underscore", "dotted"])
@pytest.mark.parametrize("name", TYPES)
def test_load_each_type_matches_pyreft(pyreft, tmp_path, name, spelling):
    theirs = pyreft_model(pyreft, tiny_model("llama"), [(name, layer) for layer in LAYERS])
    ids, mask, locs = inputs()
    expected = pyreft_logits(theirs, ids, mask, locs)
    theirs.save(str(tmp_path))
    if spelling == "dotted":
        assert to_dotted(str(tmp_path))[0] == "layer.2.comp.block_output.unit.pos.nunit.1#0"
    ours = load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32, add_bias=name == "NoreftIntervention")
    assert list(ours.interventions) == list(theirs.sorted_keys)
    assert [type(m).kind for m in ours.interventions.values()] == [KIND[name]] * len(LAYERS)
    got = our_logits(ours, ids, mask, locs)
    assert rel(got, expected) < 1e-5
    assert rel(base_logits(tiny_model("llama"), ids, mask), expected) > 0.05  # the edits matter
    for key, mine in ours.interventions.items():
        other = theirs.interventions[key]
        if mine.orthonormal:  # R rebuilt from pyreft's file equals the R pyreft computes
            assert (mine.lift() - pyreft_R(other)).abs().max() < 1e-6
    if name == "NodireftIntervention":  # pyreft's unused proj bias is dropped
        assert all(getattr(m, "proj_bias", None) is None for m in ours.interventions.values())
    if name in ("ConsreftIntervention", "LobireftIntervention") and spelling == "underscore":
        # pyreft's own loader works for these two (fp32 b, fp32 R): same outputs as pyreft's loaded model
        loaded = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"))
        assert rel(got, pyreft_logits(loaded, ids, mask, locs)) < 1e-5


def test_gpt2_every_component(pyreft, tmp_path):
    """GPT-2 (Conv1D blocks, tuple outputs) with the four components pyvene and reft_kernels share."""
    specs = [("LoreftIntervention", 0, "block_input"), ("DireftIntervention", 1, "attention_output"),
             ("NoreftIntervention", 2, "mlp_output"), ("ConsreftIntervention", 1, "block_output")]
    theirs = pyreft_model(pyreft, tiny_model("gpt2"), specs)
    ids, mask, locs = inputs(n=len(specs), seed=1)
    expected = pyreft_logits(theirs, ids, mask, locs)
    theirs.save(str(tmp_path))
    ours = load_pyreft(tiny_model("gpt2"), tmp_path, dtype=torch.float32, add_bias=None)
    assert [(r.layer, r.component) for r in ours.reft_config.representations] == [s[1:] for s in specs]
    assert rel(our_logits(ours, ids, mask, locs), expected) < 1e-5
    assert rel(base_logits(tiny_model("gpt2"), ids, mask), expected) > 0.05


def test_bf16_matches_pyreft_loader(pyreft, tmp_path):
    """pyreft's defaults end to end: a bf16 model, bf16 W, saved and reloaded by pyreft itself, against
    load_pyreft with its defaults. pyreft rounds Wh + b to bf16, reft_kernels keeps it in fp32: the logits
    agree to bf16 rounding, and each intervention's output to within 2 bf16 ulps."""
    specs = [("LoreftIntervention", 1), ("DireftIntervention", 2), ("LobireftIntervention", 0)]
    theirs = pyreft_model(pyreft, tiny_model("llama").to(torch.bfloat16), specs, dtype=torch.bfloat16)
    theirs.save(str(tmp_path))
    loaded = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama").to(torch.bfloat16))
    ours = load_pyreft(tiny_model("llama").to(torch.bfloat16), tmp_path)
    ids, mask, locs = inputs(n=len(specs), seed=2)
    expected = pyreft_logits(loaded, ids, mask, locs)
    got = our_logits(ours, ids, mask, locs)
    assert rel(got, expected) < 1e-2
    assert rel(base_logits(tiny_model("llama").to(torch.bfloat16), ids, mask), expected) > 0.1
    # each intervention on its own, against the exact result (pyreft's module run in float64 on the same
    # bf16/fp32 parameters): ours is within one bf16 ulp of it, and never further off than pyreft's own
    h = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    everywhere = torch.arange(16).expand(2, 16)
    for key, mine in ours.interventions.items():
        # pyreft's defaults: W, b in bf16; LobiReFT's b in fp32 (pyreft ignores dtype there)
        assert mine.bias.dtype == (torch.bfloat16 if mine.source_linear else torch.float32)
        with torch.no_grad():
            theirs_out = loaded.interventions[key](h.clone()).double()
            exact = copy.deepcopy(loaded.interventions[key]).double()(h.double())
            have = mine(h.clone(), everywhere).double()
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -12))) - 7)
        assert ((have - exact).abs() <= ulp).all(), key
        assert (have - exact).abs().max() <= (theirs_out - exact).abs().max(), key


def test_trainer_checkpoint_without_config(pyreft, tmp_path):
    """What pyreft's Trainer writes (ReftTrainer.save_model -> save_intervention): intkey files and a
    pytorch_model.bin of the base model's trainable parameters, no config.json. Batch of 1."""
    specs = [("LoreftIntervention", 1), ("NoreftIntervention", 0), ("LobireftIntervention", 1)]
    theirs = pyreft_model(pyreft, tiny_model("llama"), specs)
    norm = theirs.model.model.norm  # an unfrozen base-model module, trained with the interventions
    norm.weight.requires_grad_(True)
    with torch.no_grad():
        norm.weight.mul_(1.5)
    target = tmp_path / "checkpoint-5" / "intervenable_model"
    theirs.save_intervention(str(target), include_model=True)
    assert not (target / "config.json").exists()
    ids, mask, locs = inputs(batch=1, n=len(specs), seed=4)
    expected = pyreft_logits(theirs, ids, mask, locs)
    with pytest.raises(FileNotFoundError, match="representations="):
        load_pyreft(tiny_model("llama"), target)
    reps = [{"layer": 1, "intervention": "loreft", "low_rank_dimension": RANK},
            {"layer": 0, "intervention": "NoreftIntervention", "low_rank_dimension": RANK, "add_bias": True},
            {"layer": 1, "intervention": "lobireft", "low_rank_dimension": RANK}]
    ours = load_pyreft(tiny_model("llama"), target, representations=reps, dtype=torch.float32)
    assert ours.reft_config.unfrozen_modules == ["model.norm"]
    assert rel(our_logits(ours, ids, mask, locs), expected) < 1e-5
    # the same directory spelled as pyvene < 0.1.7 did (no config to read the keys from)
    for f in os.listdir(target):
        if f.startswith("intkey_"):
            layer, rest = f[len("intkey_layer_"):].split("_comp_block_output_unit_pos_nunit_1")
            os.rename(target / f, target / f"intkey_layer.{layer}.comp.block_output.unit.pos.nunit.1{rest}")
    ours = load_pyreft(tiny_model("llama"), target, representations=reps, dtype=torch.float32)
    assert rel(our_logits(ours, ids, mask, locs), expected) < 1e-5


def test_untied_prefix_suffix_checkpoint(pyreft, tmp_path):
    """share_weights=False: pyreft's training script builds `layers + layers` (prefix interventions, then
    suffix ones); load_pyreft maps them onto one representation per layer, doubled by the position scheme."""
    specs = [("LoreftIntervention", 0), ("LoreftIntervention", 2)] * 2
    theirs = pyreft_model(pyreft, tiny_model("llama"), specs)
    theirs.save(str(tmp_path))
    ours = load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32, positions="f2+l2", share_weights=False)
    assert len(ours.reft_config.representations) == 2 and ours.num_interventions == 4
    assert list(ours.interventions) == list(theirs.sorted_keys)
    ids, mask, _ = inputs(seed=5)
    locs = ours.locations(mask)  # [B, 4, 2]: prefix slots for #0, suffix slots for #1
    assert locs.shape == (3, 4, 2) and (locs >= 0).all()
    assert rel(our_logits(ours, ids, mask, locs), pyreft_logits(theirs, ids, mask, locs)) < 1e-5
    with pytest.raises(ValueError, match="same list twice"):
        shutil.copytree(tmp_path, tmp_path / "odd")
        with open(tmp_path / "odd" / "config.json") as f:
            config = json.load(f)
        config["representations"][3][0] = 1
        with open(tmp_path / "odd" / "config.json", "w") as f:
            json.dump(config, f)
        load_pyreft(tiny_model("llama"), tmp_path / "odd", positions="f2+l2", share_weights=False)


# -- save_pyreft -> pyreft.ReftModel.load --------------------------------------------------------------

def our_model(kind, *, parametrization="stereographic", dtype=None, seed=0, layers=LAYERS, add_bias=False):
    import reft_kernels as rk

    reps = [{"layer": layer, "intervention": kind, "low_rank_dimension": RANK, "dtype": dtype,
             "add_bias": add_bias} for layer in layers]
    if kind in ("loreft", "consreft", "lobireft", "orthodireft"):
        for rep in reps:
            rep["parametrization"] = parametrization
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(representations=reps))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in reft.interventions.values():
            for name, p in m.named_parameters():
                if name.startswith("rotation."):
                    continue
                p.copy_((torch.randn(p.shape, generator=gen) * 0.3).to(p.dtype))
            if m.orthonormal:  # a random orthonormal R
                q, _ = torch.linalg.qr(torch.randn(D, RANK, generator=gen))
                m.rotation.set_(q.t())
    return reft


@pytest.mark.parametrize("kind,parametrization", [
    ("loreft", "stereographic"), ("loreft", "householder"), ("consreft", "cholesky_qr"),
    ("lobireft", "stereographic"), ("orthodireft", "householder"), ("orthodireft", "stereographic"),
    ("noreft", None), ("direft", None)])
def test_save_pyreft_loads_in_pyreft(pyreft, tmp_path, kind, parametrization):
    add_bias = kind == "noreft"
    mine = our_model(kind, parametrization=parametrization or "stereographic", add_bias=add_bias)
    ids, mask, locs = inputs(seed=6)
    expected = our_logits(mine, ids, mask, locs)
    save_pyreft(mine, tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["sorted_keys"] == list(mine.interventions)
    name = {v: k for k, v in KIND.items()}[kind]
    assert config["intervention_types"] == [f"<class 'pyreft.interventions.{name}'>"] * len(LAYERS)
    if kind in ("noreft", "direft"):
        # pyreft's loader cannot build these (pinned below); the files load into pyreft's own modules
        with pytest.raises(KeyError, match="add_bias"):
            pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"))
        theirs = pyreft_model(pyreft, tiny_model("llama"), [(name, layer) for layer in LAYERS])
        if kind == "direft":  # reft_kernels' DiReFT has no (unused) proj bias: pyreft's add_bias=False
            theirs = pyreft.get_reft_model(tiny_model("llama"), pyreft.ReftConfig(representations=[
                {"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
                 "intervention": getattr(pyreft, name)(embed_dim=D, low_rank_dimension=RANK, add_bias=False)}
                for layer in LAYERS]))
        for key, intervention in theirs.interventions.items():
            intervention.load_state_dict(torch.load(tmp_path / f"intkey_{key}.bin"))  # strict
    else:
        theirs = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"))
    for key, m in mine.interventions.items():
        other = theirs.interventions[key]
        if m.orthonormal:  # pyreft computes our R bit for bit from the files
            assert torch.equal(pyreft_R(other), m.lift())
            if kind != "loreft":  # our (original, base) pair: base is orthogonal
                assert orthonormality_error(other.rotate_layer.parametrizations.weight[0].base) < 1e-5
        if m.source_linear:
            # pyreft's loader builds W in bf16 (ours is bf16 by default, so the values are exact); cast to fp32
            # so that pyreft can run the fp32 model (its LoReFT cannot mix an fp32 h with a bf16 W)
            w = other.learned_source.weight
            assert torch.equal(w.float(), m.weight.float())
            other.learned_source.float()
            if not m.orthonormal:
                other.proj_layer.float()
    assert rel(pyreft_logits(theirs, ids, mask, locs), expected) < 1e-5
    # and back: load_pyreft(save_pyreft(x)) is x
    again = load_pyreft(tiny_model("llama"), tmp_path, add_bias=None)
    assert rel(our_logits(again, ids, mask, locs), expected) < 1e-6


def test_save_pyreft_untied_and_unfrozen(pyreft, tmp_path):
    """An untied prefix/suffix adapter with an unfrozen module: pyreft reads the doubled representation list
    in our order and the module weights with include_model=True; load_pyreft reads both back."""
    import reft_kernels as rk

    reps = [{"layer": layer, "intervention": "loreft", "low_rank_dimension": RANK} for layer in (0, 2)]
    mine = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(representations=reps, positions="f2+l2",
                                                                 share_weights=False, unfrozen_modules=["model.norm"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in mine.interventions.values():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen).to(m.weight.dtype))
        mine.model.model.norm.weight.mul_(1.5)
    ids, mask, _ = inputs(seed=7)
    locs = mine.locations(mask)
    expected = our_logits(mine, ids, mask, locs)
    save_pyreft(mine, tmp_path)
    theirs = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"), include_model=True)
    assert theirs.sorted_keys == list(mine.interventions)
    for v in theirs.interventions.values():
        v.learned_source.float()
    assert rel(pyreft_logits(theirs, ids, mask, locs), expected) < 1e-5
    again = load_pyreft(tiny_model("llama"), tmp_path, positions="f2+l2", share_weights=False)
    assert again.reft_config.unfrozen_modules == ["model.norm"]
    assert rel(our_logits(again, ids, mask, locs), expected) < 1e-6


def test_orthogonal_state_is_torch_right_inverse(pyreft):
    """The (original, base) pair save_pyreft writes: torch's right_inverse of the orthogonal parametrization
    (original = -I, base an orthogonal completion of Rᵀ), and torch's own forward maps it to R exactly;
    orthogonal_weight reproduces torch's forward bit for bit on a random Householder state."""
    R = torch.linalg.qr(torch.randn(D, RANK))[0].t()
    layer = pyreft.interventions.LowRankRotateLayer(D, RANK)
    rotate = torch.nn.utils.parametrizations.orthogonal(layer)
    original, base = orthogonal_state(R)
    with torch.no_grad():
        rotate.weight = R.t()  # torch's right_inverse, for comparison
    torch_original = rotate.parametrizations.weight.original.detach().clone()
    assert torch.equal(original, torch_original)
    assert (base[:, :RANK] - rotate.parametrizations.weight[0].base[:, :RANK]).abs().max() < 1e-6
    assert orthonormality_error(base) < 1e-5
    with torch.no_grad():
        rotate.parametrizations.weight.original.copy_(original)
        rotate.parametrizations.weight[0].base.copy_(base)
        assert torch.equal(rotate.weight, R.t())
        # a random state: the same ops as torch's forward give the same bits
        rotate.parametrizations.weight.original.add_(torch.randn(D, RANK).tril(-1))
        ref = rotate.weight.clone()
    assert torch.equal(orthogonal_weight(rotate.parametrizations.weight.original.detach(),
                                         rotate.parametrizations.weight[0].base), ref)
    # square R: torch's default map is matrix_exp there
    square = torch.nn.utils.parametrizations.orthogonal(pyreft.interventions.LowRankRotateLayer(6, 6))
    with torch.no_grad():
        square.parametrizations.weight.original.add_(torch.randn(6, 6))
        assert torch.equal(orthogonal_weight(square.parametrizations.weight.original,
                                             square.parametrizations.weight[0].base), square.weight)
        Q = torch.linalg.qr(torch.randn(6, 6))[0]
        assert torch.equal(orthogonal_weight(*orthogonal_state(Q.t())), Q)


# -- deliberate differences from pyreft's loader, pinned ---------------------------------------------------

def test_pyreft_loader_rounds_fp32_w_to_bf16(pyreft, tmp_path):
    """pyreft stores no dtype and its loader rebuilds W in bf16: an fp32 LoReFT comes back rounded, and can no
    longer run its fp32 model. load_pyreft takes dtype (default bf16, the same rounding; float32 keeps the
    saved values)."""
    theirs = pyreft_model(pyreft, tiny_model("llama"), [("LoreftIntervention", 1)])
    theirs.save(str(tmp_path))
    saved = theirs.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].learned_source.weight.detach()
    loaded = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"))
    w = loaded.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].learned_source.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, saved.to(torch.bfloat16))
    ids, mask, locs = inputs(n=1)
    with pytest.raises(RuntimeError, match="dtype"):
        pyreft_logits(loaded, ids, mask, locs)
    default = load_pyreft(tiny_model("llama"), tmp_path).interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"]
    assert default.weight.dtype == torch.bfloat16 and torch.equal(default.weight, saved.to(torch.bfloat16))
    exact = load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32)
    assert torch.equal(exact.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].weight, saved)
    stored = load_pyreft(tiny_model("llama"), tmp_path, dtype=None)  # dtype=None: as saved
    assert stored.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"].weight.dtype == torch.float32


@pytest.mark.parametrize("name", ["NoreftIntervention", "NodireftIntervention"])
def test_pyreft_cannot_load_noreft_nodireft(pyreft, tmp_path, name):
    """pyreft's loader builds every intervention without add_bias, which these two require."""
    pyreft_model(pyreft, tiny_model("llama"), [(name, 0)]).save(str(tmp_path))
    with pytest.raises(KeyError, match="add_bias"):
        pyreft.ReftModel.load(str(tmp_path), tiny_model("llama"))
    assert load_pyreft(tiny_model("llama"), tmp_path, add_bias=None).num_interventions == 1


def test_pyreft_loreft_reload_breaks_base_ours_does_not(pyreft, tmp_path):
    """pyreft's LoReFT loader writes R into the first r columns of a fresh `base`, which is then not
    orthogonal (further training drifts off orthonormality). load_pyreft rebuilds a consistent
    parametrization (householder here: torch's right_inverse around R; stereographic by default)."""
    theirs = pyreft_model(pyreft, tiny_model("llama"), [("LoreftIntervention", 1)])
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    theirs.save(str(tmp_path))
    loaded = pyreft.ReftModel.load(str(tmp_path), tiny_model("llama")).interventions[key]
    assert orthonormality_error(loaded.rotate_layer.parametrizations.weight[0].base) > 1e-2
    for parametrization in ("householder", "stereographic", "cholesky_qr"):
        ours = load_pyreft(tiny_model("llama"), tmp_path, parametrization=parametrization).interventions[key]
        assert ours.rotation.parametrization == parametrization
        assert (ours.lift() - pyreft_R(theirs.interventions[key])).abs().max() < 1e-6
        if parametrization == "householder":
            assert orthonormality_error(ours.rotation.inputs()[1]) < 1e-5


def test_act_is_not_stored(pyreft, tmp_path):
    """pyreft stores no activation: its loader rebuilds identity, so a relu-trained adapter changes output.
    load_pyreft(act=...) restores it; save_pyreft warns when it writes an adapter with an activation."""
    theirs = pyreft_model(pyreft, tiny_model("llama"), [("DireftIntervention", 1), ("LoreftIntervention", 2)],
                          act="relu")
    theirs.save(str(tmp_path))
    ids, mask, locs = inputs(n=2, seed=8)
    expected = pyreft_logits(theirs, ids, mask, locs)
    identity = load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32)
    relu = load_pyreft(tiny_model("llama"), tmp_path, dtype=torch.float32, act="relu")
    assert rel(our_logits(relu, ids, mask, locs), expected) < 1e-5
    assert rel(our_logits(identity, ids, mask, locs), expected) > 1e-2
    with pytest.warns(UserWarning, match="relu"):
        save_pyreft(relu, tmp_path / "again")


# -- errors ------------------------------------------------------------------------------------------

@pytest.fixture
def saved(pyreft, tmp_path):
    pyreft_model(pyreft, tiny_model("llama"), [("LoreftIntervention", 2), ("NoreftIntervention", 0)]).save(
        str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def edit_config(directory, fn):
    with open(directory / "config.json") as f:
        config = json.load(f)
    fn(config)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)


def test_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pyreft(tiny_model("llama"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no intkey"):
        load_pyreft(tiny_model("llama"), tmp_path / "empty")
    with pytest.raises(ValueError, match="hidden size 64"):
        load_pyreft(tiny_model("llama", hidden_size=64), saved, add_bias=True)
    with pytest.raises(ValueError, match="edits layer 2; this LlamaForCausalLM has 2 layers"):
        load_pyreft(tiny_model("llama", num_hidden_layers=2), saved, add_bias=True)
    with pytest.raises(ValueError, match="add_bias=True"):
        load_pyreft(tiny_model("llama"), saved)  # the NoReFT file has a proj_layer.bias
    with pytest.raises(ValueError, match="do not match"):
        load_pyreft(tiny_model("llama"), saved, representations=[
            {"layer": 2, "intervention": "loreft", "low_rank_dimension": RANK},
            {"layer": 0, "intervention": "direft", "low_rank_dimension": RANK}])

    wrong_type = tmp_path / "wrong_type"
    shutil.copytree(saved, wrong_type)
    edit_config(wrong_type, lambda c: c["intervention_types"].__setitem__(
        0, "<class 'pyvene.models.interventions.LowRankRotatedSpaceIntervention'>"))
    with pytest.raises(ValueError, match="LowRankRotatedSpaceIntervention.*not one reft_kernels can load"):
        load_pyreft(tiny_model("llama"), wrong_type, add_bias=True)

    missing = tmp_path / "missing"
    shutil.copytree(saved, missing)
    os.remove(missing / "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin")
    with pytest.raises(FileNotFoundError, match="intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin"):
        load_pyreft(tiny_model("llama"), missing, add_bias=True)

    # a Trainer checkpoint with the wrong types named: the files say what they hold
    trainer = tmp_path / "trainer"
    shutil.copytree(saved, trainer)
    os.remove(trainer / "config.json")
    with pytest.raises(ValueError, match="is the intervention type right"):
        load_pyreft(tiny_model("llama"), trainer, representations=[
            {"layer": 2, "intervention": "consreft", "low_rank_dimension": RANK},
            {"layer": 0, "intervention": "noreft", "low_rank_dimension": RANK, "add_bias": True}])
    with pytest.raises(ValueError, match=r"shape \(3, 48\), expected \(4, 48\)"):
        load_pyreft(tiny_model("llama"), trainer, representations=[
            {"layer": 2, "intervention": "loreft", "low_rank_dimension": 4},
            {"layer": 0, "intervention": "noreft", "low_rank_dimension": RANK, "add_bias": True}])
