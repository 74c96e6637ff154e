"""What a benchmark writes: the environment header (device, versions, threads, the edit's backend, the
commit), tables (markdown and aligned terminal text), and the md/csv/json files of a result. Shared by
`reft-kernels bench` and the repository's suites (bench/), which add their own plots.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

EDIT_BACKENDS = {"triton": "the fused Triton kernels", "cpp": "the fused C++ kernels of csrc/",
                 "torch": "the torch reference"}


def device_name(device=None) -> str:
    """The GPU's name, or "cpu-<machine>-<n>cores" (the CPU folder name of results)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def device_slug(device=None) -> str:
    """device_name() as a folder name: the GPU's short name (h100, ...), or the CPU name as it is
    ("cpu-x86_64-2cores"), characters other than letters, digits, '_' and '-' replaced by '-'."""
    name = device_name(device).lower()
    for token in ("h200", "h100", "a100", "l40s", "l4", "a10g", "rtx 4090"):
        if token in name:
            return token.replace(" ", "")
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in name).strip("-")


def edit_backend(device=None) -> str:
    """The backend the fused edit takes by default for tensors on `device` ("triton", "cpp" or "torch";
    REFT_KERNELS_BACKEND and a failed C++ build are taken into account), as reft_kernels.backend resolves it."""
    from ..backend import resolve

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve(None, torch.empty(0, device=device))


def git_commit(path: Path) -> Optional[str]:
    """The short commit of the git checkout holding `path`, "+dirty" when tracked files differ from it;
    None outside a checkout (an installed wheel)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=path,
                                check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=path, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def environment(device=None, *, checkout: Optional[Path] = None, threads: Optional[int] = None) -> dict:
    """The header every result carries: date, device, versions, the edit's default backend on `device`,
    torch's CPU threads on a CPU, and the commit of `checkout` (default: the reft_kernels package's own
    folder, a checkout in editable installs)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .. import __version__

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "reft_kernels": __version__,
    }
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "not installed"
    backend = edit_backend(device)
    env["edit_backend"] = f"{backend} ({EDIT_BACKENDS[backend]})"
    if device.type == "cpu":
        env["cpu_threads"] = threads if threads is not None else torch.get_num_threads()
    commit = git_commit(checkout or Path(__file__).resolve().parent)
    if commit is None:
        commit = os.environ.get("REFT_KERNELS_COMMIT")
    if commit:
        env["commit"] = commit
    return env


def optional_versions(names: Sequence[str]) -> dict:
    """{name: version} of the optional packages a benchmark compares against ("not installed" if absent)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fmt(v) -> str:
    """A table cell: 3 significant digits below 100, integers above, "-" for NaN and None."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The same table aligned for a terminal: text left, numbers right."""
    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_results(name: str, rows: Sequence[dict], columns: Sequence[str], env: dict, notes: str = "", *,
                  out_dir: Path, plot: Optional[Callable[[Sequence[dict], dict, Path], Iterable[Path]]] = None,
                  extra_json: Optional[dict] = None) -> Path:
    """<out_dir>/<name>.md (title, the environment header, notes, the table, the plots), .csv (the table)
    and .json (env, rows and extra_json); plot(rows, env, out_dir) draws PNGs beside them, and a failure to
    draw is a note line in the markdown, never a failed benchmark. Returns the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    md = f"# {name}\n\n{header}\n\n{notes.strip()}\n\n{markdown_table(rows, columns)}\n"
    write_csv(out_dir / f"{name}.csv", rows, columns)
    (out_dir / f"{name}.json").write_text(json.dumps({"env": env, "rows": list(rows), **(extra_json or {})}, indent=1,
                                                     default=str))
    if plot is not None:
        md += "\n" + draw(plot, rows, env, out_dir) + "\n"
    (out_dir / f"{name}.md").write_text(md)
    return out_dir / f"{name}.md"


def draw(plot: Callable, rows, env, out_dir: Path) -> str:
    """Markdown for the PNGs plot(rows, env, out_dir) drew, or a line saying why there are none."""
    try:
        paths = list(plot(rows, env, out_dir))
    except ImportError as e:
        return f"Plots: not drawn ({e}; they need matplotlib: pip install 'reft-kernels[bench]')."
    except Exception as e:  # noqa: BLE001 - reported in the results, never fatal
        return f"Plots: not drawn ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})."
    return "\n".join(f"![{p.stem}]({p.name})" for p in paths)
