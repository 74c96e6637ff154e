"""`reft-kernels bench` (reft_kernels/bench/) on the CPU with tiny local configs: every mode runs and writes
every output, bad models, adapters and specs get clear errors, the numbers are positive, and the overhead
is computed from the same run's rows. The figures themselves are not checked (a timed test is not a
benchmark): only that they exist, are finite where they must be, and agree with each other.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft_kernels as rk
from reft_kernels.bench import breakdown as B
from reft_kernels.bench import cli
from reft_kernels.bench.adapters import AdapterError, load_adapter, parse_layers, parse_spec
from reft_kernels.bench.models import ModelError, load_model

SPEC = "loreft r=2 layers=0,1 positions=f2+l2"
FAST = ["--batch", "1", "--prompt", "8", "--output", "3", "--rounds", "1", "--steps", "1", "--warmup", "0",
        "--threads", "1", "--profile-calls", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local Llama config (no weights): 2 layers, hidden 32."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64, max_position_embeddings=128).save_pretrained(path)
    return path


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_mode_writes_every_output(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(["--model", str(model_dir), "--random-weights", "--adapter", SPEC, *FAST,
                              "--out", str(out)], capsys)
    assert code == 0, err
    for name in ("bench.md", "bench.csv", "bench.json", "breakdown.csv", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    expected = {"frozen", "reft_kernels"} | ({"lora"} if "lora" not in data["skipped"] else set())
    for mode in ("train", "prefill", "decode"):
        assert {r["provider"] for r in rows if r["mode"] == mode} == expected, mode
    for r in rows:  # positive numbers
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"]), r
        assert r["peak_MB"] > 0, r
        assert r["samples"] >= 1
    # the overhead comes from the same run's medians
    for r in rows:
        frozen = next(f for f in rows if f["mode"] == r["mode"] and f["provider"] == "frozen")
        if r["provider"] == "frozen":
            assert math.isnan(r["overhead_pct"])
        else:
            assert r["overhead_pct"] == pytest.approx(100 * (r["median_ms"] / frozen["median_ms"] - 1))
            assert r["extra_MB"] == pytest.approx(r["peak_MB"] - frozen["peak_MB"])
    adapter_params = 2 * (2 * 32 * 2 + 2)  # two LoReFT r = 2 at d = 32: R (delta) [2, 32], W [2, 32], b [2]
    assert {r["params"] for r in rows if r["provider"] == "reft_kernels"} == {adapter_params}
    # the breakdown: every component of a training step measured, none negative, within the profiled step
    parts = {r["component"]: r for r in data["breakdown"] if r["mode"] == "train"}
    for c in (B.EDIT, B.ORTH, B.HOOKS, B.WRAPPER, B.OPTIMIZER):
        assert parts[c]["host_ms"] > 0, c
    assert sum(parts[c]["host_ms"] for c in B.COMPONENTS) <= parts[B.TOTAL]["host_ms"]
    assert {r["mode"] for r in data["breakdown"]} == {"train", "prefill", "decode"}
    md = (out / "bench.md").read_text()
    assert "cpu_threads: 1" in md and "edit_backend:" in md and "![bench](bench.png)" in md
    # the terminal table
    assert "reft_kernels" in stdout and "overhead_pct" in stdout and "profiled step" in stdout


def test_one_mode_and_a_saved_adapter(model_dir, tmp_path, capsys):
    model, _ = load_model(str(model_dir), random_weights=True)
    reft = rk.get_reft_model(model, rk.ReftConfig(
        representations=[{"layer": 1, "intervention": "direft", "low_rank_dimension": 3, "dtype": "float32"}],
        positions="l3"))
    reft.save_pretrained(tmp_path / "adapter")
    reft.remove_hooks()
    code, stdout, err = _run(["--model", str(model_dir), "--random-weights", "--adapter", str(tmp_path / "adapter"),
                              "--modes", "prefill", "--providers", "frozen", "reft_kernels", "--no-profile", *FAST],
                             capsys)
    assert code == 0, err
    assert "reft_kernels adapter" in stdout and "positions l3" in stdout
    assert "prefill" in stdout and "decode" not in stdout.split("mode", 1)[1].split("\n\n")[0]


def test_a_pyreft_checkpoint(model_dir, tmp_path):
    model, _ = load_model(str(model_dir), random_weights=True)
    reft = rk.get_reft_model(model, rk.ReftConfig(
        representations=[{"layer": 0, "intervention": "loreft", "low_rank_dimension": 2}]))
    rk.save_pyreft(reft, tmp_path / "pyreft")
    reft.remove_hooks()
    adapter = load_adapter(str(tmp_path / "pyreft"), model)
    assert adapter.source.startswith("pyreft checkpoint") and "f5+l5 assumed" in adapter.source
    assert adapter.positions == "f5+l5"
    assert load_adapter(str(tmp_path / "pyreft"), model, positions="f1+l1").positions == "f1+l1"
    built = adapter.build(model)
    torch.testing.assert_close(built.state_dict(), adapter.state)
    built.remove_hooks()


def test_the_installed_command(model_dir, tmp_path):
    exe = shutil.which("reft-kernels", path=os.path.dirname(sys.executable)) or shutil.which("reft-kernels")
    assert exe, "the reft-kernels console script is not installed (pip install -e .)"
    bad = subprocess.run([exe, "bench", "--model", str(tmp_path / "nowhere"), "--adapter", SPEC],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such directory" in bad.stderr, bad.stderr
    assert subprocess.run([exe, "--help"], capture_output=True, text=True).stdout.count("bench") >= 1
    other = subprocess.run([exe, "serve"], capture_output=True, text=True)
    assert other.returncode == 2 and "invalid choice" in other.stderr
    module = subprocess.run([sys.executable, "-m", "reft_kernels.bench", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "--adapter" in module.stdout


# ------------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("file", "not a model directory"),
    ("no_config", "not a model directory"),
    ("no_weights", "pass --random-weights"),
    ("bad_name", "not a Hugging Face model name"),
])
def test_bad_model(case, message, model_dir, tmp_path, capsys):
    target = {"missing": tmp_path / "missing", "file": tmp_path / "file.txt", "no_config": tmp_path,
              "no_weights": model_dir, "bad_name": "not a name!"}[case]
    if case == "file":
        target.write_text("x")
    argv = ["--model", str(target), "--adapter", SPEC, *FAST]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    with pytest.raises(ModelError, match=message):
        load_model(str(target))


@pytest.mark.parametrize("arg, message", [
    ("loreft layers=all", "the rank is missing"),
    ("loreft r=four", "is not an integer"),
    ("loreft r=2 depth=3", "unknown key 'depth'"),
    ("loreft r=2 layers", "is not key=value"),
    ("loreft r=2 layers=0,7", "layer(s) [7]; the model has 2 layers"),
    ("loreft r=2 layers=one", "expected 'all' or indices"),
    ("lorft r=2", "intervention must be one of"),
    ("loreft r=2 positions=middle", "positions"),
    ("loreft r=2 component=mlp", "component must be one of"),
    ("loreft r=2 dtype=int8", "dtype='int8'"),
    ("loreft r=2 r=3", "given twice"),
    ("./no/such/adapter", "no such directory"),
])
def test_bad_adapter(arg, message, model_dir, capsys):
    code, _, err = _run(["--model", str(model_dir), "--random-weights", "--adapter", arg, *FAST], capsys)
    assert code == 2 and message in err, err


def test_a_directory_that_is_no_adapter(model_dir, tmp_path, capsys):
    code, _, err = _run(["--model", str(model_dir), "--random-weights", "--adapter", str(tmp_path), *FAST], capsys)
    assert code == 2 and "not an adapter directory" in err, err


def test_a_saved_adapter_of_another_model(model_dir, tmp_path):
    from transformers import LlamaConfig

    wide = tmp_path / "wide"
    LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64).save_pretrained(wide)
    model, _ = load_model(str(wide), random_weights=True)
    reft = rk.get_reft_model(model, rk.ReftConfig(representations=[{"layer": 0, "low_rank_dimension": 2}]))
    reft.save_pretrained(tmp_path / "adapter")
    reft.remove_hooks()
    small, _ = load_model(str(model_dir), random_weights=True)
    with pytest.raises(AdapterError, match="hidden size 48"):
        load_adapter(str(tmp_path / "adapter"), small)


@pytest.mark.parametrize("argv, message", [
    (["--output", "1"], "decode needs --output of at least 2"),
    (["--batch", "0"], "--batch takes positive integers"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_bad_arguments(argv, message, model_dir, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(model_dir), "--random-weights", "--adapter", SPEC, *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_spec_parsing():
    cfg = parse_spec("direft r=8 layers=0,2-3 component=mlp_output dtype=fp32 dropout=0.1 act=relu share_weights=false "
                     "positions=f3+l2", 4)
    assert [r.layer for r in cfg.representations] == [0, 2, 3]
    rep = cfg.representations[0]
    assert (rep.intervention, rep.low_rank_dimension, rep.component, rep.dtype, rep.dropout, rep.act) == \
        ("direft", 8, "mlp_output", torch.float32, 0.1, "relu")
    assert cfg.positions == "f3+l2" and not cfg.share_weights and len(cfg.interventions()) == 6
    assert parse_spec("LoreftIntervention rank=4", 3).representations[0].intervention == "loreft"
    assert parse_spec("loreft r=4", 3).positions == "f5+l5"
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0-1,2", 3) == [2, 0, 1]
