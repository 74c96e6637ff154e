"""The repository's benchmark suites (bench/): where results go and what their reports say (issue 19: runs
overwrote tracked files, reports contradicted themselves). The timing code itself is reft_kernels.bench's
(tests/test_bench_cli.py)."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import torch

import reft_kernels as rk
from bench import bench_convergence, bench_ops, bench_pyreft_dropin, bench_train_step  # noqa: F401 (imports)
from bench import harness as H

REPO = Path(__file__).resolve().parent.parent


def test_runs_go_where_git_does_not_track_them(tmp_path, monkeypatch):
    probe = REPO / "bench" / "runs" / H.device_slug() / "20260101-000000-abc1234" / "ops.md"
    assert subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO).returncode == 0, \
        f"{probe} would be tracked by git"
    monkeypatch.setattr(H, "RUNS", tmp_path)
    monkeypatch.setattr(H, "_RUN_DIR", [])
    out = H.run_dir()
    assert out.parent == tmp_path / H.device_slug() and out.name.split("-")[-1] != ""
    assert H.run_dir() == out  # one folder for every suite of a run
    assert (out.parent / "latest").resolve() == out.resolve()


def test_reference_results_are_named_by_device_and_commit():
    folders = [p for p in (REPO / "bench" / "reference").iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        for md in folder.glob("*.md"):
            header = md.read_text().split("\n\n", 2)[1]
            commit = next(line.split(": ", 1)[1] for line in header.splitlines() if line.startswith("- commit: "))
            assert folder.name.endswith("-" + commit.replace("+dirty", "")), (md, commit)
        for png in folder.glob("*.png"):  # no image that nothing shows
            assert any(png.name in md.read_text() for md in folder.glob("*.md")) or \
                png.name in (REPO / "bench" / "reference" / "README.md").read_text(), png


def test_device_folder_and_header_spell_the_cpu_alike():
    env = H.environment()
    if not torch.cuda.is_available():
        assert H.device_slug() == env["device"]  # cpu-x86_64-<n>cores both


def test_notes_start_at_the_docstring_start():
    notes = H.suite_notes(bench_convergence.__doc__)
    assert notes.startswith("Convergence parity: does the default R parametrization")


def test_cpu_notes_name_the_backend_the_edit_ran_on():
    env = dict(H.environment(), dtype="float32")
    assert f"the edit on {env['edit_backend']}" in H.cpu_run_note(env)
    backend = env["edit_backend"].split()[0]
    assert backend == ("cpp" if rk.extension.available() else "torch") or torch.cuda.is_available()
    from reft_kernels.bench.plot import cpu_note

    if not torch.cuda.is_available():
        assert f"backend {backend}" in cpu_note(env)


def test_ops_headline_table_shows_the_providers_that_ran():
    def row(mode, **us):
        return {"type": "loreft", "d": 4096, "r": 4, "dtype": "bf16", "N": 16, "mode": mode, "rows_floor_us": 1.0,
                **{f"{k}_us": v for k, v in us.items()}}

    table = bench_ops.headline_table([row("fwd", cpp=10.0, torch=50.0), row("fwd+bwd", cpp=30.0, torch=90.0),
                                      row("bwd", cpp=20.0, torch=40.0)])
    head = table.splitlines()[0]
    assert "cpp fwd" in head and "cpp fwd+bwd" in head and "cpp bwd" in head
    assert "fused" not in head and "pyreft" not in head  # nothing ran there: no empty column
    assert "| 16 | 10 | 50 |" in table


def test_train_step_suite_runs_on_the_package_providers(tmp_path):
    rows = bench_train_step.run_case("tiny", "4", ["frozen-forward", "bias-hook", "ours", "plain-torch"], batch=1,
                                     seq=16, rounds=1, warmup=0, steps=1, device="cpu", dtype=torch.float32,
                                     skipped={})
    got = {r["provider"]: r for r in rows}
    assert set(got) == {"frozen-forward", "bias-hook", "ours", "plain-torch"}
    assert got["ours"]["trainable_params"] == got["plain-torch"]["trainable_params"] == 4 * (2 * 4 * 128 + 4)
    assert got["bias-hook"]["trainable_params"] == 4 * 128
    assert all(r["step_ms"] > 0 for r in rows)
    assert got["bias-hook"]["over_floor_pct"] == 0 and math.isnan(got["frozen-forward"]["over_floor_pct"])
