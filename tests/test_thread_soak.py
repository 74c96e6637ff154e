"""Thread soak (issue 18): several threads run forward, backward and generate through two different adapters
(two ReftModels hooked into one tiny base model) at once; every result is bit for bit what a single-threaded
run gives. Per-call state lives in a ContextVar (integration/model.py) and the kernels keep no global state,
so nothing may leak between threads: not positions, not adapters, not dropout seeds."""
from __future__ import annotations

import threading

import torch

import reft_kernels as rk
from hf_models import VOCAB, tiny_model

THREADS_PER_ADAPTER = 3
ROUNDS = 4


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
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for p in reft.interventions.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        refts[name] = reft
    return refts


def _prompts(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
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


def test_threads_running_two_adapters_match_single_threaded_runs():
    refts = _adapters()
    jobs = [(name, seed) for name in refts for seed in range(THREADS_PER_ADAPTER)]
    want = {(name, seed): _step(refts[name], seed) for name, seed in jobs}
    # the two adapters differ, and each edits (else the comparison below could not tell them apart)
    plain = refts["loreft"].model(*_prompts(0)).logits
    assert not torch.equal(want["loreft", 0][0], want["direft", 0][0])
    assert not torch.equal(want["loreft", 0][0], plain)

    errors, barrier = [], threading.Barrier(len(jobs))

    def run(name, seed):
        try:
            for _ in range(ROUNDS):
                barrier.wait()
                got = _step(refts[name], seed)
                for i, (g, w) in enumerate(zip(got, want[name, seed])):
                    if not torch.equal(g, w):
                        errors.append(f"{name} seed {seed}: result {i} differs from the single-threaded run")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{name} seed {seed}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
