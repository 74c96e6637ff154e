"""The package's layering (the developers' guide): the dependency arrows point one way,

    _version, backend, extension  →  ops  →  modules  →  integration  →  interop  →  reft_kernels (the root
    package, which re-exports every layer)  →  bench, vllm

a layer imports only itself and the layers left of it, and nothing imports bench or vllm (nor each other). Read
from the sources with ast: every import statement counts, at module level, inside functions, under
TYPE_CHECKING, and importlib.import_module / __import__ calls with a constant name. In particular the
integration layer never imports reft_kernels.interop: pyreft's checkpoint format reaches it through the
registry of integration/formats.py, filled when reft_kernels.interop is imported (tested below, and that the
error without the registration names the import).
"""
import ast
import os
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "reft_kernels"
ROOT = "reft_kernels"
# rank of each layer: a module may import modules of its own rank or lower; the top packages (rank 6) import
# anything below them, and nothing imports them
RANK = {"_version": 0, "backend": 0, "extension": 0, "ops": 1, "modules": 2, "integration": 3, "interop": 4,
        ROOT: 5, "bench": 6, "vllm": 6}
TOP = ("bench", "vllm")


def layer_of(module: str) -> str:
    """The layer of a dotted module name under reft_kernels: its first component below the root, or the root
    package itself."""
    parts = module.split(".")
    assert parts[0] == ROOT, module
    return parts[1] if len(parts) > 1 else ROOT


def _is_module(name: str) -> bool:
    """Whether a dotted name under reft_kernels is a module or package of the sources (else: an attribute)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(module: str, is_package: bool, source: str) -> list[tuple[str, int]]:
    """(imported module under reft_kernels, line) for every import in `source`, the source of `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]

    def resolve(level: int, name: str) -> str:
        if not level:
            return name
        base = package[:len(package) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.level, node.module or "")
            for a in node.names:  # `from . import interop` imports the submodule; `from .. import x` an attribute
                sub = f"{target}.{a.name}"
                out.append((sub if target.startswith(ROOT) and _is_module(sub) else target, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                text = node.args[0].value
                level = len(text) - len(text.lstrip("."))
                out.append((resolve(level, text[level:]), node.lineno))
    return [(t, line) for t, line in out if t == ROOT or t.startswith(ROOT + ".")]


def violations(module: str, targets: list[tuple[str, int]]) -> list[str]:
    """What is wrong with `module` importing `targets` (module docstring's rules)."""
    own = layer_of(module)
    if own not in RANK:
        return [f"{module}: layer {own!r} is not in tests/test_layering.py's RANK: place it in the layering"]
    bad = []
    for target, line in targets:
        layer = layer_of(target)
        if layer not in RANK:
            bad.append(f"{module}:{line} imports {target}: layer {layer!r} is not in RANK")
        elif layer in TOP and layer != own:
            bad.append(f"{module}:{line} imports {target}: nothing imports {layer} (it sits on top)")
        elif RANK[layer] > RANK[own] and layer not in TOP:
            bad.append(f"{module}:{line} imports {target}: {own} (rank {RANK[own]}) may not import {layer} "
                       f"(rank {RANK[layer]}); the arrows point {' -> '.join(RANK)}")
    return bad


def package_imports() -> dict[str, list[tuple[str, int]]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        out[module] = imports_of(module, is_package, path.read_text(encoding="utf-8"))
    return out


def test_the_checker_finds_each_kind_of_import():
    """The checker itself: each way of importing interop from integration is found (a check that cannot fail
    would pass for the wrong reason)."""
    sources = {
        "from ..interop.pyreft_checkpoint import read_pyreft": "reft_kernels.interop.pyreft_checkpoint",
        "def f():\n    from ..interop import pyreft_checkpoint": "reft_kernels.interop.pyreft_checkpoint",
        "def f():\n    from .. import interop": "reft_kernels.interop",
        "def f():\n    import reft_kernels.interop": "reft_kernels.interop",
        "if TYPE_CHECKING:\n    from reft_kernels.interop import x": "reft_kernels.interop",
        "def f():\n    return importlib.import_module('reft_kernels.interop')": "reft_kernels.interop",
        "def f():\n    return importlib.import_module('..interop', __package__)": "reft_kernels.interop",
    }
    for source, target in sources.items():
        found = imports_of("reft_kernels.integration.model", False, source)
        assert [t for t, _ in found] == [target], source
        assert violations("reft_kernels.integration.model", found), source
    # the root package (which imports every layer) is above integration; an attribute of it is the root
    found = imports_of("reft_kernels.integration.model", False, "def f():\n    from .. import __version__")
    assert found == [(ROOT, 2)] and violations("reft_kernels.integration.model", found)
    # the other rules: downward arrows, the top packages, an unplaced layer
    assert violations("reft_kernels.ops.fused_edit", [("reft_kernels.modules.interventions", 1)])
    assert violations("reft_kernels.modules.interventions", [("reft_kernels.integration", 1)])
    assert violations("reft_kernels.interop.pyreft_checkpoint", [("reft_kernels.vllm.adapters", 1)])
    assert violations("reft_kernels.bench.adapters", [("reft_kernels.vllm", 1)])
    assert violations("reft_kernels.newlayer.x", [])
    assert not violations("reft_kernels.interop.pyreft_checkpoint", [("reft_kernels.integration.model", 1)])
    assert not violations("reft_kernels.vllm.adapters", [("reft_kernels.interop", 1), (ROOT, 2)])
    assert not violations("reft_kernels.ops.fused_edit", [("reft_kernels.backend", 1), ("reft_kernels.ops.x", 2)])


def test_integration_never_imports_interop():
    found = package_imports()
    integration = [m for m in found if layer_of(m) == "integration"]
    assert len(integration) >= 10  # the files were found (adapters, checkpoint, formats, model, ...)
    bad = [f"{m}:{line} imports {t}" for m in integration for t, line in found[m]
           if layer_of(t) in ("interop", ROOT, *TOP)]
    assert not bad, ("the integration layer imports the layers above it (pyreft's format reaches it through "
                     "integration/formats.py's registry instead):\n" + "\n".join(bad))


def test_the_arrows_point_one_way_across_the_package():
    found = package_imports()
    assert {layer_of(m) for m in found} >= set(RANK)  # every layer was read
    bad = [v for module, targets in found.items() for v in violations(module, targets)]
    assert not bad, "\n".join(bad)


def test_version_module_matches_pyproject():
    """reft_kernels._version (read by every layer without importing the root package) is pyproject's."""
    import tomllib

    import reft_kernels
    from reft_kernels._version import __version__

    with open(PACKAGE.parent / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == __version__ == reft_kernels.__version__


# -- the format registry at work --------------------------------------------------------------------------

def test_import_reft_kernels_registers_pyreft(tmp_path):
    """In a fresh interpreter, `import reft_kernels` alone (no interop import by hand) gives the pyreft format:
    save_pretrained(format="pyreft") writes it and read_adapter reads it back."""
    import subprocess

    code = ("import reft_kernels as rk, torch, sys\n"
            "from reft_kernels.integration import formats\n"
            "assert formats.registered_formats() == ['pyreft'], formats.registered_formats()\n"
            "sys.path.insert(0, 'tests')\n"
            "from hf_models import tiny_model\n"
            "reft = rk.get_reft_model(tiny_model('llama'), rk.ReftConfig([{'layer': 1, 'low_rank_dimension': 2, "
            "'dtype': torch.float32}]))\n"
            f"reft.save_pretrained({str(tmp_path)!r}, format='pyreft')\n"
            f"a = rk.read_adapter({str(tmp_path)!r}, dtype=torch.float32)\n"
            "assert a.num_interventions == 1 and a.source is not None\n")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_the_pyreft_registration_the_errors_name_the_import(tmp_path, monkeypatch):
    """What a user of the integration layer alone sees when asking for pyreft's format: an error naming
    `import reft_kernels.interop` (simulated by removing the registration interop made)."""
    import torch

    import reft_kernels as rk
    from reft_kernels.integration import formats
    from reft_kernels.integration.adapters import adapter_format
    from hf_models import tiny_model

    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig([{"layer": 1, "low_rank_dimension": 2,
                                                                  "dtype": torch.float32}]))
    reft.save_pretrained(tmp_path / "pyreft", format="pyreft")
    assert adapter_format(tmp_path / "pyreft") == "pyreft"
    monkeypatch.delitem(formats._FORMATS, "pyreft")
    with pytest.raises(ValueError, match=r"format 'pyreft' is not registered: `import reft_kernels.interop`"):
        reft.save_pretrained(tmp_path / "again", format="pyreft")
    assert not (tmp_path / "again").exists()
    with pytest.raises(FileNotFoundError, match=r"intkey_\*\.bin|reft_config\.json.*`import reft_kernels.interop`"):
        rk.read_adapter(tmp_path / "pyreft")
    with pytest.raises(FileNotFoundError, match=r"a pyreft checkpoint needs `import reft_kernels.interop` first"):
        reft.load_adapter(tmp_path / "pyreft", "p")
    with pytest.raises(ValueError, match=r"format must be 'reft_kernels' or a registered format \[\], got 'x'"):
        reft.save_pretrained(tmp_path / "x", format="x")
    monkeypatch.undo()  # registered again: the same directory reads
    assert rk.read_adapter(tmp_path / "pyreft", dtype=torch.float32).num_interventions == 1


def test_a_registered_format_is_used_by_read_load_and_save(tmp_path, monkeypatch):
    """A third-party format goes through the same three doors (and reft_kernels' own directories still win)."""
    import torch

    import reft_kernels as rk
    from reft_kernels.integration import formats
    from reft_kernels.integration.adapters import adapter_format
    from hf_models import tiny_model

    monkeypatch.setattr(formats, "_FORMATS", formats._FORMATS.copy())
    reft = rk.get_reft_model(tiny_model("llama"), rk.ReftConfig([{"layer": 1, "low_rank_dimension": 2,
                                                                  "dtype": torch.float32}]))
    calls = []

    def write(model, directory, *, adapter_name):
        calls.append(("write", adapter_name))
        model.save_pretrained(directory, selected_adapters=[adapter_name])  # ours, plus a marker
        os.rename(os.path.join(directory, "reft_config.json"), os.path.join(directory, "mine.json"))

    def read(directory, *, name, dim=None, num_layers=None, device=None, backend=None, **options):
        calls.append(("read", name, dim, num_layers, options))
        os.rename(os.path.join(directory, "mine.json"), os.path.join(directory, "reft_config.json"))
        try:
            return rk.read_adapter(directory, name=name, device=device, backend=backend)
        finally:
            os.rename(os.path.join(directory, "reft_config.json"), os.path.join(directory, "mine.json"))

    formats.register_format("mine", recognizes=lambda d: os.path.isfile(os.path.join(d, "mine.json")), read=read,
                            write=write, holds="mine.json")
    reft.save_pretrained(tmp_path / "m", format="mine")
    assert adapter_format(tmp_path / "m") == "mine"
    assert rk.read_adapter(tmp_path / "m", flag=1).num_interventions == 1
    reft.load_adapter(tmp_path / "m", "again")
    assert calls == [("write", "default"), ("read", "default", None, None, {"flag": 1}),
                     ("read", "again", reft.dim, len(reft.model.get_submodule(reft.layers_path)), {})]
    with pytest.raises(FileNotFoundError, match=r"reft_config\.json .* nor intkey_\*\.bin files \(a pyreft "
                                                r"checkpoint\) nor mine\.json \(a mine checkpoint\)"):
        rk.read_adapter(tmp_path)
    with pytest.raises(ValueError, match="other than 'reft_kernels'"):
        formats.register_format("reft_kernels", recognizes=bool, read=read, write=write)
    with pytest.raises(TypeError, match="read must be callable"):
        formats.register_format("x", recognizes=bool, read=None, write=write)
