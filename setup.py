"""Build script. Metadata lives in pyproject.toml; this file adds the optional ahead-of-time build of the
C++ extension (csrc/).

By default nothing is compiled at install: the C++ CPU kernels are built just in time on first use, with
ninja, and cached (reft_kernels/extension.py). To compile them now instead, into the package:

    REFT_KERNELS_BUILD_CPP=1 pip install --no-build-isolation .      # torch must already be installed

The ahead-of-time build is portable (baseline x86-64 vector instructions) unless REFT_KERNELS_NATIVE=1,
which targets the widest ISA of the building machine, as the JIT build does.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Also copies csrc/ (*.cpp, *.cu, *.h) into the built package (reft_kernels/csrc/), so that an installed wheel can
    compile the C++ kernels just in time, as a source checkout does (reft_kernels/extension.py looks there
    when the top-level csrc/ is absent). Editable installs read csrc/ itself."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "reft_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in ("*.cpp", "*.cu", "*.h"):
            for src in sorted((HERE / "csrc").glob(pattern)):
                shutil.copy2(src, dest / src.name)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("REFT_KERNELS_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the flag logic lives in reft_kernels/extension.py (imports only torch): load that file by path
    spec = importlib.util.spec_from_file_location("_reft_ext", HERE / "reft_kernels" / "extension.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    flags = ext.build_flags() if os.environ.get("REFT_KERNELS_NATIVE") == "1" else ext.build_flags("DEFAULT")
    ext_modules = [CppExtension(f"reft_kernels.{ext.AOT_NAME}", [f"csrc/{s}" for s in ext.SOURCES],
                                extra_compile_args=flags)]
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
