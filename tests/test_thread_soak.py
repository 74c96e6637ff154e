"""Thread soak (issue 18): several threads run forward, backward and generate at once, and every result is bit for
bit what a single-threaded run gives. Per-call state lives in a ContextVar (integration/model.py) and the kernels
keep no global state, so nothing may leak between threads: not positions, not adapters, not dropout seeds.

Two setups: two ReftModels hooked into one tiny base model (one adapter each); and one ReftModel holding
several named adapters, where each thread runs its own mix (adapter_names, one adapter per row: the mixed op,
whose plans and banks the threads share), first with trainable adapters (forward, backward, generate), then
frozen (forward and generate through the model's shared banks)."""
from __future__ import annotations

import threading

import torch

import reft_kernels as rk
from hf_models import VOCAB, tiny_model

THREADS_PER_ADAPTER = 3
ROUNDS = 4
BASE = "__base__"


def _adapters():
    base = tiny_model("llama")
    configs = {
        "loreft": rk.ReftConfig([{"layer": l, "intervention": "loreft", "low_rank_dimension": 3, "dtype": torch.float32}
                                 for l in (0, 2)], positions="f2+l2"),
        "direft": rk.ReftConfig([{"layer": 1, "intervention": "direft", "low_rank_dimension": 5,
                                  "dtype": torch.float32}], positions="f1+l3"),
    }
    refts = {}
    for seed, (name, cfg) in enumerate(configs.items()):
        reft = rk.get_reft_model(base, cfg)
        _randomize(reft.interventions, 10 + seed)
        refts[name] = reft
    return refts


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _prompts(seed: int, rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _step(reft, seed: int):
    """One forward + backward (parameter gradients by torch.autograd.grad: threads sharing an adapter must not
    accumulate into the same .grad) and one greedy generate."""
    ids, mask = _prompts(seed)
    locs = reft.locations(mask)
    logits = reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
    params = [p for p in reft.interventions.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.float().square().mean(), params)
    with torch.no_grad():
        out = reft.generate(input_ids=ids, attention_mask=mask, intervention_locations=locs, max_new_tokens=5,
                            do_sample=False, pad_token_id=0)
    return [logits.detach(), *grads, out]


def _soak(jobs, step, want):
    """Runs step(*job) ROUNDS times in one thread per job, all starting each round together; returns the
    differences from want[job] (and any exception), as messages."""
    errors, barrier = [], threading.Barrier(len(jobs))

    def run(job):
        try:
            for _ in range(ROUNDS):
                barrier.wait()
                got = step(*job)
                if len(got) != len(want[job]):
                    errors.append(f"{job}: {len(got)} results, {len(want[job])} single-threaded")
                for i, (g, w) in enumerate(zip(got, want[job])):
                    if not (g is None and w is None) and not (g is not None and w is not None and torch.equal(g, w)):
                        errors.append(f"{job}: result {i} differs from the single-threaded run")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{job}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_running_two_adapters_match_single_threaded_runs():
    refts = _adapters()
    jobs = [(name, seed) for name in refts for seed in range(THREADS_PER_ADAPTER)]
    want = {(name, seed): _step(refts[name], seed) for name, seed in jobs}
    # the two adapters differ, and each edits (else the comparison below could not tell them apart)
    plain = refts["loreft"].model(*_prompts(0)).logits
    assert not torch.equal(want["loreft", 0][0], want["direft", 0][0])
    assert not torch.equal(want["loreft", 0][0], plain)
    errors = _soak(jobs, lambda name, seed: _step(refts[name], seed), want)
    assert not errors, errors[:5]


# ------------------------------------------------------------------------------------------------
# Named adapters on one ReftModel: each thread its own mix of adapters per row (the mixed op)
# ------------------------------------------------------------------------------------------------

# one adapter name per row of a 3-row batch: mixes of three types (LoReFT at two layers, DiReFT, NoReFT with
# b2 at the MLP's output), rows left unedited, one adapter alone
MIXES = [("default", "b", BASE), ("c", "default", "b"), ("b", "b", "c"), ("default",) * 3, (BASE, "c", "default"),
         ("c", "b", "default")]


def _named_model():
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig(
        [{"layer": l, "intervention": "loreft", "low_rank_dimension": 3} for l in (0, 2)], positions="f2+l2"))
    reft.add_adapter("b", rk.ReftConfig([{"layer": l, "intervention": "direft", "low_rank_dimension": 2, "act": "relu"}
                                         for l in (1, 2)], positions="last"))
    reft.add_adapter("c", rk.ReftConfig([{"layer": 0, "component": "mlp_output", "intervention": "noreft",
                                          "low_rank_dimension": 4, "add_bias": True}], positions="f1+l1"))
    for k, adapter in enumerate(reft.adapters.values()):
        _randomize(adapter.interventions, 20 + k)
    return reft.eval()


def _mixed_step(reft, names, seed: int, backward: bool = True):
    """A mixed batch: forward, the gradient of every trainable adapter parameter (None for the adapters the mix
    leaves out), and a greedy generate."""
    ids, mask = _prompts(seed, rows=len(names))
    out = [reft(input_ids=ids, attention_mask=mask, adapter_names=list(names)).logits]
    if backward:
        params = [p for a in reft.adapters.values() for p in a.interventions.parameters()]
        out += torch.autograd.grad(out[0].float().square().mean(), params, allow_unused=True)
    out[0] = out[0].detach()
    with torch.no_grad():
        out.append(reft.generate(input_ids=ids, attention_mask=mask, adapter_names=list(names), max_new_tokens=5,
                                 do_sample=False, pad_token_id=0))
    return out


def test_threads_running_mixed_batches_of_named_adapters_match_single_threaded_runs():
    reft = _named_model()
    jobs = [(names, seed) for seed, names in enumerate(MIXES)]
    want = {job: _mixed_step(reft, *job) for job in jobs}
    # the mixes differ from each other and from the base model, and each adapter gets gradients from its rows
    plain = reft.model(*_prompts(0, rows=3)).logits
    assert not torch.equal(want[jobs[0]][0], plain)
    assert not torch.equal(_mixed_step(reft, MIXES[1], 0)[0], want[jobs[0]][0])
    assert all(g is not None for g in want[jobs[1]][1:-1]), "a mix of all three adapters trains them all"
    errors = _soak(jobs, lambda names, seed: _mixed_step(reft, names, seed), want)
    assert not errors, errors[:5]
    # frozen: the mixes read the model's shared banks (built by whichever thread comes first, dropped and rebuilt
    # as the fingerprints say)
    for a in reft.adapters.values():
        a.interventions.requires_grad_(False)
    want = {job: _mixed_step(reft, *job, backward=False) for job in jobs}
    errors = _soak(jobs, lambda names, seed: _mixed_step(reft, names, seed, backward=False), want)
    assert not errors, errors[:5]
