"""Tensor parallel 2 on the CPU (two worker processes, vLLM's mp executor, one core each): every rank holds
the full hidden states at the sites (after the all-reduce) and applies the same edits; the tokens are the
reference's. The workers load the plugin through its entry point and the adapters through collective_rpc."""
import os

import pytest
from conftest import ENGINE, shutdown
from test_offline import MAX_NEW, PROMPTS, run

from reft_kernels import vllm as rkv


@pytest.fixture(scope="module")
def tp2(model_dir, adapters):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM for CPUs binds a worker per NUMA node else
    engine = rkv.LLM(model_dir, reft_adapters={"lo": adapters["lo"], "no": adapters["no"]}, enforce_eager=True,
                     **{**ENGINE, "distributed_executor_backend": "mp", "tensor_parallel_size": 2})
    yield engine
    shutdown(engine)


def test_tensor_parallel_2(tp2, adapters, reference):
    requests = [(p, a) for p, a in zip(PROMPTS, ("lo", "no", None, "lo", "no"))]
    got = run(tp2, requests)
    for (p, a), tokens in zip(requests, got):
        assert tokens == reference.tokens(p, adapters[a] if a else None, MAX_NEW), (a, p)
    infos = tp2.reft_info()
    assert len(infos) == 2 and all(i["rows_edited"] > 0 for i in infos)
    assert infos[0]["adapters"] == infos[1]["adapters"]
