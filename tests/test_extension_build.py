"""The JIT build's cache key (reft_kernels/extension.py): identical sources share one build whatever checkout
they come from, a changed source gets a new build (never a stale one), and the one stderr line appears
exactly when a compile happens.

Each case runs extension.load() in a fresh process (a library loads once per process) on a fresh
TORCH_EXTENSIONS_DIR, with SOURCES pointed at a small probe library (csrc/probe.cpp + probe.h in a
temporary "checkout"), so a build takes ~10 s instead of the real kernels' ~30-100 s; load() and the
keying are the real code, which takes the SOURCES list as it is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE_CPP = """#include <torch/library.h>
#include "probe.h"
static int64_t probe_value() { return PROBE_VALUE; }
TORCH_LIBRARY(reft_probe, m) { m.def("value() -> int", &probe_value); }
"""

LOAD = """
import json, sys
from pathlib import Path
import torch
import reft_kernels.extension as E
E.SOURCE_DIR = Path(sys.argv[1])
E.SOURCES = ("probe.cpp",)
E._load_aot = lambda: False
E._registered = lambda: hasattr(torch.ops, "reft_probe") and hasattr(torch.ops.reft_probe, "value")
loaded, how = E.load()
print(json.dumps({"loaded": loaded, "how": how, "value": torch.ops.reft_probe.value() if loaded else None}))
"""


def _checkout(root: Path, value: int) -> Path:
    csrc = root / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "probe.cpp").write_text(PROBE_CPP)
    (csrc / "probe.h").write_text(f"#define PROBE_VALUE {value}\n")
    return csrc


def _load(csrc: Path, cache: Path) -> tuple[dict, str]:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), REFT_KERNELS_CPP="1")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(csrc)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _builds(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and (p / "BUILT").is_file())


def test_identical_sources_share_one_build_and_changed_ones_get_their_own(tmp_path):
    cache = tmp_path / "cache"
    a = _checkout(tmp_path / "checkout_a", 1)
    b = _checkout(tmp_path / "checkout_b", 1)

    got, err = _load(a, cache)  # first checkout: compiles, says so once
    assert got == {"loaded": True, "how": got["how"], "value": 1}
    assert err.count("reft_kernels: compiling") == 1, err
    [build] = _builds(cache)
    assert got["how"] == f"JIT build {build.name}"
    library = next(build.glob("*.so"))
    mtime = library.stat().st_mtime_ns

    got_b, err = _load(b, cache)  # a second checkout of the same sources: the same build, no compile, silent
    assert got_b == got
    assert "compiling" not in err, err
    assert _builds(cache) == [build] and library.stat().st_mtime_ns == mtime

    (b / "probe.h").write_text("#define PROBE_VALUE 2\n")  # a header changes: a new build, the new code
    got_b2, err = _load(b, cache)
    assert got_b2["value"] == 2 and got_b2["how"] != got["how"]
    assert err.count("reft_kernels: compiling") == 1, err
    assert len(_builds(cache)) == 2

    got_a, err = _load(a, cache)  # the first checkout still gets its own build, untouched, silently
    assert got_a == got
    assert "compiling" not in err, err
    assert library.stat().st_mtime_ns == mtime


def test_the_key_covers_sources_headers_flags_and_name(tmp_path, monkeypatch):
    import reft_kernels.extension as E

    csrc = _checkout(tmp_path / "checkout", 1)
    monkeypatch.setattr(E, "SOURCE_DIR", csrc)
    flags = {"extra_cflags": ["-O3"]}
    key = E.build_key("probe", ("probe.cpp",), flags)
    assert key == E.build_key("probe", ("probe.cpp",), dict(flags))  # deterministic
    assert E.build_key("probe_asan", ("probe.cpp",), flags) != key
    assert E.build_key("probe", ("probe.cpp",), {"extra_cflags": ["-O3", "-mavx2"]}) != key
    (csrc / "probe.h").write_text("#define PROBE_VALUE 1  // a comment is a change too\n")
    assert E.build_key("probe", ("probe.cpp",), flags) != key
    (csrc / "extra.cpp").write_text("// a second source listed in SOURCES\n")
    assert E.build_key("probe", ("probe.cpp", "extra.cpp"), flags) != E.build_key("probe", ("probe.cpp",), flags)


def test_the_key_covers_the_compiler(tmp_path, monkeypatch):
    import reft_kernels.extension as E

    csrc = _checkout(tmp_path / "checkout", 1)
    monkeypatch.setattr(E, "SOURCE_DIR", csrc)
    key = E.build_key("probe", ("probe.cpp",), {})
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx (GCC) 99.1.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert "99.1.0" in E._compiler_version(False)
    assert E.build_key("probe", ("probe.cpp",), {}) != key


def test_missing_sources_are_named(tmp_path, monkeypatch):
    import reft_kernels.extension as E

    monkeypatch.setattr(E, "SOURCE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="probe.cpp"):
        E._jit_build("probe", ("probe.cpp",), "probe")
