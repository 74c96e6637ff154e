"""reft_kernels' adapter directory: what ReftModel.save_pretrained writes and from_pretrained reads, checked so
that a loaded adapter is the adapter that was saved, or a clear error names the file and what is wrong.

One adapter is one directory (several adapters: one directory each, each with its own record; ReftModel's
save_pretrained writes the adapter "default" in the directory given and every other one in a subfolder named
after it, PEFT's layout):
- reft_model.safetensors: the adapter's tensors (ReftModel.state_dict(): "interventions.<key>.<name>" and
  "model.<unfrozen module>.<name>").
- reft_config.json: {"format": "reft_kernels", "format_version": 2, "reft_kernels_version", "config" (the
  ReftConfig, ReftConfig.to_json), "base_model" (model_type, class, hidden_size, num_layers, layers_path),
  "integrity"}.

The integrity record ("integrity": {"algorithm": "sha256", "reft_model.safetensors": hex, "reft_config.json":
hex}) holds the SHA-256 of the weights file's bytes and of the rest of reft_config.json (its canonical JSON:
sorted keys, no spaces). Loading recomputes both: a flipped byte, a truncated or swapped weights file, or a
config field changed to another valid value (a type, an activation, a rank, a dropout) is refused with an
error naming the file. A file edited on purpose loads with verify=False (from_pretrained(..., verify=False)),
which skips the two hashes and keeps every other check.

Checked at every load, verify or not: the JSON parses (errors give the file and line), each field is present
and of the right type (errors name the field), and every tensor has the key, shape and dtype the config
implies (missing, extra, reshaped, or another dtype: an error listing each), with finite values. Tensors of
unfrozen base-model modules may be stored in another floating dtype than the model holds them in (they are
cast, as a base model's own weights are when loaded with another torch_dtype).

format_version 1 (written before the record existed) loads with a warning that it is unverified; saving it
again writes the record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Callable, Optional, Union

import torch

from .config import ReftConfig

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
FORMAT = "reft_kernels"
FORMAT_VERSION = 2  # 2: with the integrity record; 1: without
ALGORITHM = "sha256"
_BASE_FIELDS = {"hidden_size": int, "num_layers": int, "class": str, "model_type": (str, type(None)),
                "layers_path": (str, type(None))}

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass
class SavedAdapter:
    """What read() returns: the adapter's config, the base model it was saved from, and its tensors (CPU)."""

    directory: str
    config: ReftConfig
    base_model: dict
    tensors: dict[str, torch.Tensor]
    format_version: int

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, WEIGHTS_NAME)


def _canonical(meta: dict) -> bytes:
    """The bytes the config's hash is taken over: reft_config.json without its record, canonical JSON."""
    rest = {k: v for k, v in meta.items() if k != "integrity"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(directory: PathLike, config: ReftConfig, base_model: dict, tensors: dict[str, torch.Tensor],
          reft_kernels_version: str) -> None:
    """Writes one adapter directory: the weights, then reft_config.json with the integrity record (last, and
    both through a temporary name: an interrupted save leaves no config that points at other weights)."""
    from safetensors.torch import save

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                            "reft_kernels_version": reft_kernels_version, "config": config.to_json(),
                            "base_model": dict(base_model)}
    meta["integrity"] = {"algorithm": ALGORITHM, WEIGHTS_NAME: _digest(data), CONFIG_NAME: _digest(_canonical(meta))}
    for name, payload in ((WEIGHTS_NAME, data), (CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())):
        path = os.path.join(directory, name)
        with open(path + ".tmp", "wb") as f:
            f.write(payload)
        os.replace(path + ".tmp", path)


def _not_an_adapter(directory: str) -> Exception:
    if not os.path.isdir(directory):
        return FileNotFoundError(f"{directory} is not a directory (an adapter saved by ReftModel.save_pretrained is "
                                 f"a directory with {CONFIG_NAME} and {WEIGHTS_NAME})")
    names = os.listdir(directory)
    if "config.json" in names and any(n.startswith("intkey_") for n in names):
        return FileNotFoundError(f"{directory} is a pyreft checkpoint (config.json, intkey_*.bin), not one written by "
                                 "ReftModel.save_pretrained: load it with reft_kernels.load_pyreft(model, directory)")
    named = sorted(n for n in names if os.path.isfile(os.path.join(directory, n, CONFIG_NAME)))
    if named:  # save_pretrained of adapters none of which is "default": one subfolder each (PEFT's layout)
        return FileNotFoundError(f"{os.path.join(directory, CONFIG_NAME)} not found: {directory} holds the adapters "
                                 f"{named} in subfolders (save_pretrained puts every adapter but 'default' in one): "
                                 f"ReftModel.from_pretrained(model, '{os.path.join(directory, named[0])}', "
                                 f"adapter_name={named[0]!r}), then reft.load_adapter(directory, name, subfolder=name)")
    return FileNotFoundError(f"{os.path.join(directory, CONFIG_NAME)} not found: not a directory written by "
                             "ReftModel.save_pretrained")


def read_json(path: str) -> dict:
    """A JSON object from a file; ValueError naming the file (and the line) when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is "
                         "truncated or was edited by hand") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): the file is corrupted") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _field(meta: dict, name: str, kind, path: str, where: str = ""):
    if name not in meta:
        raise ValueError(f"{path}: the field '{where}{name}' is missing")
    value = meta[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(
            "null" if k is type(None) else k.__name__ for k in kind)
        raise ValueError(f"{path}: {where}{name} must be {'an object' if kind is dict else want}, got "
                         f"{json.dumps(value)[:80]}")
    return value


def _check_record(meta: dict, data: bytes, path: str, weights_path: str, version: int, verify: bool) -> None:
    if version < 2:
        warnings.warn(f"{path} has no integrity record (format_version 1, saved before reft_kernels wrote one): "
                      "loaded unverified; save_pretrained again to add one", stacklevel=4)
        return
    record = _field(meta, "integrity", dict, path)
    if not verify:
        return
    if record.get("algorithm") != ALGORITHM:
        raise ValueError(f"{path}: integrity.algorithm must be {ALGORITHM!r}, got {record.get('algorithm')!r}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not isinstance(record.get(name), str):
            raise ValueError(f"{path}: integrity[{name!r}] must be a hex SHA-256 string, got {record.get(name)!r}")
    if _digest(_canonical(meta)) != record[CONFIG_NAME]:
        raise ValueError(f"{path} does not match its integrity record: a field was changed after save_pretrained "
                         "wrote it (the adapter would load as a different one). If you edited it on purpose, load "
                         "with verify=False")
    if _digest(data) != record[WEIGHTS_NAME]:
        raise ValueError(f"{weights_path} does not match the integrity record in {path} (sha256 "
                         f"{_digest(data)[:16]}..., recorded {record[WEIGHTS_NAME][:16]}...): the file is corrupted, "
                         "truncated or was replaced after save_pretrained. If you edited it on purpose, load with "
                         "verify=False")


def read(directory: PathLike, verify: bool = True) -> SavedAdapter:
    """Reads and checks one adapter directory (module docstring); the tensors are checked against a model by
    check_tensors. Raises FileNotFoundError (no such directory or file) or ValueError naming the file."""
    from safetensors.torch import load

    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise _not_an_adapter(directory)
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}, got {meta.get('format')!r}: not a config written by "
                         "ReftModel.save_pretrained")
    version = _field(meta, "format_version", int, path)
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is not one this reft_kernels reads (1 to "
                         f"{FORMAT_VERSION}){'; it was written by a newer reft_kernels' if version > 1 else ''}")
    config_json = _field(meta, "config", dict, path)
    base = _field(meta, "base_model", dict, path)
    for name, kind in _BASE_FIELDS.items():
        _field(base, name, kind, path, "base_model.")
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found ({path} refers to it)")
    try:  # a malformed field is reported as such, before the record (which it would fail too)
        config = ReftConfig.from_json(config_json)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: config: {e}") from None
    with open(weights_path, "rb") as f:
        data = f.read()
    _check_record(meta, data, path, weights_path, version, verify)
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) on malformed data
        raise ValueError(f"{weights_path} cannot be read as safetensors ({type(e).__name__}: {e}): the file is "
                         "truncated or corrupted") from None
    return SavedAdapter(directory, config, dict(base), tensors, version)


def check_tensors(saved: SavedAdapter, expected: dict[str, torch.Tensor],
                  castable: Callable[[str], bool] = lambda key: False) -> None:
    """Every tensor of `saved` has the key, shape and dtype of `expected` (a freshly built model's state_dict)
    and finite values; castable(key): whether a floating tensor may differ in floating dtype. Raises a
    ValueError listing every problem."""
    problems = []
    missing = [k for k in expected if k not in saved.tensors]
    extra = [k for k in saved.tensors if k not in expected]
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for key, want in expected.items():
        got = saved.tensors.get(key)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the config gives {tuple(want.shape)}")
        if got.dtype != want.dtype and not (castable(key) and got.dtype.is_floating_point and want.dtype.is_floating_point):
            problems.append(f"{key} is {str(got.dtype).replace('torch.', '')}, the config gives "
                            f"{str(want.dtype).replace('torch.', '')}")
        elif got.dtype.is_floating_point and not bool(torch.isfinite(got).all()):
            problems.append(f"{key} holds non-finite values")
    if problems:
        raise ValueError(f"{saved.weights_path} does not fit {os.path.join(saved.directory, CONFIG_NAME)}: "
                         + "; ".join(problems))


__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "SavedAdapter", "WEIGHTS_NAME", "check_tensors", "read", "read_json",
           "write"]
