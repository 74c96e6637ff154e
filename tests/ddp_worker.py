"""Worker for tests/test_hf_distributed.py: ReftModel under DistributedDataParallel and FSDP2 (CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py --out DIR \
        --modes ddp,fsdp_sharded,fsdp_replicated

For each mode (wrap()), every rank builds the same tiny Llama with LoReFT on two layers, wraps it and
trains STEPS AdamW steps, each rank on its own batches (make_batch(rank, step)), so the ranks stay equal
only if the intervention gradients are averaged across ranks. At the end the trainable parameters are
all-gathered and compared on every rank. Each rank writes {mode}_rank{r}.json (the comparison, state_dict
keys) and {mode}_rank{r}.pt (the adapter's full state before and after training, so that the test can
replay the run in one process); FSDP modes also save the adapter (adapter_{mode}/) from the full state
dict that torch.distributed.checkpoint gathers.

build() and make_batch() are imported by the test for that replay.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hf_models
from hf_models import VOCAB, tiny_model  # noqa: E402

import reft_kernels as rk  # noqa: E402

LAYERS = (0, 2)
POSITIONS = "f2+l2"
STEPS = 5
LR = 1e-2
BATCH = 2  # rows per rank and step
SEQ = 10


def build() -> rk.ReftModel:
    """The same model on every rank and in the test (seeded); DDP would broadcast rank 0's anyway."""
    base = tiny_model("llama", seed=0)
    torch.manual_seed(1)
    reft = rk.get_reft_model(base, rk.ReftConfig(
        representations=[{"layer": l, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 2, "dtype": "float32"} for l in LAYERS],
        positions=POSITIONS))
    return reft.train()


def make_batch(rank: int, step: int, num_interventions: int) -> dict:
    """Rank-specific data. Every row has SEQ tokens, all labelled, so the mean loss over two ranks' batches
    is the loss of their concatenation (what the single-process replay trains on)."""
    g = torch.Generator().manual_seed(1000 * (rank + 1) + step)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    locs = rk.prefix_suffix_locations(mask, POSITIONS, num_interventions=num_interventions)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "intervention_locations": locs}


def trainable(reft: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in reft.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value (FSDP2 parameters are DTensors: gathered, a collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def wrap(reft: rk.ReftModel, mode: str, world: int) -> torch.nn.Module:
    """ddp: DistributedDataParallel(reft). fsdp_sharded: FSDP2 fully_shard on every block, then on the
    ReftModel itself (the root unit holds the interventions, sharded, gathered at ReftModel.forward).
    fsdp_replicated: fully_shard on every block and on the base model; the interventions stay plain
    replicated tensors and the training loop all-reduces their gradients."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(reft)  # CPU module: no device_ids; only parameters that require grad are reduced
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in reft.model.get_submodule(reft.layers_path):
        fully_shard(block, mesh=mesh)
    fully_shard(reft if mode == "fsdp_sharded" else reft.model, mesh=mesh)
    return reft


def run(mode: str, rank: int, world: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    reft = build()
    model = wrap(reft, mode, world)
    init_params = {n: _full(p) for n, p in reft.named_parameters() if p.requires_grad}
    init_state = {k: _full(v) for k, v in reft.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(steps):
        out_ = model(**make_batch(rank, step, reft.num_interventions))
        out_.loss.backward()
        if mode == "fsdp_replicated":  # the interventions are outside every FSDP unit: average by hand
            for p in reft.interventions.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out_.loss.item())

    final = {n: _full(p) for n, p in reft.named_parameters() if p.requires_grad}
    equal, max_diff = {}, {}
    for name, p in final.items():
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p)
        equal[name] = all(torch.equal(g, gathered[0]) for g in gathered)
        max_diff[name] = max((g - gathered[0]).abs().max().item() for g in gathered)
    sd = model.state_dict()  # DDP: "module." + ReftModel.state_dict(); FSDP2: ReftModel.state_dict(), DTensors
    report = {
        "mode": mode, "rank": rank, "world_size": world, "losses": losses,
        "trainable": sorted(final),
        "frozen_trainable": [n for n, p in reft.model.named_parameters() if p.requires_grad],
        "equal_across_ranks": equal, "max_diff_across_ranks": max_diff,
        "changed": {n: not torch.equal(final[n], init_params[n]) for n in final},
        "state_dict_keys": sorted(sd),
        "state_dict_types": sorted({type(v).__name__ for v in sd.values()}),
    }
    final_state = {k: _full(v) for k, v in reft.state_dict().items()}
    if mode != "ddp":
        # the full adapter state through torch.distributed.checkpoint (a collective; rank 0 gets it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        dcp = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        report["dcp_equal"] = rank != 0 or (dcp.keys() == final_state.keys() and all(
            torch.equal(dcp[k], final_state[k]) for k in dcp))
        if rank == 0:  # save: load the full state into an unsharded copy and save_pretrained that
            plain = build()
            plain.load_state_dict(dcp)
            plain.save_pretrained(os.path.join(out, f"adapter_{mode}"))
        # and directly: save_pretrained gathers DTensor shards itself (a collective), rank 0 writes
        reft.save_pretrained(os.path.join(out, f"adapter_{mode}_direct"), is_main_process=rank == 0)
    torch.save({"init": init_state, "final": final_state}, os.path.join(out, f"{mode}_rank{rank}.pt"))
    with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--modes", default="ddp", help="comma-separated: ddp, fsdp_sharded, fsdp_replicated")
    args = ap.parse_args()

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    for mode in args.modes.split(","):
        run(mode, rank, world, args.steps, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
