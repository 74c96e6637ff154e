"""torch.compile on (vLLM's default): the same tokens as eager and as ReftModel.generate. The site op is in
the compiled graph (a plain hook would be skipped there), and vLLM's compile cache is keyed by the sites."""
import pytest
from conftest import ENGINE, shutdown
from test_offline import MAX_NEW, PROMPTS, run

from reft_kernels import vllm as rkv


@pytest.fixture(scope="module")
def compiled(model_dir, adapters):
    engine = rkv.LLM(model_dir, reft_adapters={name: adapters[name] for name in ("lo", "di", "no", "stack")},
                     reft_sites="all", **ENGINE)  # ~40 s on 2 cores: compiles once (inductor, C++)
    yield engine
    shutdown(engine)


def test_compiled_mixed_batch_equals_reference(compiled, adapters, reference):
    assert compiled.llm_engine.vllm_config.compilation_config.mode != 0  # compiled, not eager
    names = ["lo", "di", "no", "stack", None]
    requests = [(p, names[(i + j) % len(names)]) for i, p in enumerate(PROMPTS) for j in range(3)]
    before = compiled.reft_info()[0]["rows_edited"]
    got = run(compiled, requests)
    for (p, a), tokens in zip(requests, got):
        assert tokens == reference.tokens(p, adapters[a] if a else None, MAX_NEW), (a, p)
    assert compiled.reft_info()[0]["rows_edited"] > before


def test_compiled_loads_adapters_while_serving(compiled, adapters, reference):
    """An adapter loaded after compilation edits through the same graph (the banks are not in it)."""
    compiled.load_reft_adapter("py", adapters["py"])
    try:
        assert run(compiled, [(p, "py") for p in PROMPTS]) == [reference.tokens(p, adapters["py"], MAX_NEW)
                                                                for p in PROMPTS]
    finally:
        compiled.remove_reft_adapter("py")
