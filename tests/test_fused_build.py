"""Building and reporting the fused op: builder flags and sources, build records and the choice between
the ahead-of-time and the just-in-time build, the just-in-time build's name, and `dora-engine report`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dora_engine.cli import main
from dora_engine.ops import builder
from dora_engine.ops.builder import BuildRecord, OpBuilder, OpLoadError, Runtime, arch_covers, mismatches


def test_arch_flags_follow_torch_cuda_arch_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert OpBuilder.cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_sources_by_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cpu = OpBuilder(with_cuda=False)
    cuda = OpBuilder(with_cuda=True)
    assert not any(s.endswith((".cu", "cuda_ops.cpp")) for s in cpu.sources())
    assert any(s.endswith(".cu") for s in cuda.sources()) and any(s.endswith("cuda_ops.cpp") for s in cuda.sources())
    assert "-DDORA_WITH_CUDA" in cuda.cxx_flags(native=False) and "-DDORA_WITH_CUDA" not in cpu.cxx_flags(native=False)
    assert "-march=native" not in cpu.cxx_flags(native=False)  # shipped binaries stay portable
    assert cpu.name != cuda.name  # separate just-in-time caches


def test_missing_sources_say_why(tmp_path) -> None:
    with pytest.raises(OpLoadError, match="extension sources not found .* DORA_BUILD_OPS=1"):
        OpBuilder(with_cuda=False).sources(tmp_path)


def test_report_without_deepspeed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed ......" in out and "not installed" in out
    assert "op loads ......" in out and "yes," in out
    if "just-in-time build" in out:  # what it was built with
        assert re.search(rf"build hash \.+ {builder.loaded_build().hash} ", out)
    assert "CPU kernels ......" in out and "compatible (max rel. diff" in out and "INCOMPATIBLE" not in out
    assert builder.has_kernel("CPU")


# ------------------------------------------------------------------------------------------------------
# Build records and the choice of library
# ------------------------------------------------------------------------------------------------------

RUNTIME = Runtime(torch="2.13.0", torch_cuda="12.8", gpus=(("NVIDIA H200", (9, 0)),), sources="abc")
RECORD = BuildRecord(
    torch="2.13.0", torch_cuda="12.8", cuda_kernels=True, cuda_archs=["8.0", "9.0"], sources="abc",
    hash="0123456789", flags={"cxx": ["-O3"], "nvcc": ["-O3"]},
)


@pytest.mark.parametrize(
    "arch, capability, covered",
    [
        ("9.0", (9, 0), True), ("8.0", (8, 6), True), ("8.6", (8, 0), False), ("8.0", (9, 0), False),
        ("8.0+PTX", (9, 0), True), ("9.0+PTX", (8, 0), False), ("9.0a", (9, 0), True), ("9.0a", (10, 0), False),
        ("Ampere", (8, 0), False),
    ],
)
def test_arch_covers(arch: str, capability: tuple[int, int], covered: bool) -> None:
    assert arch_covers(arch, capability) is covered


def test_record_round_trip_and_bad_records() -> None:
    assert BuildRecord.from_json(RECORD.to_json()) == RECORD
    for text in ("not json", "[]", '{"format": 1}', RECORD.to_json().replace('"format": 1', '"format": 99')):
        with pytest.raises(ValueError):
            BuildRecord.from_json(text)

NO_KERNELS = {"cuda_kernels": False, "cuda_archs": []}


@pytest.mark.parametrize(
    "change, runtime_change, expected",
    [
        ({}, {}, []),
        ({"torch": "2.12.0"}, {}, ["built for torch 2.12.0, running 2.13.0"]),
        ({"torch_cuda": "12.4"}, {}, ["built for torch with CUDA 12.4, running torch with CUDA 12.8"]),
        ({}, {"torch_cuda": None, "gpus": ()}, ["built for torch with CUDA 12.8, running torch with no CUDA"]),
        ({"cuda_archs": ["8.0"]}, {}, ["built for CUDA architectures 8.0, not for GPU NVIDIA H200 (9.0)"]),
        ({"cuda_archs": ["8.0+PTX"]}, {}, []),
        (NO_KERNELS, {}, ["built without CUDA kernels, running with GPU NVIDIA H200 (9.0)"]),
        (NO_KERNELS, {"gpus": ()}, []),
        ({"sources": "def"}, {}, ["built from other sources than the package's csrc/ holds now"]),
        ({"sources": "def"}, {"sources": None}, []),  # no sources shipped: nothing to compare
    ],
)
def test_mismatches_say_what_differs(change: dict, runtime_change: dict, expected: list[str]) -> None:
    record = dataclasses.replace(RECORD, **change)
    assert mismatches(record, dataclasses.replace(RUNTIME, **runtime_change)) == expected


def test_missing_record_is_a_mismatch() -> None:
    assert mismatches(None, RUNTIME) == [
        "it has no build record (_ops_build.json): it was built by an older dora-engine"
    ]


@pytest.fixture
def fake_aot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A dummy ahead-of-time library (never loaded) where the package looks for one, and a fresh load state."""
    library = tmp_path / "_ops.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"not a library")
    monkeypatch.setattr(builder, "aot_library_path", lambda: str(library))
    monkeypatch.setattr(builder, "_state", SimpleNamespace(ops=None, source=None, build=None, failure=None,
                                                           device_types=frozenset()))

    def load_library(path: str) -> None:
        raise AssertionError(f"a mismatching library was loaded: {path}")

    monkeypatch.setattr(torch.ops, "load_library", load_library)
    return library


def write_current_record(library: Path, **change) -> BuildRecord:
    """The record of a CPU build matching this process, with ``change``."""
    record = dataclasses.replace(OpBuilder(with_cuda=False).aot_record(builder.CSRC), **change)
    builder.write_record(library, record)
    return record


def test_record_with_other_torch_falls_back_to_jit(fake_aot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_current_record(fake_aot, torch="2.12.0")
    record, found = builder.check_aot(str(fake_aot))
    assert record is not None and found == [f"built for torch 2.12.0, running {torch.__version__}"]
    jit = OpBuilder(with_cuda=False).jit_record()
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=False: "/cache/jit.so")
    monkeypatch.setattr(OpBuilder, "jit_record", lambda self: jit)
    with pytest.warns(RuntimeWarning, match=rf"built for torch 2\.12\.0, running {re.escape(torch.__version__)}"):
        assert builder._load_library(verbose=False) == ("just-in-time build /cache/jit.so", jit)


def test_mismatch_without_jit_says_how_to_fix(fake_aot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_current_record(fake_aot, torch="2.12.0")

    def no_compiler(self, verbose: bool = False) -> str:
        raise OpLoadError("just-in-time build of dora_engine_ops_cpu failed: no C++ compiler")

    monkeypatch.setattr(OpBuilder, "jit_load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the failure is remembered: one warning
            with pytest.raises(OpLoadError) as err:
                builder.load_ops()
            message = str(err.value)
            assert f"built for torch 2.12.0, running {torch.__version__}" in message
            assert "DORA_BUILD_OPS=1 pip install --no-build-isolation ." in message and "no C++ compiler" in message
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_library_without_record_is_not_loaded(fake_aot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=False: "/cache/jit.so")
    with pytest.warns(RuntimeWarning, match="no build record .* older dora-engine"):
        assert builder._load_library(verbose=False)[0] == "just-in-time build /cache/jit.so"
    (fake_aot.parent / builder.RECORD_NAME).write_text("{garbled")
    with pytest.warns(RuntimeWarning, match="build record .* is unreadable"):
        builder._load_library(verbose=False)


def test_matching_record_loads_the_aot_library(fake_aot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = write_current_record(fake_aot)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert builder._load_library(verbose=False) == (f"ahead-of-time build {fake_aot}", record)
    assert loaded == [str(fake_aot)]


def test_report_shows_the_record(fake_aot: Path, capsys: pytest.CaptureFixture) -> None:
    write_current_record(fake_aot, torch="2.12.0")
    assert main(["report", "--no-build"]) == 1  # the op was not loaded: 0 would claim it works
    out = capsys.readouterr().out
    assert "built for torch ....." in out and " 2.12.0\n" in out and "CUDA kernels ....." in out
    assert f"matches this environment ....... NO: built for torch 2.12.0, running {torch.__version__}" in out
    assert "not loaded (--no-build)" in out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "the exit code is 1" in " ".join(capsys.readouterr().out.split())  # the help says what happens


# ------------------------------------------------------------------------------------------------------
# The just-in-time build's name
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def csrc_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(builder.CSRC, tmp_path / "csrc"))


def jit_name(root: Path, ops: OpBuilder | None = None) -> str:
    ops = ops or OpBuilder(with_cuda=False)
    return ops.jit_name(ops.jit_record(root))


def test_jit_name_is_stable(csrc_copy: Path) -> None:
    name = jit_name(csrc_copy)
    assert re.fullmatch(r"dora_engine_ops_cpu_[0-9a-f]{10}", name)
    assert jit_name(csrc_copy) == name
    (csrc_copy / "bindings.cpp").touch()  # the time stamp is not the content
    assert jit_name(csrc_copy) == name


@pytest.mark.parametrize("file", ["bindings.cpp", "cpu/dora_cpu.cpp", "include/dora_math.h", "cpu/vec_exp.h"])
def test_jit_name_follows_every_file_the_build_reads(csrc_copy: Path, file: str) -> None:
    before = jit_name(csrc_copy)
    path = csrc_copy / file
    original = path.read_bytes()
    path.write_bytes(original + b" ")
    assert jit_name(csrc_copy) != before
    path.write_bytes(original)
    assert jit_name(csrc_copy) == before


def test_jit_name_follows_flags_torch_and_place(
    csrc_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = jit_name(csrc_copy)
    other_place = Path(shutil.copytree(csrc_copy, tmp_path / "other" / "csrc"))
    assert jit_name(other_place) != before  # two checkouts never share a build directory
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert jit_name(csrc_copy, OpBuilder(with_cuda=True)).startswith("dora_engine_ops_cuda_")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "0.0.0")
        assert jit_name(csrc_copy) != before
    with monkeypatch.context() as patch:
        patch.setattr(OpBuilder, "cxx_flags", lambda self, native: ["-O2"])
        assert jit_name(csrc_copy) != before
    assert jit_name(csrc_copy) == before


def test_aot_hash_ignores_the_place(csrc_copy: Path, tmp_path: Path) -> None:
    other_place = Path(shutil.copytree(csrc_copy, tmp_path / "other" / "csrc"))
    ops = OpBuilder(with_cuda=False)
    assert ops.aot_record(csrc_copy) == ops.aot_record(other_place)
    assert ops.aot_record(csrc_copy).sources == ops.jit_record(csrc_copy).sources


def test_jit_name_follows_the_cpu_instruction_set(csrc_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-march=native is the same text on every CPU: a cache on a shared home must not serve an older CPU."""
    monkeypatch.setattr(builder, "cpu_features", lambda: "avx avx2 fma sse4_2")
    older = jit_name(csrc_copy)
    aot = OpBuilder(with_cuda=False).aot_record(csrc_copy)
    monkeypatch.setattr(builder, "cpu_features", lambda: "avx avx2 avx512bw avx512f fma sse4_2")
    assert jit_name(csrc_copy) != older
    assert OpBuilder(with_cuda=False).aot_record(csrc_copy) == aot  # a shipped build is portable: no key


def test_cpu_features_of_x86_and_arm(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: sse2 avx2 fma\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t: x\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert builder.cpu_features(x86) == "avx2 fma sse2"
    assert builder.cpu_features(arm) == "asimd fp sve"
    assert builder.cpu_features(tmp_path / "absent")  # no /proc: the machine's names, still a key


# ------------------------------------------------------------------------------------------------------
# CUDA architectures of the just-in-time build
# ------------------------------------------------------------------------------------------------------


def visible_gpus(monkeypatch: pytest.MonkeyPatch, *capabilities: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capabilities[index])


@pytest.mark.parametrize(
    "listed, jit_archs",
    [
        ("8.0;9.0", ["8.0", "9.0", "10.0"]),  # a B200 that the list misses gets its own code; 8.0 runs on 8.6
        ("8.0;9.0+PTX", ["8.0", "9.0+PTX"]),  # PTX runs on later GPUs
        ("", ["8.6", "10.0"]),  # no list: the visible GPUs
        ("7.0;8.6", ["7.0", "8.6", "10.0"]),
    ],
)
def test_jit_build_covers_every_visible_gpu(
    monkeypatch: pytest.MonkeyPatch, csrc_copy: Path, listed: str, jit_archs: list[str]
) -> None:
    visible_gpus(monkeypatch, (10, 0), (8, 6))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)
    ops = OpBuilder(with_cuda=True)
    jit = ops.jit_record(csrc_copy)
    assert jit.cuda_archs == jit_archs
    assert jit.flags["nvcc"][2:] == builder.gencode_flags(jit_archs)
    gpus = (("NVIDIA B200", (10, 0)), ("NVIDIA A10", (8, 6)))
    assert mismatches(jit, Runtime(torch=jit.torch, torch_cuda=jit.torch_cuda, gpus=gpus)) == []
    if listed:  # the ahead-of-time build is for the list: the load-time check covers it (mismatches)
        assert ops.aot_record(csrc_copy).cuda_archs == listed.split(";")


# ------------------------------------------------------------------------------------------------------
# The just-in-time build's lock and its message
# ------------------------------------------------------------------------------------------------------


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A build killed midway leaves torch's lock file, on which torch would wait forever; the build lock
    (flock) died with its holder, which shows the file is stale."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"f = open({str(tmp_path / builder.BUILD_LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write(f'node {os.getpid()}\\n'); f.flush()\n"
            f"open({str(tmp_path / builder.TORCH_LOCK)!r}, 'w').close()\n"
            "print('building', flush=True); time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline() == "building\n"
    holder.kill()
    holder.wait()
    assert (tmp_path / builder.TORCH_LOCK).exists()
    with builder.build_lock(tmp_path):
        assert not (tmp_path / builder.TORCH_LOCK).exists()
    err = capfd.readouterr().err
    assert f"removed {tmp_path / builder.TORCH_LOCK}, left by a build that was killed" in err


def test_a_live_build_is_waited_for_and_its_lock_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import fcntl
    import threading

    monkeypatch.setattr(builder, "QUIET_WAIT_S", 0.0)

    with open(tmp_path / builder.BUILD_LOCK, "a+") as other:  # another process's build, in progress
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("gpu-node-3 4242\n")
        other.flush()
        (tmp_path / builder.TORCH_LOCK).touch()
        entered = threading.Event()

        def load() -> None:
            with builder.build_lock(tmp_path):
                entered.set()

        waiter = threading.Thread(target=load)
        waiter.start()
        assert not entered.wait(0.5)  # it waits for the other build
        assert (tmp_path / builder.TORCH_LOCK).exists()  # whose torch lock is live: untouched
        (tmp_path / builder.TORCH_LOCK).unlink()  # the other build ends the way torch's does
        fcntl.flock(other, fcntl.LOCK_UN)
        waiter.join(10)
    assert entered.is_set()
    err = capfd.readouterr().err
    assert "waiting for gpu-node-3 4242 (host, pid), which is building the fused op here" in err
    assert "removed" not in err


def test_a_short_wait_is_silent(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Ranks starting together take the lock in turn even when the build is cached: no message for that."""
    import fcntl
    import threading

    with open(tmp_path / builder.BUILD_LOCK, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        def load() -> None:
            with builder.build_lock(tmp_path):
                pass

        waiter = threading.Thread(target=load)
        waiter.start()
        waiter.join(0.3)
        fcntl.flock(other, fcntl.LOCK_UN)
        waiter.join(10)
    assert not waiter.is_alive()
    assert capfd.readouterr().err == ""


def test_without_flock_a_leftover_lock_is_reported_not_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import errno
    import fcntl

    def no_locks(handle, operation) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / builder.TORCH_LOCK).touch()
    with builder.build_lock(tmp_path):
        pass
    assert (tmp_path / builder.TORCH_LOCK).exists()
    err = capfd.readouterr().err
    assert "cannot be checked: no lock on this file system" in err and f"rm {tmp_path / builder.TORCH_LOCK}" in err


def test_jit_load_says_when_it_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    from torch.utils import cpp_extension

    ops = OpBuilder(with_cuda=False)
    name = ops.name
    built = []

    def load(name: str, **options) -> None:
        assert (tmp_path / builder.BUILD_LOCK).exists() and not (tmp_path / builder.TORCH_LOCK).exists()
        built.append(name)
        (tmp_path / f"{name}.so").touch()

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    (tmp_path / builder.TORCH_LOCK).touch()  # a killed earlier build's
    assert ops.jit_load() == str(tmp_path / f"{name}.so")
    err = capfd.readouterr().err
    assert f"building the fused op (CPU kernels) just in time in {tmp_path}; this takes minutes once" in err
    assert ops.jit_load() == str(tmp_path / f"{name}.so")
    assert capfd.readouterr().err == ""  # built: reused silently (torch's load still checks it is current)
    assert built == [name, name]
