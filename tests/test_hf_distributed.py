"""ReftModel under torch DistributedDataParallel and FSDP2 (fully_shard): two CPU processes (gloo) launched
once with torchrun, which run every mode in turn (tests/ddp_worker.py).

The worker trains a LoReFT adapter on a tiny Llama for a few AdamW steps, each rank on different data. For
each mode the test checks that
- every trainable parameter is bitwise identical on both ranks afterwards (gradients were averaged),
- training changed every trainable parameter, and only adapter parameters were trainable,
- the result equals one process trained on the two ranks' batches concatenated (the averaged gradient),
  up to fp32 rounding, and differs clearly from training on one rank's data alone,
- state_dict() is the adapter only (DDP: under "module."; FSDP2: the same keys, as DTensors where
  sharded), and for FSDP2 the full state from torch.distributed.checkpoint saves and reloads.

Modes: ddp = DistributedDataParallel(reft); fsdp_sharded = fully_shard on each block, then on the
ReftModel (interventions sharded in the root unit); fsdp_replicated = fully_shard on each block and on the
base model, interventions replicated with their gradients all-reduced by hand.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import ddp_worker as W  # noqa: E402  (tests/ is on sys.path under pytest)

import reft_kernels as rk  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)

    HAS_FSDP2 = True
except ImportError:  # pragma: no cover
    HAS_FSDP2 = False

MODES = ["ddp"] + (["fsdp_sharded", "fsdp_replicated"] if HAS_FSDP2 else [])
needs_fsdp2 = pytest.mark.skipif(not HAS_FSDP2, reason="torch.distributed.fsdp.fully_shard (FSDP2) is needed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("REFT_KERNELS_BACKEND", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "ddp_worker.py"), "--out", str(out), "--steps", str(W.STEPS), "--modes", ",".join(MODES)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = {}
    for mode in MODES:
        reports = [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(2)]
        states = [torch.load(out / f"{mode}_rank{r}.pt") for r in range(2)]
        result[mode] = (reports, states)
    result["out"] = out
    return result


def _replay(init_state, ranks):
    """One process, the worker's model and optimizer, trained on the batches of `ranks` concatenated."""
    reft = W.build()
    reft.load_state_dict(init_state)
    opt = torch.optim.AdamW([p for p in reft.parameters() if p.requires_grad], lr=W.LR)
    for step in range(W.STEPS):
        batches = [W.make_batch(r, step, reft.num_interventions) for r in ranks]
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        reft(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return W.trainable(reft)


@pytest.fixture(scope="module")
def replays(runs):
    """The single-process references, from the DDP run's initial state (every mode starts from the same,
    seeded build(); test_same_start checks it)."""
    init = runs["ddp"][1][0]["init"]
    return {"both": _replay(init, (0, 1)), "rank0": _replay(init, (0,))}


def test_same_start(runs):
    ref = runs["ddp"][1][0]["init"]
    for mode in MODES:
        for state in runs[mode][1]:
            assert state["init"].keys() == ref.keys()
            assert all(torch.equal(state["init"][k], ref[k]) for k in ref), mode


@pytest.mark.parametrize("mode", MODES)
def test_ranks_stay_bitwise_identical(runs, mode):
    reports, states = runs[mode]
    assert [r["world_size"] for r in reports] == [2, 2]
    for rep in reports:
        assert rep["trainable"] and all(n.startswith("interventions.") for n in rep["trainable"])
        assert rep["frozen_trainable"] == []
        assert set(rep["equal_across_ranks"]) == set(rep["trainable"])
        assert all(rep["equal_across_ranks"].values()), rep["max_diff_across_ranks"]
    # the same from the saved full adapters (buffers included)
    assert states[0]["final"].keys() == states[1]["final"].keys()
    for k in states[0]["final"]:
        assert torch.equal(states[0]["final"][k], states[1]["final"][k]), k
    # the ranks saw different data: their losses differ
    assert reports[0]["losses"] != reports[1]["losses"]


@pytest.mark.parametrize("mode", MODES)
def test_training_changed_every_parameter(runs, mode):
    reports, states = runs[mode]
    assert all(reports[0]["changed"].values()), reports[0]["changed"]
    for name in reports[0]["trainable"]:
        assert not torch.equal(states[0]["init"][name], states[0]["final"][name]), name


@pytest.mark.parametrize("mode", MODES)
def test_equals_single_process_on_concatenated_batch(runs, replays, mode):
    reports, states = runs[mode]
    final, reference, alone = states[0]["final"], replays["both"], replays["rank0"]
    assert set(reference) == set(reports[0]["trainable"])
    for name, ref in reference.items():
        torch.testing.assert_close(final[name], ref, rtol=1e-4, atol=1e-5, msg=name)
    # control: one rank's data alone gives a clearly different adapter, so the match above is the averaging
    gap = max((alone[n] - final[n]).abs().max().item() for n in alone)
    close = max((reference[n] - final[n]).abs().max().item() for n in reference)
    assert gap > 100 * max(close, 1e-7), (gap, close)


def test_ddp_state_dict_is_the_adapter(runs):
    reports, states = runs["ddp"]
    keys = reports[0]["state_dict_keys"]
    assert keys == sorted("module." + k for k in states[0]["final"])
    assert all(k.startswith("module.interventions.") for k in keys)
    assert reports[0]["state_dict_types"] == ["Tensor"]


@needs_fsdp2
@pytest.mark.parametrize("saved", ["", "_direct"])
@pytest.mark.parametrize("mode", ["fsdp_sharded", "fsdp_replicated"])
def test_fsdp_state_dict_saves_and_reloads(runs, mode, saved):
    reports, states = runs[mode]
    assert reports[0]["state_dict_keys"] == sorted(states[0]["final"])  # the adapter only, no prefix
    # sharded: the interventions are DTensors (save_pretrained gathers them: the "_direct" save)
    assert ("DTensor" in reports[0]["state_dict_types"]) == (mode == "fsdp_sharded")
    assert reports[0]["dcp_equal"] is True
    built = W.build()
    built.remove_hooks()  # the base model alone (reloading onto a base that still has hooks warns)
    reloaded = rk.ReftModel.from_pretrained(built.model, str(runs["out"] / f"adapter_{mode}{saved}"))
    got = reloaded.state_dict()
    assert got.keys() == states[0]["final"].keys()
    assert all(torch.equal(got[k], states[0]["final"][k]) for k in got)
