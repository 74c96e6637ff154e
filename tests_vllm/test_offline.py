"""reft_kernels.vllm.LLM, eager (enforce_eager=True), against ReftModel.generate: one adapter, adapters of
every type mixed with unedited requests in one batch, a pyreft checkpoint, loading and removing while
serving, prefix caching across adapters, chunked prefill, and bad input."""
import pytest
from conftest import ENGINE, shutdown
from vllm import SamplingParams

import tiny
from reft_kernels import vllm as rkv

MAX_NEW = 10


def greedy(adapter=None, max_new=MAX_NEW):
    extra = {"reft_adapter": adapter} if adapter is not None else None
    return SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, extra_args=extra)


def run(llm, requests, max_new=MAX_NEW):
    """requests: [(prompt text, adapter name or None)] in one generate call -> token lists."""
    outs = llm.generate([p for p, _ in requests], [greedy(a, max_new) for _, a in requests], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def edited_rows(llm) -> int:
    return sum(info["rows_edited"] for info in llm.reft_info())


@pytest.fixture(scope="module")
def llm(model_dir, adapters):
    engine = rkv.LLM(model_dir, reft_adapters={name: adapters[name] for name in ("lo", "di", "no", "stack")},
                     reft_sites="all", enforce_eager=True, block_size=32, **ENGINE)
    yield engine
    shutdown(engine)


PROMPTS = [tiny.prompt(s, n) for s, n in ((1, 3), (2, 7), (3, 12), (4, 20), (5, 33))]


def test_one_adapter(llm, adapters, reference):
    before = edited_rows(llm)
    got = run(llm, [(p, "lo") for p in PROMPTS])
    want = [reference.tokens(p, adapters["lo"], MAX_NEW) for p in PROMPTS]
    assert got == want
    base = [reference.tokens(p, None, MAX_NEW) for p in PROMPTS]
    assert sum(g != b for g, b in zip(got, base)) >= 3, "the adapter should change most outputs"
    # f2+l2 on 5 prompts: min(2, n // 2) first and last positions each
    assert edited_rows(llm) - before == sum(2 * min(2, len(p.split()) // 2) for p in PROMPTS)


def test_mixed_batch_of_every_type(llm, adapters, reference):
    """Three adapters of different types and sites, stacked interventions, and unedited requests, all in one
    generate call (one engine step edits every adapter's rows with one mixed call per site and pass)."""
    names = ["lo", "di", "no", "stack", None]
    requests = [(p, names[(i + j) % len(names)]) for i, p in enumerate(PROMPTS) for j in range(3)]
    got = run(llm, requests)
    for (p, a), tokens in zip(requests, got):
        assert tokens == reference.tokens(p, adapters[a] if a else None, MAX_NEW), (a, p)
    for a in ("di", "no", "stack"):
        assert any(t != reference.tokens(p, None, MAX_NEW) for (p, b), t in zip(requests, got) if b == a), a


def test_mixed_batch_equals_hf_mixed_generate(llm, adapters, reference):
    """The same kind of batch through the Hugging Face layer's own mixed path: one ReftModel holding every
    adapter, one left-padded ReftModel.generate(..., adapter_names=[...]) call."""
    names = ["lo", "di", "no", "stack", None]
    requests = [(p, names[(i + 2 * j) % len(names)]) for i, p in enumerate(PROMPTS) for j in range(2)]
    got = run(llm, requests)
    assert got == reference.mixed_tokens(requests, adapters, MAX_NEW)
    base = [reference.tokens(p, None, MAX_NEW) for p, _ in requests]
    assert {a for (_, a), g, b in zip(requests, got, base) if g != b} == {"lo", "di", "no", "stack"}


def test_named_adapter_of_a_save_and_a_position_override(llm, adapters, reference):
    """Loaded while serving, in one batch: the named adapter of a multi-adapter save (by its "subfolder" key
    and by its path), that save's "default", and an adapter saved without a position scheme served with one
    given at load; each against ReftModel (load_adapter(..., subfolder=...) for the named one)."""
    specs = {"sub": adapters["sub"], "sub_path": f"{adapters['multi']}/sub", "multi": adapters["multi"],
             "unset": adapters["unset"]}
    for name, spec in specs.items():
        llm.load_reft_adapter(name, spec)
    try:
        requests = [(p, name) for p in PROMPTS for name in specs] + [(PROMPTS[2], None)]
        got = run(llm, requests)
        for (p, a), tokens in zip(requests, got):
            assert tokens == reference.tokens(p, specs[a] if a else None, MAX_NEW), (a, p)
        for name in specs:
            assert any(t != reference.tokens(p, None, MAX_NEW) for (p, a), t in zip(requests, got) if a == name), name
    finally:
        for name in specs:
            llm.remove_reft_adapter(name)


def test_pyreft_checkpoint(llm, adapters, reference):
    llm.load_reft_adapter("py", adapters["py"])
    try:
        got = run(llm, [(p, "py") for p in PROMPTS[1:]] + [(PROMPTS[0], None)])
        want = [reference.tokens(p, adapters["py"], MAX_NEW) for p in PROMPTS[1:]]
        assert got[:-1] == want
        assert got[-1] == reference.tokens(PROMPTS[0], None, MAX_NEW)
    finally:
        llm.remove_reft_adapter("py")


def test_load_remove_and_reload_while_serving(llm, adapters, reference):
    prompt = tiny.prompt(11, 70)  # two full 32-token blocks: the prefix cache keeps them
    llm.load_reft_adapter("x", adapters["lo2"])
    assert "x" in llm.reft_adapters
    assert run(llm, [(prompt, "x")]) == [reference.tokens(prompt, adapters["lo2"], MAX_NEW)]
    llm.remove_reft_adapter("x")
    with pytest.raises(ValueError, match="unknown ReFT adapter 'x'"):
        run(llm, [(prompt, "x")])
    # the same name, other weights: the prompt cached under the old "x" must not be reused
    llm.load_reft_adapter("x", adapters["lo"])
    try:
        assert run(llm, [(prompt, "x")]) == [reference.tokens(prompt, adapters["lo"], MAX_NEW)]
    finally:
        llm.remove_reft_adapter("x")


def test_prefix_cache_never_crosses_adapters(llm, adapters, reference):
    """One prompt under two adapters and none, twice each: every output is its adapter's, and the second
    round reuses the cache (the first round of each adapter computed its own blocks)."""
    prompt = tiny.prompt(12, 80)
    cached = {}
    for rnd in range(2):
        for a in ("lo", None, "no", "lo"):
            out = llm.generate([prompt], [greedy(a)], use_tqdm=False)[0]
            assert list(out.outputs[0].token_ids) == reference.tokens(prompt, adapters[a] if a else None, MAX_NEW)
            cached.setdefault(a, []).append(out.num_cached_tokens)
    assert cached["no"][0] == 0, "a prompt cached under other adapters must not be reused under 'no'"
    assert min(cached["lo"][1:]) >= 64 and cached["no"][1] >= 64 and cached[None][1] >= 64, cached


def test_unknown_adapter_fails_the_call_before_anything_runs(llm):
    with pytest.raises(ValueError, match="unknown ReFT adapter 'nope'.*loaded: \\['di', 'lo', 'no', 'stack'\\]"):
        run(llm, [(PROMPTS[0], "lo"), (PROMPTS[1], "nope")])
    assert run(llm, [(PROMPTS[0], None)])  # the engine keeps serving


def test_unknown_adapter_fails_one_request_at_the_engine(llm):
    """Past LLM.generate's own check (the engine's input processing, as the server uses it): that request
    is refused with the names loaded, the engine serves on."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="unknown ReFT adapter 'nope'"):
        llm.llm_engine.add_request("bad", PROMPTS[0], greedy("nope"))
    with pytest.raises(VLLMValidationError, match="must be an adapter name"):
        llm.llm_engine.add_request("bad2", PROMPTS[0], greedy(3))
    assert run(llm, [(PROMPTS[0], "lo")])


def test_wrong_width_or_depth_refused_at_load(llm, adapters, tmp_path):
    import reft_kernels as rk
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, shape, match in (("wide", dict(hidden_size=64, num_hidden_layers=tiny.LAYERS), "hidden size 64"),
                               ("deep", dict(hidden_size=tiny.WIDTH, num_hidden_layers=6), "6 layers")):
        other = LlamaForCausalLM(LlamaConfig(vocab_size=tiny.VOCAB, intermediate_size=64, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16, **shape))
        reft = rk.get_reft_model(other, rk.ReftConfig(
            representations=[{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}], positions="f1"))
        reft.save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            llm.load_reft_adapter(name, str(tmp_path / name))
        assert name not in llm.reft_adapters
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_reft_adapter("lo", adapters["lo2"])
    with pytest.raises(FileNotFoundError):
        llm.load_reft_adapter("missing", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="stores no position scheme"):
        llm.load_reft_adapter("py", adapters["py"]["path"])


@pytest.fixture(scope="module")
def chunked(model_dir, adapters):
    engine = rkv.LLM(model_dir, reft_adapters={name: adapters[name] for name in ("lo", "di", "no")},
                     enforce_eager=True, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False,
                     **ENGINE)
    yield engine
    shutdown(engine)


def test_chunked_prefill_equals_one_prefill(chunked, adapters, reference):
    """16 tokens per step: prompts of 40-70 tokens are split over several steps; positions resolved against
    the whole prompt give the same edits as one prefill."""
    prompts = [tiny.prompt(20 + i, n) for i, n in enumerate((40, 53, 70, 17))]
    requests = [(p, a) for p, a in zip(prompts, ("lo", "no", "di", None))] + [(prompts[2], "lo")]
    got = run(chunked, requests)
    for (p, a), tokens in zip(requests, got):
        assert tokens == reference.tokens(p, adapters[a] if a else None, MAX_NEW), (a, len(p.split()))
    # one 60-token prompt alone: f2+l2 rows lie in its first and its last chunk, two steps apart
    steps = chunked.reft_info()[0]["steps_edited"]
    run(chunked, [(tiny.prompt(30, 60), "lo")])
    assert chunked.reft_info()[0]["steps_edited"] - steps == 2


def test_adapter_outside_the_engine_sites_refused_and_skipped_edits_raise(chunked, adapters):
    """The chunked engine was started with lo, di and no (their sites only): the pyreft adapter, which also
    edits layer 0's block output, is refused. Then an engine step whose model skips a planned site raises
    (this leaves the engine broken: the module's last use of it)."""
    assert (0, "block_output") not in chunked.reft_sites
    with pytest.raises(ValueError, match="not started with"):
        chunked.load_reft_adapter("py", adapters["py"])
    chunked.collective_rpc(_unhook_layer_2)
    with pytest.raises(Exception, match="never ran them"):
        run(chunked, [(PROMPTS[3], "lo")])


def _unhook_layer_2(worker):
    model = worker.model_runner.get_model()
    model.model.layers[2]._reft_output = None


def test_plain_vllm_refuses_reft_requests(model_dir):
    """An engine without ReFT refuses requests that name an adapter instead of running them unedited."""
    import vllm

    engine = vllm.LLM(model_dir, enforce_eager=True, **ENGINE)
    try:
        with pytest.raises(Exception, match="serves no ReFT adapters"):
            run(engine, [(PROMPTS[0], "lo")])
        assert run(engine, [(PROMPTS[0], None)])
    finally:
        shutdown(engine)
