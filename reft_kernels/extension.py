"""The C++ extension (csrc/): the fused CPU kernels, registered as torch.ops.reft_kernels_cpp.*, and the
CUDA host path (load_cuda(), at the end): the CUDA kernel of reft_kernels_cpp::edit.

`available()` loads it on first call, in this order:
1. REFT_KERNELS_CPP=0 in the environment: not loaded, no warning (the CPU default is then the torch
   reference).
2. An ahead-of-time build that setup.py put inside the package (REFT_KERNELS_BUILD_CPP=1 at install).
3. A just-in-time build of csrc/*.cpp with ninja (torch.utils.cpp_extension.load), from the top-level
   csrc/ of a source checkout or the copy that wheels carry in reft_kernels/csrc/ (setup.py puts it
   there), cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). The build is keyed on
   what goes into the binary (build_key): the sources' and headers' content, the compiler's and torch's
   versions, the flags and the ISA. Its folder is named <name>_<key>, holds a copy of the sources it was
   compiled from and a BUILT stamp written once it loaded: identical sources share one build whatever
   checkout they come from, and a changed source or toolchain gets a new folder, never a stale binary.
   A process that finds the stamp loads the library directly (no ninja call); one that does not says so
   in one line on stderr before it compiles (about 30 s on 2 cores). Old folders are never needed again
   once their sources changed: the cache can be deleted at any time.
If both fail (no compiler, no sources in the install), `available()` is False, one warning says why, and
every op still works through the Triton or torch backends.

REFT_KERNELS_SANITIZE=1 builds and loads instead an AddressSanitizer + UndefinedBehaviorSanitizer build
under its own name (jit_name() + "_asan", then the build key: it never replaces the normal build in the
cache); the process must have libasan preloaded (`make sanitize`, scripts/sanitize.sh).

The JIT build targets the widest x86 ISA torch finds on this CPU (AVX2/FMA/F16C or AVX-512). The ISA is
part of the extension's name, so a cache shared between different machines never runs a binary built for
a wider ISA. The ahead-of-time build stays portable (no -m flags) unless REFT_KERNELS_NATIVE=1.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
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
SANITIZE_ENV = "REFT_KERNELS_SANITIZE"
# every UB report is fatal (-fno-sanitize-recover), frames kept for readable reports; -O1 (after build_flags'
# -O3, so it wins): the instrumented -O3 build took 2 min 50 s of CPU on this repository's 2-core machines
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g",
                  "-O1"]

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


HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
STAMP = "BUILT"  # written into a build folder once its library compiled and loaded


def _compiler_version(cuda: bool) -> str:
    """The first line of `<compiler> --version` (the C++ compiler torch.utils.cpp_extension calls: $CXX or
    c++; nvcc's last line for CUDA builds), or why it could not be read (then a build would fail too)."""
    if cuda:
        from torch.utils import cpp_extension

        cmd = [os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc"), "--version"]
    else:
        cmd = [os.environ.get("CXX", "c++"), "--version"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {type(e).__name__}"
    return f"{cmd[0]}: {(out[-1] if cuda else out[0]) if out else '?'}"


def build_key(name: str, sources: tuple[str, ...], flags: dict, *, cuda: bool = False) -> str:
    """16 hex digits of a SHA-256 over everything that goes into the binary: the extension's name, the
    content of `sources` (as listed; names in csrc/) and of every header in csrc/, the compiler's version,
    torch's version and build (git hash, CUDA, C++ ABI), Python's ABI, the machine, and the flags (which
    carry the ISA). Two checkouts with the same sources get the same key; a change to any of these gets
    another one."""
    h = hashlib.sha256()
    headers = sorted(p.name for p in SOURCE_DIR.iterdir() if p.suffix in HEADER_SUFFIXES) if SOURCE_DIR.is_dir() else []
    for fname in [*sources, *headers]:
        h.update(f"\0{fname}\0".encode())
        h.update((SOURCE_DIR / fname).read_bytes())
    toolchain = [name, _compiler_version(cuda), torch.__version__, str(torch.version.git_version),
                 str(torch.version.cuda), str(torch._C._GLIBCXX_USE_CXX11_ABI), sysconfig.get_config_var("SOABI") or "",
                 platform.machine()]
    h.update(json.dumps([toolchain, flags], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _library(build_dir: str, name: str) -> Optional[str]:
    found = glob.glob(os.path.join(build_dir, f"{name}.so")) + glob.glob(os.path.join(build_dir, f"{name}.pyd"))
    return found[0] if found else None


def _snapshot_sources(sources: tuple[str, ...], dest: Path) -> list[str]:
    """Copies sources and csrc/ headers into dest (once: same key, same content), so the build reads a
    snapshot named by its key instead of a checkout's files (whose path would differ per checkout and make
    ninja rebuild). Returns the copied sources' paths."""
    dest.mkdir(parents=True, exist_ok=True)
    headers = [p.name for p in SOURCE_DIR.iterdir() if p.suffix in HEADER_SUFFIXES]
    for fname in [*sources, *headers]:
        target = dest / fname
        if not target.is_file():  # a rewrite would change the mtime, and ninja would compile again
            tmp = dest / f".{fname}.{os.getpid()}"
            shutil.copyfile(SOURCE_DIR / fname, tmp)
            os.replace(tmp, target)
    return [str(dest / s) for s in sources]


def _jit_build(name: str, sources: tuple[str, ...], what: str, **flags) -> str:
    """Loads the library compiled from csrc/<sources> with `flags` (torch.utils.cpp_extension.load keywords),
    compiling it first when no build with the same key (build_key) exists, and saying so on stderr then.
    Returns the keyed name it loaded."""
    from torch.utils import cpp_extension

    paths = [SOURCE_DIR / s for s in sources]
    missing = [str(s) for s in paths if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found ({', '.join(missing)}); reinstall reft-kernels from its "
                                "wheel, sdist or a source checkout")
    cuda = any(s.endswith(".cu") for s in sources)
    keyed = f"{name}_{build_key(name, sources, flags, cuda=cuda)}"
    build_dir = cpp_extension._get_build_directory(keyed, verbose=False)
    lib = _library(build_dir, keyed)
    if lib and os.path.isfile(os.path.join(build_dir, STAMP)):
        torch.ops.load_library(lib)  # built by this or another checkout of the same sources and toolchain
        return keyed
    try:  # the ninja wheel's binary, when the venv's bin/ is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):
        print(f"reft_kernels: waiting for another process compiling {what} in {build_dir} (if none is running, "
              f"delete {lock})", file=sys.stderr, flush=True)
    else:
        print(f"reft_kernels: compiling {what} ({keyed}: new sources or toolchain; cached in {build_dir})",
              file=sys.stderr, flush=True)
    copies = _snapshot_sources(sources, Path(build_dir) / "src")
    cpp_extension.load(name=keyed, sources=copies, build_directory=build_dir, is_python_module=False, verbose=False,
                       **flags)
    tmp = os.path.join(build_dir, f".{STAMP}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"sources": list(sources), "flags": flags, "torch": torch.__version__,
                   "compiler": _compiler_version(cuda)}, f, default=str)
    os.replace(tmp, os.path.join(build_dir, STAMP))
    return keyed


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
                if os.environ.get(SANITIZE_ENV) == "1":
                    keyed = _jit_build(jit_name() + "_asan", SOURCES, "the C++ CPU kernels with ASan + UBSan",
                                       extra_cflags=build_flags() + SANITIZE_FLAGS, extra_ldflags=SANITIZE_FLAGS[:1])
                    loaded, how = True, f"JIT build {keyed}"
                elif _load_aot():
                    loaded, how = True, "ahead-of-time build"
                else:
                    keyed = _jit_build(jit_name(), SOURCES, "the C++ CPU kernels (about 30 s on 2 cores)",
                                       extra_cflags=build_flags())
                    loaded, how = True, f"JIT build {keyed}"
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
                keyed = "already registered"
                if not torch._C._dispatch_has_kernel_for_dispatch_key("reft_kernels_cpp::edit", "CUDA"):
                    sm = "".join(str(v) for v in torch.cuda.get_device_capability())
                    # the GPU's own machine code (no PTX JIT at start-up); keyed like the CPU build (the
                    # architecture is in the flags, nvcc's version in the key)
                    keyed = "JIT build " + _jit_build(cuda_jit_name(), CUDA_SOURCES, "the CUDA host path (about a minute)",
                                                      extra_cflags=COMMON_FLAGS,
                                                      extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{sm},code=sm_{sm}"])
                loaded = torch._C._dispatch_has_kernel_for_dispatch_key("reft_kernels_cpp::edit", "CUDA")
                how = keyed if loaded else "the library registered no CUDA kernel"
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
