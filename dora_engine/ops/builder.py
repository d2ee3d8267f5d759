"""Build and load the C++/CUDA extension of the DoRA op (DESIGN.md section 5, "Building").

``OpBuilder`` knows the sources under ``csrc/`` and the compiler flags. The extension registers its ops
with ``TORCH_LIBRARY`` (``torch.ops.dora_engine.*``), so loading it means loading the shared library:

- ahead of time: ``DORA_BUILD_OPS=1 pip install --no-build-isolation .`` builds ``dora_engine._ops``
  (``setup.py`` asks ``OpBuilder.extension()`` for it); it is used when present and loadable;
- just in time otherwise: ``torch.utils.cpp_extension.load`` compiles with ninja on first use and caches
  the library under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), shared by every
  later process.

CUDA kernels are compiled only when torch has CUDA and ``nvcc`` is found; the architectures come from
``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``), else from the visible GPUs. Failures raise
``OpLoadError`` saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dora_engine.errors import UserError

# The source tree's csrc/ (editable installs), else the copy a plain install ships inside the package.
_REPO_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "_csrc"
CSRC = _REPO_CSRC if _REPO_CSRC.is_dir() else _PACKAGED_CSRC
AOT_MODULE = "dora_engine._ops"
OPS_NAMESPACE = "dora_engine"


class OpLoadError(UserError, RuntimeError):
    """The extension could not be built or loaded; the message says why."""


class OpBuilder:
    """Sources, flags and the two ways (ahead of time, just in time) of building the extension."""

    def __init__(self, with_cuda: bool | None = None) -> None:
        self.with_cuda = self.cuda_toolkit_available() if with_cuda is None else with_cuda

    @staticmethod
    def nvcc_path() -> str | None:
        """nvcc from CUDA_HOME (as torch finds it), else from PATH."""
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            return str(Path(CUDA_HOME) / "bin" / "nvcc")
        return shutil.which("nvcc")

    @classmethod
    def cuda_toolkit_available(cls) -> bool:
        """True when torch was built with CUDA and nvcc is there to compile the kernels."""
        return torch.version.cuda is not None and cls.nvcc_path() is not None

    @property
    def name(self) -> str:
        return "dora_engine_ops_cuda" if self.with_cuda else "dora_engine_ops_cpu"

    def sources(self, root: Path = CSRC) -> list[str]:
        files = [root / "bindings.cpp", root / "cpu" / "dora_cpu.cpp"]
        if self.with_cuda:
            files += [root / "cuda_ops.cpp", *sorted((root / "cuda").glob("*.cu"))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise OpLoadError(
                f"extension sources not found ({', '.join(missing)}): reinstall dora-engine, or build the op "
                "ahead of time with DORA_BUILD_OPS=1"
            )
        return [str(f) for f in files]

    def include_dirs(self, root: Path = CSRC) -> list[str]:
        return [str(root / "include"), str(root / "cpu"), str(root / "cuda")]

    def cxx_flags(self, *, native: bool) -> list[str]:
        """Host flags; ``native`` tunes for this CPU (the just-in-time build, never a shipped binary)."""
        flags = ["-O3", "-fopenmp-simd"]
        if native:
            flags.append("-march=native")
        if self.with_cuda:
            flags.append("-DDORA_WITH_CUDA")
        return flags

    def nvcc_flags(self) -> list[str]:
        return ["-O3", "-DDORA_WITH_CUDA", *self.cuda_arch_flags()]

    @staticmethod
    def cuda_archs() -> list[str]:
        """Architectures like ``["8.0", "9.0+PTX"]``: TORCH_CUDA_ARCH_LIST, else the visible GPUs."""
        listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
        archs = [a for a in listed.split(";") if a]
        if not archs and torch.cuda.is_available():
            capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = [f"{major}.{minor}" for major, minor in sorted(capabilities)]
        if not archs:
            raise OpLoadError("no CUDA architecture to build for: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') or "
                              "make a GPU visible")
        return archs

    @classmethod
    def cuda_arch_flags(cls) -> list[str]:
        flags = []
        for arch in cls.cuda_archs():
            number = arch.removesuffix("+PTX").replace(".", "")
            flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
            if arch.endswith("+PTX"):
                flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
        return flags

    def jit_load(self, verbose: bool = False) -> str:
        """Compile (or reuse the cached build) and load the library; returns its path."""
        from torch.utils.cpp_extension import load

        kwargs: dict[str, Any] = {
            "name": self.name,
            "sources": self.sources(),
            "extra_include_paths": self.include_dirs(),
            "extra_cflags": self.cxx_flags(native=True),
            "is_python_module": False,
            "verbose": verbose,
        }
        if self.with_cuda:
            kwargs["extra_cuda_cflags"] = self.nvcc_flags()
        try:
            load(**kwargs)
        except Exception as err:
            raise OpLoadError(f"just-in-time build of {self.name} failed: {err}") from err
        from torch.utils.cpp_extension import _get_build_directory

        return str(Path(_get_build_directory(self.name, verbose=False)) / f"{self.name}.so")

    def extension(self):
        """The setuptools extension of the ahead-of-time build (sources relative to the project root)."""
        from torch.utils.cpp_extension import CppExtension, CUDAExtension

        root = Path("csrc")
        args: dict[str, Any] = {
            "sources": self.sources(root),
            "include_dirs": [str(Path(d).resolve()) for d in self.include_dirs(root)],
            "extra_compile_args": {"cxx": self.cxx_flags(native=False)},
        }
        if self.with_cuda:
            args["extra_compile_args"]["nvcc"] = self.nvcc_flags()
            return CUDAExtension(AOT_MODULE, **args)
        return CppExtension(AOT_MODULE, **args)


def aot_library_path() -> str | None:
    """Path of the ahead-of-time build, or None when the package was installed without one."""
    spec = importlib.util.find_spec(AOT_MODULE)
    return spec.origin if spec is not None else None


_state = SimpleNamespace(ops=None, source=None, failure=None)


def load_ops(verbose: bool = False) -> Any:
    """``torch.ops.dora_engine`` with the kernels loaded: the ahead-of-time build, else the JIT build.

    Loaded once per process; a failure is remembered and raised again as ``OpLoadError``.
    """
    if _state.ops is not None:
        return _state.ops
    if _state.failure is not None:
        raise OpLoadError(_state.failure)
    reasons = []
    aot = aot_library_path()
    if aot is not None:
        try:
            torch.ops.load_library(aot)
            _state.source = f"ahead-of-time build {aot}"
        except Exception as err:
            reasons.append(f"ahead-of-time build {aot} does not load ({err})")
    if _state.source is None:
        try:
            _state.source = f"just-in-time build {OpBuilder().jit_load(verbose=verbose)}"
        except Exception as err:
            reasons.append(str(err))
            _state.failure = "; ".join(reasons)
            raise OpLoadError(_state.failure) from err
    _state.ops = getattr(torch.ops, OPS_NAMESPACE)
    from dora_engine.ops import fake_kernels  # noqa: F401  (registers the meta kernels once the ops exist)

    return _state.ops


def loaded_from() -> str | None:
    """Where the loaded extension came from (None before ``load_ops`` succeeded)."""
    return _state.source


def has_kernel(backend: str) -> bool:
    """Whether the loaded extension registered its kernels for ``"CPU"`` or ``"CUDA"``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{OPS_NAMESPACE}::seq_logprobs_fwd", backend)
