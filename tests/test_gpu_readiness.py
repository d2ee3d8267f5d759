"""What a first GPU run depends on, checked on CPU by simulating the GPU side (docs/design.md sections 5.1, 5.6
and 6): an extension without kernels for the inputs' device (``auto`` falls back, ``fused`` says what is
missing, ``dora-engine report`` fails), the probe of torch's mixed-dtype addmm, and ``precision: auto``."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from test_op_front_door import batch

from dora_engine import ops
from dora_engine.cli import main
from dora_engine.ops import builder, fused_linear
from dora_engine.ops.builder import OpLoadError, check_kernels_for
from dora_engine.training import dsconfig


@pytest.fixture
def fresh_fallback_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_fallback_warned", False)


@pytest.fixture
def no_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaded extension as if it had no kernels for CPU tensors, the way a build without CUDA kernels
    has none for CUDA tensors (``check_kernels_for`` reads the set made at load)."""
    builder.load_ops()
    monkeypatch.setattr(builder._state, "device_types", frozenset({"meta", "cuda"}))


# ------------------------------------------------------------------------------------------------------
# An extension without kernels for the inputs' device
# ------------------------------------------------------------------------------------------------------


def test_auto_falls_back_once_when_the_extension_lacks_the_device_kernels(no_cpu_kernels, fresh_fallback_warning):
    inputs = batch()
    want = ops.dora_loss(**inputs, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = ops.dora_loss(**inputs, backend="auto")
            torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)  # the reference itself
        hidden, weight = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(23, 4, dtype=torch.float64)
        ops.sequence_logprobs_linear(hidden, weight, inputs["labels"], backend="auto")
    fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(fallbacks) == 1
    assert "no kernels for cpu tensors (only for cuda)" in str(fallbacks[0].message)
    assert "using the PyTorch reference" in str(fallbacks[0].message)


def test_forced_fused_backend_says_what_is_missing(no_cpu_kernels):
    with pytest.raises(OpLoadError, match="no kernels for cpu tensors .*backend='reference'"):
        ops.dora_loss(**batch(), backend="fused")
    inputs = batch()
    hidden, weight = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(23, 4, dtype=torch.float64)
    with pytest.raises(OpLoadError, match="no kernels for cpu tensors"):
        ops.dora_loss_linear(hidden, weight, inputs.pop("labels"), **{k: v for k, v in inputs.items() if k != "logits"},
                             backend="fused")


def test_cuda_tensors_on_a_build_without_cuda_kernels_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    builder.load_ops()
    monkeypatch.setattr(builder._state, "device_types", frozenset({"meta", "cpu"}))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    cuda_tensor = SimpleNamespace(device=torch.device("cuda", 0))  # only its device is read
    with pytest.raises(OpLoadError) as err:
        check_kernels_for(cuda_tensor)
    message = str(err.value)
    assert "has no CUDA kernels" in message and "nvcc was not found" in message
    assert "CUDA toolkit of torch's CUDA (12.8)" in message and "backend='reference'" in message
    assert builder.kernel_device_types() == {"meta", "cpu"}  # what this CPU build registered


def test_report_fails_when_a_gpu_is_visible_and_no_cuda_kernels_were_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    builder.load_ops()
    assert not builder.has_kernel("CUDA")  # this machine's build, as on a CUDA torch without nvcc
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    assert main(["report"]) == 1
    out = capsys.readouterr().out
    assert "GPUs ......" in out and "NVIDIA H100 80GB HBM3" in out
    assert "CUDA kernels ......" in out and "NOT built, yet a GPU is visible" in out
    assert "CPU kernels ......" in out and "compatible (max rel. diff" in out


# ------------------------------------------------------------------------------------------------------
# torch.addmm(..., out_dtype=float32): probed, not assumed from the overload's existence
# ------------------------------------------------------------------------------------------------------

REAL_ADDMM = torch.addmm


def mixed_addmm(behaviour: str):
    """torch.addmm where the ``out_dtype`` form raises like torch 2.8/2.9's CUDA kernel ("raise"), returns
    wrong numbers ("wrong"), or works as an fp32-accumulating GEMM ("works"); every other call is torch's."""
    calls = []

    def addmm(acc, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return REAL_ADDMM(acc, a, b, out=out)
        calls.append(a.dtype)
        if behaviour == "raise":
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        product = a.float() @ b.float()
        return out.copy_(acc + (product if behaviour == "works" else 2 * product))

    return addmm, calls


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_linear, "_MIXED_ADDMM", {})


@pytest.mark.parametrize("behaviour, works", [("works", True), ("raise", False), ("wrong", False)])
def test_the_mixed_addmm_probe_runs_once_per_device_type_and_dtype(
    monkeypatch: pytest.MonkeyPatch, fresh_probe, behaviour: str, works: bool
) -> None:
    addmm, calls = mixed_addmm(behaviour)
    monkeypatch.setattr(torch, "addmm", addmm)
    cpu = torch.device("cpu")
    for _ in range(3):
        assert fused_linear.mixed_addmm_works(cpu, torch.bfloat16) is works
    assert calls == [torch.bfloat16]
    assert fused_linear.mixed_addmm_works(cpu, torch.float16) is works
    assert calls == [torch.bfloat16, torch.float16]


def test_the_probe_sees_this_torch_has_no_cpu_kernel(fresh_probe) -> None:
    """torch ≥ 2.8 has the overload but no CPU kernel for it: its existence alone would have been trusted."""
    assert "dtype_out" in torch.ops.aten.addmm.overloads()
    assert fused_linear.mixed_addmm_works(torch.device("cpu"), torch.bfloat16) is False


def test_the_fallback_gives_the_numbers_of_the_mixed_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 fused-linear loss and gradients where the mixed GEMM works and where it raises: the same up to bf16
    rounding of the per-chunk product, and both those of the reference."""
    from test_fused_linear import assert_same, make_problem, run

    hidden, weight, bias, labels, kw = make_problem(B=4, K=3, T=9, H=16, V=80, dtype=torch.bfloat16)
    results = {}
    for behaviour in ("works", "raise"):
        addmm, calls = mixed_addmm(behaviour)
        with monkeypatch.context() as patch:
            patch.setattr(fused_linear, "_MIXED_ADDMM", {})
            patch.setattr(torch, "addmm", addmm)
            results[behaviour] = [
                run(ops.dora_loss_linear, hidden, weight, bias, labels, mode=mode, chunk_bytes=4096,
                    backend="fused", **kw)
                for mode in ("single_pass", "recompute")
            ]
        # Probed once; then used for every chunk's weight gradient where it works, never tried again where not.
        assert len(calls) > 2 if behaviour == "works" else calls == [torch.bfloat16]
    want = run(ops.dora_loss_linear, hidden, weight, bias, labels, backend="reference", **kw)
    for mixed, fallback in zip(results["works"], results["raise"], strict=True):
        assert_same(*fallback, *mixed, rtol=2e-2, atol=2e-2)
        assert_same(*fallback, *want, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------------
# precision: auto
# ------------------------------------------------------------------------------------------------------


def fake_cuda(monkeypatch: pytest.MonkeyPatch, *, native: bool, emulated: bool, with_argument: bool,
              major: int = 7) -> None:
    """A visible GPU with bf16 ``native`` or ``emulated``, under a torch whose ``is_bf16_supported`` takes
    ``including_emulation`` or (older torch) no argument."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    if with_argument:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native or (including_emulation and emulated))
    else:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: native or emulated)


@pytest.mark.parametrize("with_argument", [True, False])
def test_auto_precision_is_fp32_on_gpus_that_only_emulate_bf16(monkeypatch: pytest.MonkeyPatch,
                                                                with_argument: bool) -> None:
    fake_cuda(monkeypatch, native=False, emulated=True, with_argument=with_argument, major=7)  # T4, V100
    assert dsconfig.resolve_precision("auto") == "fp32"
    assert dsconfig.resolve_precision("bf16") == "bf16"  # asked for explicitly: kept


@pytest.mark.parametrize("with_argument", [True, False])
def test_auto_precision_is_bf16_on_gpus_that_compute_in_it(monkeypatch: pytest.MonkeyPatch,
                                                            with_argument: bool) -> None:
    fake_cuda(monkeypatch, native=True, emulated=True, with_argument=with_argument, major=9)
    assert dsconfig.resolve_precision("auto") == "bf16"


def test_auto_precision_is_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dsconfig.resolve_precision("auto") == "fp32"
