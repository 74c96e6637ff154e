"""Checkpoint formats other than reft_kernels' own: a registry this layer reads and a higher layer fills, so that
the dependency arrow points one way (reft_kernels.interop imports the integration layer; the integration layer
never imports interop, not even lazily: tests/test_layering.py checks it).

    register_format("pyreft", recognizes=..., read=read_pyreft, write=save_pyreft)   # in reft_kernels.interop

What uses it
- read_adapter(path) and ReftModel.load_adapter(path, name) (integration/adapters.py): a directory that is not
  reft_kernels' own (reft_config.json, integration/checkpoint.py) goes to the first registered format that
  recognizes it.
- ReftModel.save_pretrained(directory, format=name) (integration/model.py): a format other than
  "reft_kernels" goes to that format's writer.

A format's three functions
- recognizes(directory: str) -> bool: whether a directory holds a checkpoint of this format (cheap: file
  names, no reading).
- read(directory, *, name, dim=None, num_layers=None, device=None, backend=None, **options) -> Adapter: one
  adapter directory as an Adapter (integration/adapters.py) named `name`. dim / num_layers: the model's width
  and depth when a model is known (to check against; None without one, from read_adapter). options: the
  format's own keywords, passed through from read_adapter / load_adapter (errors for unknown ones are the
  reader's).
- write(reft_model, directory, *, adapter_name) -> None: one adapter of a ReftModel into `directory`.

`import reft_kernels` imports reft_kernels.interop, which registers "pyreft"; a format asked for whose provider
was never imported is an error that names the import (PROVIDERS).
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .adapters import Adapter

NATIVE = "reft_kernels"  # integration/checkpoint.py's format: always there, never in the registry
# the formats reft_kernels itself provides, by the module whose import registers each (named in error messages
# only: this layer never imports them)
PROVIDERS = {"pyreft": "reft_kernels.interop"}


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One registered format (module docstring): its name, its recognizes / read / write functions, and what its
    directories hold (for error messages, e.g. "intkey_*.bin files")."""

    name: str
    recognizes: Callable[[str], bool]
    read: Callable[..., "Adapter"]
    write: Callable[..., None]
    holds: str = ""


_FORMATS: "OrderedDict[str, CheckpointFormat]" = OrderedDict()


def register_format(name: str, *, recognizes: Callable[[str], bool], read: Callable[..., "Adapter"],
                    write: Callable[..., None], holds: str = "") -> CheckpointFormat:
    """Registers (or replaces: a module imported again registers again) the format `name` (module docstring for
    the functions' signatures). Formats are tried in the order they were first registered."""
    if not isinstance(name, str) or not name or name == NATIVE:
        raise ValueError(f"name must be a non-empty string other than {NATIVE!r} (reft_kernels' own format), "
                         f"got {name!r}")
    for what, fn in (("recognizes", recognizes), ("read", read), ("write", write)):
        if not callable(fn):
            raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
    fmt = CheckpointFormat(name, recognizes, read, write, holds)
    _FORMATS[name] = fmt
    return fmt


def registered_formats() -> list[str]:
    """The registered formats' names, in the order they are tried (reft_kernels' own is not listed)."""
    return list(_FORMATS)


def get_format(name: Any) -> CheckpointFormat:
    """The registered format `name`; ValueError naming the registered ones (or, for a format reft_kernels
    provides that is not registered yet, the import that registers it)."""
    if isinstance(name, str) and name in _FORMATS:
        return _FORMATS[name]
    if isinstance(name, str) and name in PROVIDERS:
        raise ValueError(f"format {name!r} is not registered: `import {PROVIDERS[name]}` registers it")
    raise ValueError(f"format must be {NATIVE!r} or a registered format {registered_formats()}, got {name!r}")


def recognize(directory: str) -> Optional[CheckpointFormat]:
    """The first registered format that recognizes `directory`, or None."""
    for fmt in _FORMATS.values():
        if fmt.recognizes(directory):
            return fmt
    return None


def unrecognized(directory: str, native: str) -> FileNotFoundError:
    """The error for a directory that is not reft_kernels' own (which holds `native`) and that no registered
    format recognizes: what each format's directory holds, and the import a known unregistered format needs."""
    directory = os.fspath(directory)
    kinds = [f"{native} (an adapter written by ReftModel.save_pretrained)"]
    kinds += [f"{f.holds} (a {f.name} checkpoint)" if f.holds else f"a {f.name} checkpoint" for f in _FORMATS.values()]
    hint = "".join(f"; a {n} checkpoint needs `import {PROVIDERS[n]}` first (it registers the format)"
                   for n in PROVIDERS if n not in _FORMATS)
    if os.path.isdir(directory):
        return FileNotFoundError(f"{directory} holds {'neither ' if len(kinds) > 1 else ''}{' nor '.join(kinds)}{hint}")
    return FileNotFoundError(f"{directory} is not a directory (an adapter is a directory holding "
                             f"{' or '.join(kinds)}){hint}")


__all__ = ["CheckpointFormat", "NATIVE", "PROVIDERS", "get_format", "recognize", "register_format",
           "registered_formats", "unrecognized"]
