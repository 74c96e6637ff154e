"""The worker side without an engine: adapters read for serving, the plan of a step (positions against the
whole prompt, chunks, decode, several adapters and passes), the edit of a site against a float64 reference,
adapter removal with requests in flight, and the proof-of-edit check."""
import numpy as np
import pytest
import torch

import reft_kernels as rk
from reft_kernels.vllm import _vllm
from reft_kernels.vllm.adapters import load_served_adapter, parse_adapter_list
from reft_kernels.vllm.mixed_op import AdapterBank, mixed_reft_edit_flat
from reft_kernels.vllm.state import ServingState

import tiny

D, L = tiny.WIDTH, tiny.LAYERS


def served(spec):
    return load_served_adapter(spec, hidden_size=D, num_layers=L, model_type="llama")


def state_with(adapters, sites="all"):
    state = ServingState(_vllm.resolve_sites(sites, [], L), D, L, "cpu")
    state.installed = set(range(len(state.sites)))
    for name, a in adapters.items():
        state.load(name, a)
    return state


def plan(state, batch):
    """batch: [(req_id, computed, scheduled)] in batch order."""
    qsl = np.concatenate([[0], np.cumsum([q for _, _, q in batch])])
    index = {rid: i for i, (rid, _, _) in enumerate(batch)}
    state.plan_step(index.get, qsl, np.array([c for _, c, _ in batch]))
    return state.plan


def run_site(state, hidden, residual, site):
    """The op as the model calls it during one of this engine's steps."""
    with state.active():
        torch.ops.reft_kernels_vllm.edit_site(hidden, residual, site)


def rows_at(state, p, site=(1, "block_output")) -> list[int]:
    return p.sites[state.site_index[site]].rows.tolist()


def reference_rows(adapter, h, rows):
    """float64: the adapter's interventions applied in order, per site, to rows of h (one site only)."""
    out = h.double().clone()
    for it in adapter.interventions:
        p = it.params
        for r in rows:
            u = out[r]
            s = (torch.relu if p.spec.act == "relu" else (lambda z: z))(p.weight.double() @ u + p.bias.double()) \
                if p.spec.source_linear else p.bias.double()
            if p.spec.subtract_proj:
                s = s - (p.lift.double() @ u + (p.proj_bias.double() if p.proj_bias is not None else 0))
            out[r] = u + p.lift.double().t() @ s
    return out


def test_positions_match_reft_model_locations(model_dir, adapters):
    for name in ("lo", "no", "di", "unset"):
        a = served(adapters[name])
        spec = adapters[name] if isinstance(adapters[name], str) else adapters[name]["path"]
        reft = rk.ReftModel.from_pretrained(tiny.hf_model(model_dir), spec)
        override = adapters[name].get("positions") if isinstance(adapters[name], dict) else None
        assert a.positions == (override or reft.reft_config.positions)
        for n in (1, 2, 3, 5, 8, 13):
            locs = reft.locations(torch.ones(1, n, dtype=torch.long), a.positions)[0]
            for g, pos in enumerate(a.positions_for(n)):
                k = next(i for i, it in enumerate(a.interventions) if it.group == g)
                want = sorted(set(locs[k][locs[k] >= 0].tolist()))
                assert pos.tolist() == want, (name, n, g)
            groups = [set(p.tolist()) for p in a.positions_for(n)]
            assert not (len(groups) == 2 and groups[0] & groups[1])


def test_fingerprints_and_cache_salts(adapters):
    lo, lo_again, lo2 = served(adapters["lo"]), served(adapters["lo"]), served(adapters["lo2"])
    assert lo.fingerprint == lo_again.fingerprint != lo2.fingerprint
    assert lo.cache_salt(20) == lo_again.cache_salt(20) != lo2.cache_salt(20)
    assert lo.cache_salt(20) != lo.cache_salt(21)  # "l2" edits other positions in another length
    with pytest.raises(ValueError, match="stores no position scheme"):
        served(adapters["py"]["path"])
    py = served(adapters["py"])
    assert py.format == "pyreft" and len(py.interventions) == L


def test_read_like_the_hf_layer(model_dir, adapters):
    """Every intervention's parameters are the ones ReftModel.from_pretrained / load_pyreft load, at its site
    and in its order (the plugin reads with reft_kernels.read_adapter, no model)."""
    for name in ("lo", "no", "stack", "py"):
        spec = adapters[name] if isinstance(adapters[name], str) else dict(adapters[name])
        a = served(spec)
        if isinstance(spec, str):
            reft = rk.ReftModel.from_pretrained(tiny.hf_model(model_dir), spec)
        else:
            path = spec.pop("path")
            reft = rk.load_pyreft(tiny.hf_model(model_dir), path, **dict(spec, dtype=torch.float32))
        hf = reft.adapters["default"]
        assert len(a.interventions) == hf.num_interventions
        for k, (it, (rep, _)) in enumerate(zip(a.interventions, hf.config.interventions())):
            want = hf.params(k)
            assert it.site == (rep.layer, rep.component) and it.params.spec == want.spec, (name, k)
            for got, ref in zip((it.params.lift, it.params.weight, it.params.bias, it.params.proj_bias),
                                (want.lift, want.weight, want.bias, want.proj_bias)):
                assert (got is None) == (ref is None) and (got is None or torch.equal(got, ref.float())), (name, k)


def test_named_adapter_in_a_subfolder(adapters, tmp_path):
    """save_pretrained of several adapters: "default" in the directory, "sub" in dir/sub; both spellings of
    the named one read the same adapter, and a directory holding only subfolders says which to name."""
    import shutil

    root = adapters["multi"]
    by_key, by_path, default = served(adapters["sub"]), served(f"{root}/sub"), served(root)
    assert by_key.fingerprint == by_path.fingerprint != default.fingerprint
    assert by_key.sites == [(3, "mlp_output")] and by_key.positions == "l3"
    assert default.sites == [(0, "block_output")] and default.positions == "f2"
    shutil.copytree(f"{root}/sub", tmp_path / "only" / "sub")
    with pytest.raises(FileNotFoundError, match=r"holds the adapters \['sub'\] in subfolders.*'subfolder': 'sub'"):
        served(str(tmp_path / "only"))
    with pytest.raises(FileNotFoundError):
        served({"path": root, "subfolder": "nope"})
    with pytest.raises(ValueError, match="subfolder must be"):
        served({"path": root, "subfolder": 3})


def test_position_override(adapters):
    """"positions" at load: required for an adapter saved without a scheme, allowed for another scheme of the
    same layout, refused when it would add or drop untied prefix / suffix interventions."""
    unset = adapters["unset"]["path"]
    with pytest.raises(ValueError, match="has no position scheme"):
        served(unset)
    assert served(adapters["unset"]).positions == "f1+l3"
    lo = served(adapters["lo"])
    other = served({"path": adapters["lo"], "positions": "last"})
    assert other.positions == "last" and other.positions_for(9) == [np.array([8])]
    assert other.fingerprint != lo.fingerprint and other.cache_salt(9) != lo.cache_salt(9)
    no = served({"path": adapters["no"], "positions": "f2+l2"})  # untied, another untied scheme
    assert no.num_groups == 2 and [g.tolist() for g in no.positions_for(9)] == [[0, 1], [7, 8]]
    with pytest.raises(ValueError, match="untied prefix / suffix.*would drop them"):
        served({"path": adapters["no"], "positions": "last"})
    with pytest.raises(ValueError, match="positions must be"):
        served({"path": adapters["lo"], "positions": "first5"})
    with pytest.raises(ValueError, match="only 'positions' and 'subfolder'"):
        served({"path": adapters["lo"], "dtype": "float32"})
    with pytest.raises(ValueError, match="unknown adapter options"):
        served({"path": adapters["lo"], "position": "f1"})


def test_wrong_width_or_depth_refused_for_pyreft(adapters):
    with pytest.raises(ValueError, match="width 48.*hidden size 64"):
        load_served_adapter(adapters["py"], hidden_size=64, num_layers=L)
    with pytest.raises(ValueError, match="edits layer 3; the served model has 2 layers"):
        load_served_adapter(adapters["py"], hidden_size=D, num_layers=2)


def test_parse_adapter_list():
    assert parse_adapter_list("a=/x, b=/y") == {"a": "/x", "b": "/y"}
    assert parse_adapter_list('{"a": {"path": "/x", "positions": "f1"}}') == {"a": {"path": "/x", "positions": "f1"}}
    with pytest.raises(ValueError, match="name=path"):
        parse_adapter_list("a")


def test_resolve_sites():
    assert _vllm.resolve_sites(None, [], 2) == [(0, "block_output"), (1, "block_output")]
    assert len(_vllm.resolve_sites("all", [], 3)) == 12
    assert _vllm.resolve_sites("1:mlp_output,attention_output", [], 2) == [
        (0, "attention_output"), (1, "mlp_output"), (1, "attention_output")]
    with pytest.raises(ValueError, match="not a component"):
        _vllm.resolve_sites("mlp", [], 2)


def test_plan_chunks_and_decode(adapters):
    lo = served(adapters["lo"])  # f2+l2 at block_output of layers 1 and 2
    state = state_with({"lo": lo})
    state.admit("r", "lo", 10)
    state.admit("base", None, 6)
    assert "base" not in state.requests
    # step 1: base prompt (6) and r's first chunk (4 of 10) -> rows of positions 0, 1 after the 6 base rows
    p = plan(state, [("base", 0, 6), ("r", 0, 4)])
    assert rows_at(state, p) == [6, 7]
    s1 = state.site_index[(1, "block_output")]
    assert p.sites[s1] is not None and p.sites[state.site_index[(0, "block_output")]] is None
    # step 2: positions 4..7 of r: nothing to edit -> no plan at all
    assert plan(state, [("base", 6, 1), ("r", 4, 4)]) is None
    # step 3: the last chunk 8..9 -> positions 8, 9 at rows 1, 2 (after base's decode token)
    p = plan(state, [("base", 7, 1), ("r", 8, 2)])
    assert rows_at(state, p) == [1, 2]
    assert not state.pending  # prompt done: decode steps do not look at it
    assert plan(state, [("r", 10, 1)]) is None
    state.resume(["r"])  # preempted and recomputed: edited again
    assert rows_at(state, plan(state, [("r", 0, 11)])) == [0, 1, 8, 9]


def test_edit_of_a_block_site_and_of_a_component(adapters):
    lo, di = served(adapters["lo"]), served(adapters["di"])
    state = state_with({"lo": lo, "di": di})
    state.admit("a", "lo", 7)
    state.admit("b", "di", 5)
    p = plan(state, [("a", 0, 7), ("b", 0, 5)])
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(12, D, generator=g), torch.randn(12, D, generator=g)
    h0, r0 = hidden.clone(), residual.clone()
    site = state.site_index[(1, "block_output")]
    run_site(state, hidden, residual, site)
    rows = [0, 1, 5, 6]
    lo1 = type(lo)(**{**lo.__dict__, "interventions": [i for i in lo.interventions if i.layer == 1]})
    want = reference_rows(lo1, h0 + r0, rows)
    assert torch.allclose((hidden + residual).double(), want, atol=1e-5)
    others = [i for i in range(12) if i not in rows]  # b's row 11 too: its adapter does not edit here
    assert torch.equal(hidden[others], h0[others]) and torch.equal(residual[others], r0[others])
    assert torch.equal(residual[rows], torch.zeros(len(rows), D))
    # di's mlp_output at layer 0, "last": row 7 + 4 = 11 only; no residual
    mlp = torch.randn(12, D, generator=g)
    m0 = mlp.clone()
    run_site(state, mlp, None, state.site_index[(0, "mlp_output")])
    di0 = type(di)(**{**di.__dict__, "interventions": [i for i in di.interventions if i.layer == 0]})
    assert torch.allclose(mlp.double(), reference_rows(di0, m0, [11]), atol=1e-5)
    assert torch.equal(mlp[:11], m0[:11])
    assert p.n_rows == 5


def test_stacked_interventions_run_in_order(adapters):
    stack = served(adapters["stack"])  # consreft, lobireft, orthodireft on layer 2 block_output, f1+l2
    assert [i.pass_index for i in stack.interventions] == [0, 1, 2]
    state = state_with({"s": stack})
    state.admit("a", "s", 6)
    plan(state, [("a", 0, 6)])
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, D, generator=g)
    h0 = hidden.clone()
    run_site(state, hidden, None, state.site_index[(2, "block_output")])
    ref = h0.double().clone()
    for it in stack.interventions:  # each on the already edited rows, through reft_edit in float64
        p = it.params
        rk.reft_edit(ref.unsqueeze(0), torch.tensor([[0, 4, 5]]), p.lift.double(),
                     None if p.weight is None else p.weight.double(), p.bias.double(),
                     source_linear=p.spec.source_linear, subtract_proj=p.spec.subtract_proj, act=p.spec.act,
                     backend="torch")
    assert torch.allclose(hidden.double(), ref, atol=1e-5)


def test_remove_waits_for_requests_in_flight(adapters):
    lo, lo2 = served(adapters["lo"]), served(adapters["lo2"])
    state = state_with({"lo": lo})
    state.admit("a", "lo", 8)
    state.remove("lo")
    with pytest.raises(ValueError, match="not loaded here"):
        state.admit("b", "lo", 8)
    state.load("lo", lo2)  # the name is free at once; the old slots are still in use by "a"
    assert sum(b.live for b in state.banks) == 4
    p = plan(state, [("a", 0, 8)])
    assert rows_at(state, p) == [0, 1, 6, 7]
    state.plan = None
    state.finish(["a"])
    assert sum(b.live for b in state.banks) == 2
    with pytest.raises(RuntimeError, match="no longer loaded"):
        state.admit("c", "lo", 8, fingerprint=lo.fingerprint)


def test_refusals(adapters):
    state = state_with({}, sites="block_output")
    with pytest.raises(ValueError, match="not started with"):
        state.load("di", served(adapters["di"]))
    state.load("lo", served(adapters["lo"]))
    with pytest.raises(ValueError, match="already loaded"):
        state.load("lo", served(adapters["lo2"]))
    with pytest.raises(KeyError, match="no ReFT adapter named 'x'"):
        state.remove("x")


def test_end_step_raises_when_a_planned_site_was_not_run(adapters):
    state = state_with({"lo": served(adapters["lo"])})
    state.admit("a", "lo", 6)
    plan(state, [("a", 0, 6)])
    hidden = torch.randn(6, D)
    run_site(state, hidden, None, state.site_index[(1, "block_output")])  # layer 2's never runs
    with pytest.raises(RuntimeError, match=r"planned at \[\(2, 'block_output'\)\].*never ran them"):
        state.end_step()
    assert state.plan is None


def test_mixed_edit_semantics_the_plugin_relies_on():
    g = torch.Generator().manual_seed(2)
    bank = AdapterBank.empty(3, 2, D)
    from reft_kernels.vllm.mixed_op import AdapterParams

    lift, _ = torch.linalg.qr(torch.randn(D, 2, generator=g))
    bank.set_slot(1, AdapterParams(lift.t().contiguous(), torch.randn(2, D, generator=g), torch.randn(2, generator=g)))
    hidden = torch.randn(5, D, generator=g)
    h0 = hidden.clone()
    mixed_reft_edit_flat(hidden, torch.tensor([3, 3, 1, 0]), torch.tensor([1, 1, -1, 2]), bank)
    want = h0.clone()
    rk.reft_edit(want.unsqueeze(0), torch.tensor([[3]]), bank.lift[1], bank.weight[1], bank.bias[1], backend="torch")
    assert torch.allclose(hidden, want, atol=1e-5)  # row 3 once; -1 and an empty slot edit nothing


def test_op_outside_a_step_and_under_torch_compile(adapters):
    state = state_with({"lo": served(adapters["lo"])})
    state.admit("a", "lo", 6)
    plan(state, [("a", 0, 6)])
    site = state.site_index[(1, "block_output")]
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    h0 = hidden.clone()
    torch.ops.reft_kernels_vllm.edit_site(hidden, residual, site)  # no step running (vLLM's warm-up runs)
    assert torch.equal(hidden, h0)

    def block(x, r):
        h, res = x * 2, r + 1
        torch.ops.reft_kernels_vllm.edit_site(h, res, site)
        return h + res

    compiled = torch.compile(block, fullgraph=True)
    with state.active():
        want = block(hidden, residual)
        got = compiled(hidden, residual)
    assert torch.allclose(got, want) and not torch.allclose(got, hidden * 2 + residual + 1)
    assert state.calls[site] == 2


def test_one_mixed_call_per_site_and_pass_whatever_the_mix(adapters, monkeypatch):
    """Three adapters of different types in one step: one mixed-adapter call per site and pass (the stacked
    adapter's site has three passes), none at sites nobody edits, none at all in a decode step."""
    from reft_kernels.vllm import state as state_module

    loaded = {name: served(adapters[name]) for name in ("lo", "no", "stack", "di")}
    state = state_with(loaded)
    for k, name in enumerate(loaded):
        state.admit(f"r{k}", name, 9)
    calls = []
    real = state_module.mixed_reft_edit_flat
    monkeypatch.setattr(state_module, "mixed_reft_edit_flat", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan(state, [(f"r{k}", 0, 9) for k in range(4)])
    per_site = {}
    for site_id, site in enumerate(state.sites):
        before = len(calls)
        run_site(state, torch.randn(36, D), torch.randn(36, D) if "block" in site[1] else None, site_id)
        per_site[site] = len(calls) - before
    want = {}
    for a in loaded.values():
        for it in a.interventions:
            want[it.site] = max(want.get(it.site, 0), it.pass_index + 1)
    assert per_site == {s: want.get(s, 0) for s in state.sites}
    assert per_site[(2, "block_output")] == 3  # lo's layer 2 and the stack's three interventions
    calls.clear()
    plan(state, [(f"r{k}", 9, 1) for k in range(4)])  # decode
    with state.active():
        for site_id in range(len(state.sites)):
            torch.ops.reft_kernels_vllm.edit_site(torch.randn(4, D), None, site_id)
    assert calls == [] and state.plan is None


def test_other_vllm_versions_warn_and_missing_internals_raise(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match="tested with vLLM 0.32.0; this is vLLM 0.99.0"):
        _vllm._check_version()

    class Runner:
        def load_model(self):
            pass

    with pytest.raises(RuntimeError, match=r"has no \['_prepare_inputs'\].*tested with vLLM 0.32.0"):
        _vllm._need(Runner, "load_model", "_prepare_inputs")
    # a runner whose batch lacks an array the plan needs: the step raises instead of running unedited
    wrapped = _vllm._prepare_inputs_v1(lambda self, so: None)
    runner = Runner()
    runner._reft_state = ServingState([(0, "block_output")], D, L, "cpu")
    runner.input_batch = type("Batch", (), {"req_id_to_index": {}, "num_reqs": 0})()
    runner.query_start_loc = type("Buffer", (), {"np": np.zeros(1, dtype=np.int32)})()
    with pytest.raises(RuntimeError, match="V1 model runner lacks num_computed_tokens_cpu"):
        wrapped(runner, None)
