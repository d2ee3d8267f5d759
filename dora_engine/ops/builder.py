"""Build and load the C++/CUDA extension of the DoRA op (docs/design.md section 5, "Building").

``OpBuilder`` knows the sources under ``csrc/`` and the compiler flags. The extension registers its ops
with ``TORCH_LIBRARY`` (``torch.ops.dora_engine.*``), so loading it means loading the shared library:

- ahead of time: ``DORA_BUILD_OPS=1 pip install --no-build-isolation .`` builds ``dora_engine._ops``
  (``setup.py`` asks ``OpBuilder.extension()`` for it) and writes its build record
  ``dora_engine/_ops_build.json`` next to it: the torch and CUDA versions, the CUDA architectures and a
  hash of the sources and flags it was built from. It is used when the record matches the running torch,
  its CUDA and the visible GPUs (``mismatches``); otherwise ``load_ops`` warns once, saying what differs,
  and builds just in time;
- just in time otherwise: ``torch.utils.cpp_extension.load`` compiles with ninja on first use and caches
  the library under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), shared by every
  later process. The build is named ``dora_engine_ops_{cpu,cuda}_<hash>``, the hash covering every file
  the build reads, the flags, torch and its CUDA, and the CPU's instruction set (the build uses
  ``-march=native``): a changed source never reuses a stale binary, two checkouts or versions never
  rebuild over each other, and a cache on a shared home never serves a CPU that lacks the instructions
  it was compiled for. A build prints one line to stderr before it starts (it takes minutes). Builds of
  one name are serialised by an advisory lock (``flock``) that dies with its holder, so torch's own
  ``lock`` file left by a killed build is recognised as stale and removed, not waited on forever.

CUDA kernels are compiled only when torch has CUDA and ``nvcc`` is found; the architectures come from
``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``), else from the visible GPUs; the just-in-time build adds
every visible GPU that the list does not cover. Failures raise ``OpLoadError`` saying why, and so does a
call on a device the loaded extension has no kernels for (``check_kernels_for``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import torch

from dora_engine.errors import UserError

# The source tree's csrc/ (editable installs), else the copy a plain install ships inside the package.
_REPO_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "_csrc"
CSRC = _REPO_CSRC if _REPO_CSRC.is_dir() else _PACKAGED_CSRC
AOT_MODULE = "dora_engine._ops"
OPS_NAMESPACE = "dora_engine"
RECORD_NAME = "_ops_build.json"
RECORD_FORMAT = 1
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
REBUILD_HINT = (
    "rebuild it for this environment with `DORA_BUILD_OPS=1 pip install --no-build-isolation .` "
    "(`-e .` for an editable install), or reinstall without DORA_BUILD_OPS to build the op just in time"
)


class OpLoadError(UserError, RuntimeError):
    """The extension could not be built or loaded; the message says why."""


# --------------------------------------------------------------------------------------------------
# CUDA architectures
# --------------------------------------------------------------------------------------------------


def arch_covers(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (``"8.0"``, ``"9.0+PTX"``, ``"9.0a"``) runs on a GPU of ``capability``.

    A binary runs on the GPUs of its major version from its minor version up, PTX on every later GPU (the
    driver compiles it), an architecture-specific binary (``9.0a``) only on its own architecture.
    """
    ptx = arch.endswith("+PTX")
    number = arch.removesuffix("+PTX")
    specific = number.endswith("a")
    try:
        major, minor = (int(part) for part in number.rstrip("af").split("."))
    except ValueError:
        return False
    if specific:
        return (major, minor) == tuple(capability)
    if ptx and (major, minor) <= tuple(capability):
        return True
    return major == capability[0] and minor <= capability[1]


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: a binary for each architecture, plus PTX for those marked ``+PTX``."""
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


# --------------------------------------------------------------------------------------------------
# Build records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRecord:
    """What a build of the extension was made from and for; the ahead-of-time one is ``_ops_build.json``."""

    torch: str  # torch.__version__
    torch_cuda: str | None  # torch.version.cuda (None: a CPU-only torch)
    cuda_kernels: bool
    cuda_archs: list[str]  # e.g. ["8.0", "9.0+PTX"]; empty without CUDA kernels
    sources: str  # sha256 of every file the build reads (OpBuilder.source_digest)
    hash: str  # 10 hex digits of the sources, the flags, torch and its CUDA
    flags: dict[str, list[str]]  # by compiler: "cxx", "nvcc"

    def to_json(self) -> str:
        return json.dumps({"format": RECORD_FORMAT, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BuildRecord:
        """The record in ``text``; ValueError when it is not one (of this format)."""
        try:
            data = json.loads(text)
            version = data.pop("format")
            record = cls(**data)
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a build record ({type(err).__name__}: {err})") from None
        if version != RECORD_FORMAT:
            raise ValueError(f"record format {version!r}, this dora-engine reads format {RECORD_FORMAT}")
        return record


def record_path(library: str | Path) -> Path:
    """Where the build record of the library at ``library`` lies: beside it."""
    return Path(library).with_name(RECORD_NAME)


def write_record(library: str | Path, record: BuildRecord) -> Path:
    path = record_path(library)
    path.write_text(record.to_json())
    return path


def read_record(library: str | Path) -> BuildRecord | None:
    """The build record of ``library``; None when there is none; ValueError when it is unreadable."""
    path = record_path(library)
    if not path.is_file():
        return None
    return BuildRecord.from_json(path.read_text())


@dataclass(frozen=True)
class Runtime:
    """What the running process offers a library: torch, its CUDA, the visible GPUs, the sources at hand."""

    torch: str
    torch_cuda: str | None
    gpus: tuple[tuple[str, tuple[int, int]], ...] = ()  # (name, compute capability) of each visible GPU
    sources: str | None = None  # source_digest of the sources shipped now; None when there are none

    @classmethod
    def current(cls, sources: str | None = None) -> Runtime:
        gpus: tuple[tuple[str, tuple[int, int]], ...] = ()
        if torch.cuda.is_available():
            gpus = tuple(
                (torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())
            )
        return cls(torch=torch.__version__, torch_cuda=torch.version.cuda, gpus=gpus, sources=sources)


def _with_cuda(version: str | None) -> str:
    return f"CUDA {version}" if version else "no CUDA"


def mismatches(record: BuildRecord | None, runtime: Runtime) -> list[str]:
    """What keeps a library built as ``record`` from serving ``runtime``, in words; empty when nothing does."""
    if record is None:
        return [f"it has no build record ({RECORD_NAME}): it was built by an older dora-engine"]
    found = []
    if record.torch != runtime.torch:
        found.append(f"built for torch {record.torch}, running {runtime.torch}")
    if record.torch_cuda != runtime.torch_cuda:
        found.append(
            f"built for torch with {_with_cuda(record.torch_cuda)}, running torch with {_with_cuda(runtime.torch_cuda)}"
        )
    uncovered = [
        f"{name} ({major}.{minor})"
        for name, (major, minor) in runtime.gpus
        if not any(arch_covers(arch, (major, minor)) for arch in record.cuda_archs)
    ]
    if uncovered and not record.cuda_kernels:
        found.append(f"built without CUDA kernels, running with GPU {', '.join(uncovered)}")
    elif uncovered:
        found.append(f"built for CUDA architectures {', '.join(record.cuda_archs)}, not for GPU {', '.join(uncovered)}")
    if runtime.sources is not None and record.sources != runtime.sources:
        found.append("built from other sources than the package's csrc/ holds now")
    return found


def check_aot(library: str) -> tuple[BuildRecord | None, list[str]]:
    """The build record of the ahead-of-time ``library`` and how it mismatches this process (empty: it fits)."""
    try:
        record = read_record(library)
    except ValueError as err:
        return None, [f"its build record {record_path(library)} is unreadable ({err})"]
    return record, mismatches(record, Runtime.current(sources=_shipped_sources(record)))


def _shipped_sources(record: BuildRecord | None) -> str | None:
    """The digest of the sources shipped with the package, for the build kind of ``record``."""
    if record is None:
        return None
    try:
        return OpBuilder(with_cuda=record.cuda_kernels).source_digest()
    except OpLoadError:  # no sources shipped: nothing to compare
        return None


# --------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------


class OpBuilder:
    """Sources, flags and the two ways (ahead of time, just in time) of building the extension."""

    def __init__(self, with_cuda: bool | None = None) -> None:
        self.with_cuda = self.cuda_toolkit_available() if with_cuda is None else with_cuda

    # The toolchain ----------------------------------------------------------------------------------

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

    @staticmethod
    def cuda_archs(*, native: bool = False) -> list[str]:
        """Architectures like ``["8.0", "9.0+PTX"]``: TORCH_CUDA_ARCH_LIST, else the visible GPUs.

        ``native`` (the just-in-time build, for this machine): also every visible GPU that the list does not
        cover, so the build never lacks code for a GPU it will run on ("no kernel image" at the first call);
        an nvcc too old for that GPU then fails the build with ``OpLoadError``.
        """
        listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
        archs = [a for a in listed.split(";") if a]
        if (native or not archs) and torch.cuda.is_available():
            capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs += [
                f"{major}.{minor}" for major, minor in capabilities
                if not any(arch_covers(arch, (major, minor)) for arch in archs)
            ]
        if not archs:
            raise OpLoadError("no CUDA architecture to build for: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') or "
                              "make a GPU visible")
        return archs

    @classmethod
    def cuda_arch_flags(cls, *, native: bool = False) -> list[str]:
        return gencode_flags(cls.cuda_archs(native=native))

    # What the build reads -------------------------------------------------------------------------

    def sources(self, root: Path = CSRC) -> list[str]:
        files = [root / "bindings.cpp", root / "cpu" / "dora_cpu.cpp"]
        if self.with_cuda:
            files += [root / "cuda" / "cuda_ops.cpp", *sorted((root / "cuda").glob("*.cu"))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise OpLoadError(
                f"extension sources not found ({', '.join(missing)}): reinstall dora-engine, or build the op "
                "ahead of time with DORA_BUILD_OPS=1"
            )
        return [str(f) for f in files]

    def include_dirs(self, root: Path = CSRC) -> list[str]:
        return [str(root / "include"), str(root / "cpu"), str(root / "cuda")]

    def headers(self, root: Path = CSRC) -> list[str]:
        """Every header in the include directories (the build may read any of them)."""
        return sorted(
            str(path) for d in self.include_dirs(root) for path in Path(d).glob("*") if path.suffix in HEADER_SUFFIXES
        )

    def source_digest(self, root: Path = CSRC) -> str:
        """sha256 of the sources and headers: their paths below ``root`` and their bytes."""
        digest = hashlib.sha256()
        for file in sorted({*self.sources(root), *self.headers(root)}):
            relative = Path(file).relative_to(root).as_posix()
            content = Path(file).read_bytes()
            digest.update(f"{relative}\0{len(content)}\0".encode())
            digest.update(content)
        return digest.hexdigest()

    # Flags ----------------------------------------------------------------------------------------

    def cxx_flags(self, *, native: bool) -> list[str]:
        """Host flags; ``native`` tunes for this machine (the just-in-time build, never a shipped binary)."""
        flags = ["-O3", "-fopenmp-simd"]
        if native:
            flags.append("-march=native")
        if self.with_cuda:
            flags.append("-DDORA_WITH_CUDA")
        return flags

    def nvcc_flags(self, *, native: bool) -> list[str]:
        return ["-O3", "-DDORA_WITH_CUDA", *self.cuda_arch_flags(native=native)]

    def compile_args(self, *, native: bool) -> dict[str, list[str]]:
        """The flags by compiler (``cxx``, and ``nvcc`` with CUDA), as setuptools' ``extra_compile_args``;
        ``native``: for this machine (its CPU, its GPUs)."""
        args = {"cxx": self.cxx_flags(native=native)}
        if self.with_cuda:
            args["nvcc"] = self.nvcc_flags(native=native)
        return args

    # Records and names ----------------------------------------------------------------------------

    def record(self, root: Path = CSRC, *, native: bool) -> BuildRecord:
        """The record of a build of the sources in ``root``; ``native``: the just-in-time build, for this machine.

        The native build's hash also covers where the sources are (the compile commands name them, so two
        checkouts sharing a build directory would rebuild over each other) and the CPU's instruction set
        (``-march=native`` is the same text on every CPU, the code it gives is not).
        """
        sources = self.source_digest(root)
        flags = self.compile_args(native=native)
        identity = {
            "sources": sources, "flags": flags, "cuda_kernels": self.with_cuda,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "place": str(root.resolve()) if native else None, "isa": cpu_isa_key() if native else None,
        }
        build_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        return BuildRecord(
            torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_kernels=self.with_cuda,
            cuda_archs=self.cuda_archs(native=native) if self.with_cuda else [], sources=sources, hash=build_hash,
            flags=flags,
        )

    def aot_record(self, root: Path = Path("csrc")) -> BuildRecord:
        """The record of ``extension()``, which setup.py writes next to the library."""
        return self.record(root, native=False)

    def jit_record(self, root: Path = CSRC) -> BuildRecord:
        """The record of the just-in-time build of the sources in ``root``."""
        return self.record(root, native=True)

    @property
    def name(self) -> str:
        """The just-in-time build's name, e.g. ``dora_engine_ops_cpu_1a2b3c4d5e``."""
        return self.jit_name(self.jit_record())

    def jit_name(self, record: BuildRecord) -> str:
        return f"dora_engine_ops_{'cuda' if self.with_cuda else 'cpu'}_{record.hash}"

    # Building -------------------------------------------------------------------------------------

    def jit_load(self, verbose: bool = False) -> str:
        """Compile (or reuse the cached build) and load the library; returns its path.

        Holds the build directory's ``build_lock`` meanwhile, and says on stderr when it compiles.
        """
        from torch.utils.cpp_extension import _get_build_directory, load

        record = self.jit_record()
        name = self.jit_name(record)
        build_dir = Path(_get_build_directory(name, verbose=False))
        library = build_dir / f"{name}.so"
        try:
            with build_lock(build_dir):
                if not library.exists():
                    kernels = f"CUDA kernels for {', '.join(record.cuda_archs)}" if self.with_cuda else "CPU kernels"
                    _say(f"building the fused op ({kernels}) just in time in {build_dir}; this takes minutes "
                         "once, later runs reuse it")
                load(
                    name=name, sources=self.sources(), extra_include_paths=self.include_dirs(),
                    extra_cflags=record.flags["cxx"], extra_cuda_cflags=record.flags.get("nvcc"),
                    is_python_module=False, verbose=verbose,
                )
        except Exception as err:
            raise OpLoadError(f"just-in-time build of {name} failed: {err}") from err
        return str(library)

    def extension(self):
        """The setuptools extension of the ahead-of-time build (sources relative to the project root)."""
        from torch.utils.cpp_extension import CppExtension, CUDAExtension

        root = Path("csrc")
        make = CUDAExtension if self.with_cuda else CppExtension
        return make(
            AOT_MODULE,
            sources=self.sources(root),
            include_dirs=[str(Path(d).resolve()) for d in self.include_dirs(root)],
            extra_compile_args=self.compile_args(native=False),
        )


# --------------------------------------------------------------------------------------------------
# The just-in-time cache: instruction-set key and build lock
# --------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"dora_engine: {message}", file=sys.stderr, flush=True)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's instruction-set features: the ``flags`` (x86) or ``Features`` (Arm) line of ``cpuinfo``,
    else the machine and processor names (no /proc)."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return " ".join(sorted(value.split()))
    return f"{platform.machine()} {platform.processor()}"


def cpu_isa_key() -> str:
    """8 hex digits of ``cpu_features``: the instruction set ``-march=native`` compiles for."""
    return hashlib.sha256(cpu_features().encode()).hexdigest()[:8]


#: The lock file torch's ``cpp_extension`` creates in a build directory while it builds (and never removes
#: when the build is killed), and ours beside it.
TORCH_LOCK = "lock"
BUILD_LOCK = "dora_build.lock"


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build directory's advisory lock (``flock``, released by the kernel when its holder dies).

    Every just-in-time load takes it around torch's build, so while it is held no other process of this
    package builds here: a torch ``lock`` file found then was left by a killed build, and is removed
    (torch would wait for it forever). A process that finds the lock held waits, and says whose it is once
    it has waited ``QUIET_WAIT_S``.
    Where the file system has no ``flock`` (some network mounts), torch's lock alone serialises builds and
    a leftover one is reported, not removed.
    """
    path = build_dir / BUILD_LOCK
    with open(path, "a+") as handle:
        try:
            _acquire(handle, path)
        except OSError as err:
            _report_torch_lock(build_dir, f"no lock on this file system ({err})")
            yield
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{platform.node()} {os.getpid()}\n")
            handle.flush()
            _remove_stale_torch_lock(build_dir)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Seconds a process waits for the build lock before it says whom it waits for (ranks starting together
#: take it in turn for a moment even when the build is cached).
QUIET_WAIT_S = 3.0


def _acquire(handle: IO[str], path: Path) -> None:
    waited_until = time.monotonic() + QUIET_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= waited_until:
                break
            time.sleep(0.1)
    handle.seek(0)
    owner = handle.read().strip() or "another process"
    _say(f"waiting for {owner} (host, pid), which is building the fused op here ({path})")
    fcntl.flock(handle, fcntl.LOCK_EX)


def _builders_in(build_dir: Path) -> list[int]:
    """Pids of the processes working in ``build_dir`` (torch runs ninja and the compilers there)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cwd"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]) == build_dir:
            pids.append(proc.info["pid"])
    return pids


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """Remove torch's lock in ``build_dir`` unless some process (one that does not take our lock, such as
    another program's DeepSpeed) is building there now."""
    stale = build_dir / TORCH_LOCK
    if not stale.exists():
        return
    builders = _builders_in(build_dir.resolve())
    if builders:
        _say(f"waiting for pid {builders[0]}, which is building in {build_dir} ({stale})")
        return
    stale.unlink(missing_ok=True)
    _say(f"removed {stale}, left by a build that was killed; building again")


def _report_torch_lock(build_dir: Path, why: str) -> None:
    leftover = build_dir / TORCH_LOCK
    if leftover.exists():
        _say(f"{leftover} exists and cannot be checked: {why}. If no process is building the op, a killed "
             f"build left it and the build waits forever: remove it (rm {leftover})")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def aot_library_path() -> str | None:
    """Path of the ahead-of-time build, or None when the package was installed without one."""
    spec = importlib.util.find_spec(AOT_MODULE)
    return spec.origin if spec is not None else None


_state = SimpleNamespace(ops=None, source=None, build=None, failure=None, device_types=frozenset())


def _load_aot(library: str, reasons: list[str]) -> BuildRecord | None:
    """Load the ahead-of-time ``library`` when its record fits; its record, or None (``reasons`` says why)."""
    record, found = check_aot(library)
    if found:
        reasons.append(f"the ahead-of-time build {library} does not match this environment "
                       f"({'; '.join(found)}): {REBUILD_HINT}")
        warnings.warn(f"dora_engine: the ahead-of-time build {library} does not match this environment "
                      f"({'; '.join(found)}); building the op just in time instead. To use an ahead-of-time "
                      f"build, {REBUILD_HINT}.", RuntimeWarning, stacklevel=4)
        return None
    try:
        torch.ops.load_library(library)
    except Exception as err:
        reasons.append(f"ahead-of-time build {library} does not load ({err})")
        return None
    return record


def _load_library(verbose: bool) -> tuple[str, BuildRecord]:
    """Load the ahead-of-time build when it fits this process, else the just-in-time one: (whence, record)."""
    reasons: list[str] = []
    aot = aot_library_path()
    if aot is not None:
        record = _load_aot(aot, reasons)
        if record is not None:
            return f"ahead-of-time build {aot}", record
    builder = OpBuilder()
    try:
        path = builder.jit_load(verbose=verbose)
        return f"just-in-time build {path}", builder.jit_record()
    except Exception as err:
        raise OpLoadError("; ".join([*reasons, str(err)])) from err


def load_ops(verbose: bool = False) -> Any:
    """``torch.ops.dora_engine`` with the kernels loaded: the ahead-of-time build, else the JIT build.

    Loaded once per process; a failure is remembered and raised again as ``OpLoadError``, as is an
    extension whose contract (codes, parameter counts, in-place rule) disagrees with the registry
    (``ops/contract.py``).
    """
    if _state.ops is not None:
        return _state.ops
    if _state.failure is not None:
        raise OpLoadError(_state.failure)
    from dora_engine.ops.contract import contract_problems

    try:
        _state.source, _state.build = _load_library(verbose)
        problems = contract_problems(getattr(torch.ops, OPS_NAMESPACE))
        if problems:
            raise OpLoadError(f"the {_state.source} disagrees with dora_engine/losses.py: {'; '.join(problems)}")
    except OpLoadError as err:
        _state.failure = str(err)
        raise
    _state.ops = getattr(torch.ops, OPS_NAMESPACE)
    _state.device_types = kernel_device_types()
    from dora_engine.ops import fake_kernels  # noqa: F401  (registers the meta kernels once the ops exist)

    return _state.ops


def loaded_from() -> str | None:
    """Where the loaded extension came from (None before ``load_ops`` succeeded)."""
    return _state.source


def loaded_build() -> BuildRecord | None:
    """The build record of the loaded extension (None before ``load_ops`` succeeded)."""
    return _state.build


def has_kernel(backend: str) -> bool:
    """Whether the loaded extension registered its kernels for ``"CPU"`` or ``"CUDA"``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{OPS_NAMESPACE}::seq_logprobs_fwd", backend)


#: Device types the extension can have kernels for, by their dispatch key.
KERNEL_DEVICES = {"cpu": "CPU", "cuda": "CUDA"}


def kernel_device_types() -> frozenset[str]:
    """Device types the loaded extension has kernels for ("meta" always: the fake kernels)."""
    return frozenset({"meta"} | {device for device, key in KERNEL_DEVICES.items() if has_kernel(key)})


def check_kernels_for(t: torch.Tensor) -> None:
    """The loaded extension has kernels for the device of ``t``; else ``OpLoadError`` saying what is missing
    and how to get it (CUDA kernels are optional in a build). Reads a set made at load time, so it traces
    under torch.compile."""
    device = t.device.type
    if device in _state.device_types:
        return
    if device != "cuda":
        served = sorted(_state.device_types & KERNEL_DEVICES.keys())
        raise OpLoadError(f"the dora_engine extension has no kernels for {device} tensors (only for "
                          f"{', '.join(served) or 'no device'}); use backend='reference'")
    raise OpLoadError(
        f"the dora_engine extension ({_state.source}) has no CUDA kernels: when it was built, "
        f"{'torch had no CUDA' if torch.version.cuda is None else 'nvcc was not found'}. Install the CUDA "
        f"toolkit of torch's CUDA ({torch.version.cuda}) so that nvcc is on PATH or in CUDA_HOME and start again "
        "(the just-in-time build then compiles them), or use backend='reference'; `dora-engine report` shows "
        "the toolchain"
    )
