"""ReftModel on nine Hugging Face architectures x four components, against a hand-written reference.

The reference is an identical second model (same seed) with plain forward / forward-pre hooks on the
submodules each component names, found here with explicit per-architecture attribute paths (not with
reft_kernels.integration.locate, which is what is being tested). The hooks compute each edit out of place
in float64 from the ReftModel intervention's own parameters (R via intervention.lift()), with the formula
of reft_kernels/modules/interventions.py's docstring written out per type, and return the replaced hidden
states (the first element of a tuple output). Logits and the gradient of every intervention parameter
(loss = a random projection of the logits) must agree.

Every test uses random parameters, positions with -1 slots (and repeated positions, edited once), and a
right-padded row. Encoders get a masked-LM head (per-token logits, so an edit at any position shows in
them) except in the sequence-classification test. What each test adds:
- component matrix (9 archs x 4 components): layer 0 (block_input there is the embedding output) and the
  last layer, the six types rotating over the matrix;
- batch 1: the four components of one layer at once (interventions nested in one block);
- six types on one site, applied in sequence, with an activation;
- share_weights=False: prefix and suffix copies, each with its own row of the locations;
- inputs_embeds with a layer-0 block_input edit (the caller's tensor must stay as it was);
- freeze=False: base-model gradients too (in-place edits must not disturb the base model's autograd);
- every slot -1: the base model's logits bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import reft_kernels as rk
from conftest import DEVICE
from hf_models import ARCHS, DECODERS, LAYERS, VOCAB, tiny_model

KINDS = ("loreft", "noreft", "consreft", "lobireft", "direft", "orthodireft")
COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")
LAST = LAYERS - 1


def with_backends(cases, triton_on_cpu=None):
    """cases x backends. "torch" is the plain-PyTorch backend (CPU's default); "triton" runs the fused
    kernels: every case on a GPU, and on CPU (the Triton interpreter, about 2-5 s a case) only the cases
    in triton_on_cpu, unless REFT_TEST_ALL_TRITON=1 (about 2 minutes more). The kernels themselves are
    tested on both backends in test_fused_edit.py and test_interventions.py; here triton shows that the
    in-place kernels edit each kind of site."""
    every = DEVICE == "cuda" or os.environ.get("REFT_TEST_ALL_TRITON") == "1"
    out = []
    for case in cases:
        case = case if isinstance(case, tuple) else (case,)
        out.append(case + ("torch",))
        if every or (triton_on_cpu is not None and case in triton_on_cpu):
            out.append(case + ("triton",))
    return out


# Where each component lives, written out per architecture: (block list, mlp, attention), the latter two
# relative to a block. BERT-style encoders: mlp_output is output.dense (before dropout, residual and
# LayerNorm) and attention_output is the attention block's output (after its residual and LayerNorm),
# as pyvene's mappings for BERT define them.
PATHS = {
    "llama": ("model.layers", "mlp", "self_attn"),
    "mistral": ("model.layers", "mlp", "self_attn"),
    "qwen2": ("model.layers", "mlp", "self_attn"),
    "gemma": ("model.layers", "mlp", "self_attn"),
    "phi3": ("model.layers", "mlp", "self_attn"),
    "gpt2": ("transformer.h", "mlp", "attn"),
    "gpt_neox": ("gpt_neox.layers", "mlp", "attention"),
    "bert": ("bert.encoder.layer", "output.dense", "attention"),
    "roberta": ("roberta.encoder.layer", "output.dense", "attention"),
}

# Tolerances. Both models run the same fp32 base model; they differ only in the edit, computed by the
# fused op in fp32 (ReftModel) or in float64 and rounded to fp32 (the reference), i.e. by a few fp32
# ulps at the edited rows, which the remaining layers carry to the logits without amplifying much.
# Measured (CPU, both backends): the worst |error| / (atol + rtol |expected|) is about 0.01 for the
# logits and 0.06 for the gradients, so these bounds leave a wide margin and still catch any wrong site,
# position, order or term (each of those moves the logits by 1e-2 or more; checked below).
LOGITS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_RTOL = 1e-4  # gradients: rtol, and atol = GRAD_RTOL x the largest entry of that gradient


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These models are tiny: intra-op threads only add synchronisation (on a busy 2-core machine, 30 ms
    per 48-wide matmul with 2 threads against 50 us with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# the reference


def site_module(model, arch: str, layer: int, component: str):
    """(module, "input" | "output") that `component` of block `layer` names, by explicit path."""
    blocks, mlp, attention = PATHS[arch]
    block = model.get_submodule(blocks)[layer]
    if component == "block_output":
        return block, "output"
    if component == "block_input":
        return block, "input"
    return block.get_submodule(mlp if component == "mlp_output" else attention), "output"


def reference_edit(intervention, kind: str, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The edit of `kind` at positions [B, P] (-1: none; a position named twice is edited once), written
    from the interventions module's docstring, in float64, out of place; returns hidden's dtype."""
    h = hidden.double()
    B, T, _ = h.shape
    at = torch.zeros(B, T, dtype=torch.bool, device=h.device)
    rows = torch.arange(B, device=h.device)[:, None].expand_as(positions)
    keep = (positions >= 0) & (positions < T)
    at[rows[keep], positions[keep]] = True

    L = intervention.lift().double()  # R or W2, [r, d]
    b = intervention.bias.double()
    act = {"identity": lambda z: z, "tanh": torch.tanh, "relu": torch.relu, "silu": F.silu}[intervention.act]
    if kind in ("loreft", "noreft", "direft", "orthodireft"):
        Wh_b = act(h @ intervention.weight.double().t() + b)
    Lh = h @ L.t()
    if kind == "loreft":  # h + Rᵀ(act(Wh + b) − Rh)
        delta = Wh_b - Lh
    elif kind == "noreft":  # h + W2ᵀ(act(Wh + b) − (W2h + b2))
        b2 = intervention.proj_bias.double() if intervention.proj_bias is not None else 0.0
        delta = Wh_b - (Lh + b2)
    elif kind == "consreft":  # h + Rᵀ(b − Rh)
        delta = b - Lh
    elif kind == "lobireft":  # h + Rᵀb
        delta = b.expand(B, T, -1)
    elif kind in ("direft", "orthodireft"):  # h + W2ᵀ act(Wh + b), h + Rᵀ act(Wh + b)
        delta = Wh_b
    else:
        raise ValueError(kind)
    edited = h + delta @ L
    return torch.where(at[..., None], edited, h).to(hidden.dtype)


class ReferenceHooks:
    """Plain hooks on `model` applying, for each (layer, component, kind, intervention, index) in
    `edits`, reference_edit with locations[:, index] of the current call, in the order given."""

    def __init__(self, model, arch: str, edits):
        self.locations = None
        self.calls = 0
        self.handles = []
        by_site = {}
        for layer, component, kind, intervention, index in edits:
            by_site.setdefault((layer, component), []).append((kind, intervention, index))
        for (layer, component), site in by_site.items():
            module, which = site_module(model, arch, layer, component)
            if which == "input":
                self.handles.append(module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._post_hook(site)))

    def _apply(self, site, hidden):
        if self.locations is None:  # an unedited run
            return hidden
        assert isinstance(hidden, torch.Tensor) and hidden.dim() == 3, type(hidden)
        self.calls += 1
        for kind, intervention, index in site:
            hidden = reference_edit(intervention, kind, hidden, self.locations[:, index])
        return hidden

    def _pre_hook(self, site):
        def hook(module, args, kwargs):
            if args:
                return (self._apply(site, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._apply(site, kwargs["hidden_states"])}

        return hook

    def _post_hook(self, site):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._apply(site, output[0]), *output[1:])
            return self._apply(site, output)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# setup


def randomize(reft, gen: torch.Generator):
    """Every intervention parameter random (an init's zero delta, U[0,1) bias or near-zero W would
    leave terms untested); sizes keep the edit comparable to the hidden states."""
    d = reft.dim
    with torch.no_grad():
        for name, p in reft.interventions.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("rotation.delta"):  # rows rotated well away from base
                p.copy_(z * d**-0.5)
            elif name.endswith("rotation.weight"):
                p.add_(0.3 * z.to(p))
            else:
                p.copy_(z * (d**-0.5 if p.dim() == 2 else 0.5))


def random_locations(gen, attention_mask, n: int, P: int):
    """[B, n, P]: each slot but the first -1 with probability 0.3, else a random real token of its row
    (drawn with replacement, so repeats occur)."""
    B, _ = attention_mask.shape
    lengths = attention_mask.sum(1)
    u = torch.rand(B, n, P, generator=gen)
    locs = (u * lengths[:, None, None]).long()
    drop = torch.rand(B, n, P, generator=gen) < 0.3
    drop[:, :, 0] = False  # every intervention edits every row somewhere
    locs[drop] = -1
    return locs


def random_batch(gen, B: int, T: int, pad_rows=(1,)):
    """input_ids [B, T] (never a pad/special id) and a right-padded attention mask (rows in pad_rows
    lose their last 1..T//2 tokens)."""
    ids = torch.randint(3, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in pad_rows:
        if i < B:
            mask[i, T - 1 - i % (T // 2):] = 0
    return ids, mask


def build(arch, reps, head="auto", backend=None, positions=None, share_weights=True):
    """(ReftModel with randomized parameters, an identical reference model with ReferenceHooks)."""
    if head == "auto":
        head = "causal" if arch in DECODERS else "masked"
    config = rk.ReftConfig(representations=reps, positions=positions, share_weights=share_weights)
    reft = rk.get_reft_model(tiny_model(arch, head=head).to(DEVICE), config, backend=backend)
    randomize(reft, torch.Generator().manual_seed(1234))
    ref_model = tiny_model(arch, head=head).to(DEVICE).requires_grad_(False)
    order = reft.reft_config.interventions()  # (representation, copy) per index of intervention_locations
    ivs = list(reft.interventions.values())  # created in that order
    assert len(ivs) == len(order) == reft.num_interventions
    edits = [(r.layer, r.component, r.intervention, iv, i) for i, ((r, _), iv) in enumerate(zip(order, ivs))]
    return reft, ref_model, ReferenceHooks(ref_model, arch, edits)


def check_against_reference(arch, reps, *, B=3, T=7, P=4, seed=0, head="auto", backend=None, pad_rows=(1,),
                            positions=None, share_weights=True):
    gen = torch.Generator().manual_seed(seed)
    reft, ref_model, hooks = build(arch, reps, head=head, backend=backend, positions=positions,
                                   share_weights=share_weights)
    ids, mask = random_batch(gen, B, T, pad_rows)
    locs = random_locations(gen, mask, reft.num_interventions, P)
    ids, mask, locs = ids.to(DEVICE), mask.to(DEVICE), locs.to(DEVICE)
    params = dict(reft.interventions.named_parameters())
    assert all(p.requires_grad for p in params.values())

    with torch.no_grad():
        base = ref_model(input_ids=ids, attention_mask=mask).logits  # unedited (hooks see no locations)
    hooks.locations = None

    out = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    proj = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad((out * proj).sum(), list(params.values()))

    hooks.locations = locs
    expected = ref_model(input_ids=ids, attention_mask=mask).logits
    ref_grads = torch.autograd.grad((expected * proj).sum(), list(params.values()))
    n_sites = len({(r["layer"], r["component"]) for r in reps})
    assert hooks.calls == n_sites, "the reference hooks did not fire once per site"
    hooks.remove()

    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # not vacuous: the edits change the logits far beyond the tolerance
    assert (expected - base).abs().max() > 1e-2, "the edits left the logits unchanged"
    torch.testing.assert_close(out, expected, **LOGITS_TOL, msg=lambda m: f"{arch} logits: {m}")
    for (name, p), g, e in zip(params.items(), grads, ref_grads):
        assert e.abs().max() > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(g, e, rtol=GRAD_RTOL, atol=GRAD_RTOL * e.abs().max().item(),
                                   msg=lambda m: f"{arch} grad {name}: {m}")
    return reft


def rep(layer, component, kind, rank=2, **kw):
    r = {"layer": layer, "component": component, "intervention": kind, "low_rank_dimension": rank,
         "dtype": torch.float32}
    if kind == "noreft":
        r["add_bias"] = True  # b2 in the formula, and its gradient checked
    return {**r, **kw}


# ---------------------------------------------------------------------------------------------------
# tests


# one case per component through the Triton interpreter on CPU, on four different architectures
MATRIX_TRITON_ON_CPU = [("gemma", "block_input"), ("gpt2", "attention_output"), ("bert", "mlp_output"),
                        ("phi3", "block_output")]


@pytest.mark.parametrize("arch,component,backend",
                         with_backends([(a, c) for a in ARCHS for c in COMPONENTS], MATRIX_TRITON_ON_CPU))
def test_component_matches_reference(arch, component, backend):
    """Layer 0 (block_input there is the embedding output) and the last layer, two types per case; the
    types rotate over the matrix so that every type meets every component at both layers."""
    k = ARCHS.index(arch) + 2 * COMPONENTS.index(component)
    reps = [rep(0, component, KINDS[k % 6], rank=2), rep(LAST, component, KINDS[(k + 3) % 6], rank=3)]
    check_against_reference(arch, reps, seed=k, backend=backend)


@pytest.mark.parametrize("arch,backend", with_backends(ARCHS, [("roberta",)]))
def test_all_components_on_one_layer_batch_one(arch, backend):
    """Batch 1, no padding: the four components of the middle layer at once (they nest: block_input,
    attention_output, mlp_output, block_output), plus block_output of the last layer."""
    k = ARCHS.index(arch)
    reps = [rep(1, c, KINDS[(k + i) % 6], rank=1 + i % 3) for i, c in enumerate(COMPONENTS)]
    reps.append(rep(LAST, "block_output", KINDS[(k + 4) % 6]))
    check_against_reference(arch, reps, B=1, T=6, P=3, seed=100 + k, backend=backend, pad_rows=())


SIX_AT_ONE_SITE = [("llama", "block_output", 1), ("gpt2", "attention_output", LAST), ("bert", "mlp_output", 0),
                   ("gpt_neox", "block_input", 0), ("phi3", "mlp_output", LAST)]


@pytest.mark.parametrize("arch,component,layer,backend", with_backends(SIX_AT_ONE_SITE, SIX_AT_ONE_SITE[3:4]))
def test_six_types_at_one_site(arch, component, layer, backend):
    """All six types on one site, applied in sequence (each sees the previous one's output), with an
    activation on the W-bearing types and the sequence in a different order from KINDS."""
    order = ("direft", "consreft", "loreft", "lobireft", "orthodireft", "noreft")
    with_w = ("loreft", "noreft", "direft", "orthodireft")  # act applies to their act(Wh + b)
    reps = [rep(layer, component, kind, rank=1 + i % 4, **({"act": "tanh"} if kind in with_w else {}))
            for i, kind in enumerate(order)]
    check_against_reference(arch, reps, B=2, T=8, P=5, seed=7, backend=backend)


@pytest.mark.parametrize("arch", ("llama", "gpt_neox", "bert"))
def test_untied_prefix_suffix_copies(arch):
    """share_weights=False with "f2+l2": every representation is two interventions (prefix copy, suffix
    copy), all prefix copies first, each with its own parameters and its own row of the locations; two of
    the representations share a site."""
    reps = [rep(0, "block_input", "noreft"), rep(1, "mlp_output", "loreft"), rep(1, "mlp_output", "direft"),
            rep(LAST, "attention_output", "consreft")]
    reft = check_against_reference(arch, reps, P=2, seed=11, positions="f2+l2", share_weights=False)
    assert reft.num_interventions == 8


@pytest.mark.parametrize("arch", ("bert", "roberta"))
def test_sequence_classification_head(arch):
    """Encoders with their classification head (logits from the first token only): edits reach them."""
    reps = [rep(0, "block_input", "loreft"), rep(LAST, "attention_output", "noreft"),
            rep(LAST, "block_output", "consreft")]
    gen = torch.Generator().manual_seed(5)
    reft, ref_model, hooks = build(arch, reps, head="classify")
    ids, mask = random_batch(gen, 3, 7)
    locs = random_locations(gen, mask, len(reps), 3)
    locs[:, :, 0] = 0  # the classifier reads position 0
    params = list(reft.interventions.parameters())
    out = reft(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), intervention_locations=locs.to(DEVICE)).logits
    proj = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad((out * proj).sum(), params)
    hooks.locations = locs.to(DEVICE)
    expected = ref_model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
    ref_grads = torch.autograd.grad((expected * proj).sum(), params)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, expected, **LOGITS_TOL)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=GRAD_RTOL, atol=GRAD_RTOL * e.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_no_locations_no_edit(arch):
    """Every slot -1: the logits are the base model's, bit for bit, and every gradient is zero."""
    reps = [rep(0, "block_input", "lobireft"), rep(1, "attention_output", "loreft"), rep(LAST, "mlp_output", "direft")]
    reft, ref_model, hooks = build(arch, reps)
    hooks.remove()
    ids, mask = random_batch(torch.Generator().manual_seed(3), 2, 5)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    locs = torch.full((2, len(reps), 2), -1, dtype=torch.long, device=DEVICE)
    out = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    with torch.no_grad():
        base = ref_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.detach(), base)
    if out.requires_grad:  # the graph may or may not reach the parameters; no gradient flows either way
        grads = torch.autograd.grad(out.sum(), list(reft.interventions.parameters()), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("arch", ("llama", "gpt2", "gpt_neox", "bert"))
def test_inputs_embeds_at_layer_0(arch):
    """inputs_embeds with block_input at layer 0 (for llama and gpt_neox in eval mode the first block's
    input is the caller's tensor itself): the edit matches the reference and the caller's tensor is left
    as it was."""
    reps = [rep(0, "block_input", "loreft"), rep(0, "block_output", "direft")]
    gen = torch.Generator().manual_seed(21)
    reft, ref_model, hooks = build(arch, reps)
    ids, mask = random_batch(gen, 2, 6)
    embeds = ref_model.get_input_embeddings()(ids.to(DEVICE)).detach()
    before = embeds.clone()
    locs = random_locations(gen, mask, len(reps), 3).to(DEVICE)
    params = list(reft.interventions.parameters())
    out = reft(inputs_embeds=embeds, attention_mask=mask.to(DEVICE), intervention_locations=locs).logits
    assert torch.equal(embeds, before), "the edit wrote into the caller's inputs_embeds"
    proj = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad((out * proj).sum(), params)
    hooks.locations = locs
    expected = ref_model(inputs_embeds=embeds.clone(), attention_mask=mask.to(DEVICE)).logits
    ref_grads = torch.autograd.grad((expected * proj).sum(), params)
    assert hooks.calls == 2
    torch.testing.assert_close(out, expected, **LOGITS_TOL)
    for g, e in zip(grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=GRAD_RTOL, atol=GRAD_RTOL * e.abs().max().item())


@pytest.mark.parametrize("arch", ("llama", "gpt2", "gpt_neox", "phi3", "roberta"))
def test_unfrozen_base_model(arch):
    """freeze=False: the in-place edits at every component must not disturb autograd in the base model
    (a tensor saved for the backward and then edited would raise or corrupt gradients): the gradients of
    every base-model parameter match the reference model's too."""
    reps = [rep(0, "block_input", "consreft")] + [rep(1, c, "loreft") for c in COMPONENTS] + \
        [rep(LAST, "block_output", "noreft")]
    gen = torch.Generator().manual_seed(31)
    head = "causal" if arch in DECODERS else "masked"
    config = rk.ReftConfig(representations=reps)
    reft = rk.get_reft_model(tiny_model(arch, head=head).to(DEVICE), config, freeze=False)
    randomize(reft, torch.Generator().manual_seed(1234))
    ref_model = tiny_model(arch, head=head).to(DEVICE)
    edits = [(r.layer, r.component, r.intervention, iv, i)
             for i, (r, iv) in enumerate(zip(config.representations, reft.interventions.values()))]
    hooks = ReferenceHooks(ref_model, arch, edits)
    ids, mask = random_batch(gen, 3, 7)
    locs = random_locations(gen, mask, len(reps), 4).to(DEVICE)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    names = [n for n, p in ref_model.named_parameters()]
    ours = dict(reft.model.named_parameters())
    params = list(reft.interventions.parameters())
    out = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    proj = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad((out * proj).sum(), params + [ours[n] for n in names], allow_unused=True)
    hooks.locations = locs
    expected = ref_model(input_ids=ids, attention_mask=mask).logits
    ref_params = dict(ref_model.named_parameters())
    ref_grads = torch.autograd.grad((expected * proj).sum(), params + [ref_params[n] for n in names],
                                    allow_unused=True)
    torch.testing.assert_close(out, expected, **LOGITS_TOL)
    labels = [f"intervention {i}" for i in range(len(params))] + names
    # atol floor: some gradients are zero in exact arithmetic (attention key biases: softmax ignores a
    # shift shared by all keys) and come out as rounding noise, 1e-10 where others are 1e-1
    floor = 1e-3 * max(e.abs().max().item() for e in ref_grads if e is not None)
    checked = 0
    for label, g, e in zip(labels, grads, ref_grads):
        assert (g is None) == (e is None), label
        if e is not None:
            torch.testing.assert_close(g, e, rtol=GRAD_RTOL, atol=GRAD_RTOL * max(e.abs().max().item(), floor),
                                       msg=lambda m: f"{arch} grad {label}: {m}")
            checked += 1
    assert checked > len(params) + 10
