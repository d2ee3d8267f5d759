"""Build hook of dora-engine; the metadata lives in pyproject.toml.

A plain install ships Python only: the C++/CUDA op is compiled just in time on first use. To compile it
ahead of time (CUDA kernels too when torch has CUDA and nvcc is found; architectures from
TORCH_CUDA_ARCH_LIST, else the visible GPUs):

    DORA_BUILD_OPS=1 pip install --no-build-isolation .

(``--no-build-isolation`` so that the build sees the installed torch.)
"""

import os

from setuptools import setup

if os.environ.get("DORA_BUILD_OPS") == "1":
    from torch.utils.cpp_extension import BuildExtension

    from dora_engine.ops.builder import OpBuilder

    setup(ext_modules=[OpBuilder().extension()], cmdclass={"build_ext": BuildExtension})
else:
    setup()
