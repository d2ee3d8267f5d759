"""Build hook of dora-engine; the metadata lives in pyproject.toml.

A plain install ships the Python package and a copy of ``csrc/`` inside it (``dora_engine/_csrc``): the
C++/CUDA op is compiled just in time on first use. To compile it ahead of time (CUDA kernels too when
torch has CUDA and nvcc is found; architectures from TORCH_CUDA_ARCH_LIST, else the visible GPUs):

    DORA_BUILD_OPS=1 pip install --no-build-isolation .

(``--no-build-isolation`` so that the build sees the installed torch.)
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package so that a non-editable install can still build the op just in time."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "dora_engine" / "_csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / "csrc", target)


cmdclass = {"build_py": BuildPyWithSources}
if os.environ.get("DORA_BUILD_OPS") == "1":
    from torch.utils.cpp_extension import BuildExtension

    from dora_engine.ops.builder import OpBuilder

    setup(ext_modules=[OpBuilder().extension()], cmdclass={**cmdclass, "build_ext": BuildExtension})
else:
    setup(cmdclass=cmdclass)
