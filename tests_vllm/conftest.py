"""Setup for the vLLM serving tests (reft_kernels.vllm), run in .venv-vllm (vllm-cpu 0.32.0; `make test`).

Engines run in process (VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend="uni": ~3 s to start
eager) on a 1 GiB CPU KV cache, offline; module-scoped fixtures share them across tests. The whole suite is
skipped where vLLM does not import (the main environments).
"""
import gc
import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.pop("REFT_KERNELS_ADAPTERS", None)
os.environ.pop("REFT_KERNELS_BACKEND", None)

pytest.importorskip("vllm", reason="reft_kernels.vllm needs vLLM (make test builds .venv-vllm with vllm-cpu)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

ENGINE = dict(dtype="float32", distributed_executor_backend="uni", gpu_memory_utilization=0.5,
              max_model_len=tiny.MAX_LEN, seed=0, disable_log_stats=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny.build_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory):
    """Adapters of different types, sites and position schemes (our format unless named), as reft_adapters
    takes them: a directory or {"path": ..., options}."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        # LoReFT on two block outputs, f2+l2
        "lo": tiny.make_adapter(model_dir, str(root / "lo"), positions="f2+l2", seed=1, representations=[
            {"layer": 1, "intervention": "loreft", "low_rank_dimension": 4},
            {"layer": 2, "intervention": "loreft", "low_rank_dimension": 4}]),
        # DiReFT (the paper's) with an activation on the last prompt token ("last"): an mlp output and a
        # block input
        "di": tiny.make_adapter(model_dir, str(root / "di"), positions="last", seed=2, representations=[
            {"layer": 0, "component": "mlp_output", "intervention": "direft", "low_rank_dimension": 2,
             "act": "relu"},
            {"layer": 3, "component": "block_input", "intervention": "direft", "low_rank_dimension": 3}]),
        # NoReFT with b2, untied prefix / suffix interventions (share_weights=False), an attention output and
        # a block output; and ConsReFT + LobiReFT + OrthoDiReFT stacked on one site (several passes)
        "no": tiny.make_adapter(model_dir, str(root / "no"), positions="f3+l1", share_weights=False, seed=3,
                                representations=[
            {"layer": 1, "component": "attention_output", "intervention": "noreft", "low_rank_dimension": 2,
             "add_bias": True},
            {"layer": 3, "intervention": "noreft", "low_rank_dimension": 1}]),
        "stack": tiny.make_adapter(model_dir, str(root / "stack"), positions="f1+l2", seed=4, scale=4.0,
                                   representations=[
            {"layer": 2, "intervention": "consreft", "low_rank_dimension": 2},
            {"layer": 2, "intervention": "lobireft", "low_rank_dimension": 1},
            {"layer": 2, "intervention": "orthodireft", "low_rank_dimension": 2, "act": "tanh"}]),
        # the LoReFT one again with other weights (reloading a name)
        "lo2": tiny.make_adapter(model_dir, str(root / "lo2"), positions="f2+l2", seed=5, representations=[
            {"layer": 1, "intervention": "loreft", "low_rank_dimension": 4},
            {"layer": 2, "intervention": "loreft", "low_rank_dimension": 4}]),
        # a pyreft checkpoint (config.json + intkey_*.bin): LoReFT on every layer
        "py": tiny.make_adapter(model_dir, str(root / "py"), positions="f2+l2", seed=6, fmt="pyreft",
                                representations=[{"layer": l, "intervention": "loreft", "low_rank_dimension": 2}
                                                 for l in range(tiny.LAYERS)]),
    }
    made["py"] = {"path": made["py"], "positions": "f2+l2", "dtype": "float32"}  # what pyreft does not store
    # saved without a position scheme (ReftConfig(positions=None): trained on its data's own locations),
    # served with one given at load
    made["unset"] = {"path": tiny.make_adapter(model_dir, str(root / "unset"), positions=None, seed=7,
                                               representations=[{"layer": 2, "component": "attention_output",
                                                                 "intervention": "loreft", "low_rank_dimension": 3}]),
                     "positions": "f1+l3"}
    # one save_pretrained of two adapters (PEFT's layout): "default" in multi/, "sub" in multi/sub/
    made["multi"] = tiny.make_multi(model_dir, str(root / "multi"), {
        "default": {"representations": [{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}],
                    "positions": "f2"},
        "sub": {"representations": [{"layer": 3, "component": "mlp_output", "intervention": "direft",
                                     "low_rank_dimension": 2}], "positions": "l3"}}, seed=8)
    made["sub"] = {"path": made["multi"], "subfolder": "sub"}
    return made


@pytest.fixture(scope="session")
def reference(model_dir):
    return tiny.Reference(model_dir)


def shutdown(llm) -> None:
    """Frees an in-process engine so that the next one can start in this process."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001
        pass
