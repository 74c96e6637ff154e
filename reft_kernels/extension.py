"""The C++ extension (csrc/): the fused CPU kernels, registered as torch.ops.reft_kernels_cpp.*, and the
CUDA host path (load_cuda(), at the end): the CUDA kernel of reft_kernels_cpp::edit.

`available()` loads it on first call, in this order:
1. REFT_KERNELS_CPP=0 in the environment: not loaded, no warning (the CPU default is then the torch
   reference).
2. An ahead-of-time build that setup.py put inside the package (REFT_KERNELS_BUILD_CPP=1 at install).
3. A just-in-time build of csrc/*.cpp with ninja (torch.utils.cpp_extension.load), from the top-level
   csrc/ of a source checkout or the copy that wheels carry in reft_kernels/csrc/ (setup.py puts it
   there); cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilt only when a
   source or a flag changes. A one-line message on stderr says when a compile starts (about 30 s on 2
   cores).
If both fail (no compiler, no sources in the install), `available()` is False, one warning says why, and
every op still works through the Triton or torch backends.

The JIT build targets the widest x86 ISA torch finds on this CPU (AVX2/FMA/F16C or AVX-512). The ISA is
part of the extension's name, so a cache shared between different machines never runs a binary built for
a wider ISA. The ahead-of-time build stays portable (no -m flags) unless REFT_KERNELS_NATIVE=1.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

ENV_SWITCH = "REFT_KERNELS_CPP"
PACKAGE_DIR = Path(__file__).resolve().parent
# csrc/ of a source checkout (editable installs), else the copy setup.py puts inside wheels
SOURCE_DIR = next((p for p in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "csrc") if (p / "edit_cpu.cpp").is_file()),
                  PACKAGE_DIR.parent / "csrc")
SOURCES = ("edit_cpu.cpp", "mixed_cpu.cpp")
AOT_NAME = "_cpp"  # reft_kernels/_cpp*.so, built by setup.py

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
COMMON_FLAGS = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension sets for its headers

_lock = threading.Lock()
_state: dict[str, object] = {}


def isa() -> str:
    """The instruction set the JIT build targets: 'AVX512', 'AVX2' or 'DEFAULT'."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def build_flags(target_isa: Optional[str] = None) -> list[str]:
    """Compiler flags for a build targeting target_isa (default: this machine's)."""
    return COMMON_FLAGS + _ISA_FLAGS.get(target_isa or isa(), [])


def jit_name() -> str:
    return f"reft_kernels_cpp_{isa().lower()}"


def _registered() -> bool:
    return hasattr(torch.ops, "reft_kernels_cpp") and hasattr(torch.ops.reft_kernels_cpp, "edit_fwd")


def _load_aot() -> bool:
    for path in sorted(glob.glob(str(PACKAGE_DIR / f"{AOT_NAME}*.so")) + glob.glob(str(PACKAGE_DIR / f"{AOT_NAME}*.pyd"))):
        torch.ops.load_library(path)
        return True
    return False


def _jit_build(name: str, sources: tuple[str, ...], what: str, **flags) -> None:
    """Compiles (or loads from the cache) csrc/<sources> as the library `name` with ninja, saying so on
    stderr when it compiles; flags go to torch.utils.cpp_extension.load."""
    from torch.utils import cpp_extension

    paths = [SOURCE_DIR / s for s in sources]
    missing = [str(s) for s in paths if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found ({', '.join(missing)}); reinstall reft-kernels from its "
                                "wheel, sdist or a source checkout")
    try:  # the ninja wheel's binary, when the venv's bin/ is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if not glob.glob(os.path.join(build_dir, f"{name}*.so")):
        print(f"reft_kernels: compiling {what} ({name}, once; cached in {build_dir})", file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(s) for s in paths], is_python_module=False, verbose=False, **flags)


def _failure(e: Exception) -> str:
    """A failed load or build in one line: a failed build's first line is the compiler command, the
    compiler's own error line says why."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    first = next((ln for ln in lines[1:] if "error" in ln.lower()), lines[0])[:300]
    return f"{type(e).__name__}: {first}"


def load() -> tuple[bool, str]:
    """Loads the extension if it is not loaded; returns (loaded, how or why not)."""
    if "loaded" in _state:  # every CPU op call asks: no lock once the answer is known
        return _state["loaded"], _state["how"]  # type: ignore[return-value]
    with _lock:
        if "loaded" in _state:
            return _state["loaded"], _state["how"]  # type: ignore[return-value]
        if os.environ.get(ENV_SWITCH, "1") == "0":
            loaded, how = False, f"{ENV_SWITCH}=0"
        elif _registered():
            loaded, how = True, "already registered"
        else:
            try:
                if _load_aot():
                    loaded, how = True, "ahead-of-time build"
                else:
                    _jit_build(jit_name(), SOURCES, "the C++ CPU kernels", extra_cflags=build_flags())
                    loaded, how = True, f"JIT build {jit_name()}"
            except Exception as e:  # no compiler, no ninja, a failed build: the Python paths still work
                loaded, how = False, _failure(e)
                warnings.warn(
                    f"reft_kernels: the C++ CPU kernels are unavailable ({how}); CPU tensors run the torch reference "
                    f"backend. Set {ENV_SWITCH}=0 to skip the build and this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if loaded and not _registered():
                loaded, how = False, "the library loaded but registered no reft_kernels_cpp ops"
        _state["loaded"], _state["how"] = loaded, how
        return loaded, how


def available() -> bool:
    """True when the fused C++ CPU kernels can run (loading or building them on the first call)."""
    return load()[0]


# ------------------------------------------------------------------------------------------------
# The CUDA host path (csrc/edit_cuda.cu): reft_kernels_cpp::edit's CUDA kernel, launched from C++
# ------------------------------------------------------------------------------------------------

CUDA_SWITCH = "REFT_KERNELS_CUDA_HOST"
CUDA_SOURCES = ("edit_cuda.cu",)


def cuda_host_enabled() -> bool:
    """Whether automatic backend choices send eager no-grad CUDA calls to the C++-launched kernel:
    REFT_KERNELS_CUDA_HOST=1. Opt-in until its speed and correctness are measured on a GPU (issue 7)."""
    return os.environ.get(CUDA_SWITCH) == "1"


def cuda_jit_name() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"reft_kernels_cuda_sm{major}{minor}"


def load_cuda() -> tuple[bool, str]:
    """Loads the CUDA host path (building it on first use); returns (loaded, how or why not). Needs a CUDA
    device, torch built with CUDA, nvcc, and the C++ library (load()), which defines the op's schema."""
    if "cuda_loaded" in _state:
        return _state["cuda_loaded"], _state["cuda_how"]  # type: ignore[return-value]
    reason = None
    if not torch.cuda.is_available() or torch.version.cuda is None:
        reason = "no CUDA device"
    elif os.environ.get(ENV_SWITCH, "1") == "0":
        reason = f"{ENV_SWITCH}=0"
    cpu_ok, cpu_how = load() if reason is None else (False, reason)  # (takes the lock itself)
    with _lock:
        if "cuda_loaded" in _state:
            return _state["cuda_loaded"], _state["cuda_how"]  # type: ignore[return-value]
        if reason is not None:
            loaded, how = False, reason
        elif not cpu_ok:
            loaded, how = False, f"the C++ library is unavailable ({cpu_how})"  # load() has warned
        else:
            try:
                if not torch._C._dispatch_has_kernel_for_dispatch_key("reft_kernels_cpp::edit", "CUDA"):
                    sm = "".join(str(v) for v in torch.cuda.get_device_capability())
                    # the GPU's own machine code (no PTX JIT at start-up)
                    _jit_build(cuda_jit_name(), CUDA_SOURCES, "the CUDA host path (about a minute)",
                               extra_cflags=COMMON_FLAGS,
                               extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{sm},code=sm_{sm}"])
                loaded = torch._C._dispatch_has_kernel_for_dispatch_key("reft_kernels_cpp::edit", "CUDA")
                how = f"JIT build {cuda_jit_name()}" if loaded else "the library registered no CUDA kernel"
            except Exception as e:  # no nvcc, a failed build: the Triton path still works
                loaded, how = False, _failure(e)
            if not loaded:
                warnings.warn(f"reft_kernels: the CUDA host path is unavailable ({how}); CUDA calls run the Triton "
                              "ops.", RuntimeWarning, stacklevel=3)
        _state["cuda_loaded"], _state["cuda_how"] = loaded, how
        return loaded, how


def cuda_available() -> bool:
    """True when reft_kernels_cpp::edit has its CUDA kernel (loading or building it on the first call)."""
    return load_cuda()[0]
