"""Building and reporting the fused op: builder flags and sources, and `dora-engine report`."""

from __future__ import annotations

import importlib.metadata

import pytest

from dora_engine.cli import main
from dora_engine.ops import builder
from dora_engine.ops.builder import OpBuilder, OpLoadError


def test_arch_flags_follow_torch_cuda_arch_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert OpBuilder.cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_sources_by_backend() -> None:
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
    assert "CPU kernels ......" in out and "compatible (max rel. diff" in out and "INCOMPATIBLE" not in out
    assert builder.has_kernel("CPU")
