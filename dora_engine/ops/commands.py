"""``dora-engine report``: the environment and the state of the fused op (docs/design.md section 6).

Prints torch/CUDA/DeepSpeed/transformers versions, the CUDA compiler, and for the extension: whether an
ahead-of-time build is installed, what its build record says it was built for and whether that matches
this environment, whether the op loads (building just in time when needed, and then what with), which
kernels it registered (CPU, CUDA), and whether each is compatible, i.e. gives the reference's loss and
gradient on a tiny batch. Exit code 0 when the op loads, every checked backend is compatible and a visible
GPU has CUDA kernels, else 1 (a build without CUDA kernels on a GPU machine would run every CUDA call on
the reference); with --no-build and no ahead-of-time build that fits, the op is not loaded, so the exit
code is 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import warnings
from typing import Any

WIDTH = 34


def _line(name: str, value: str) -> None:
    print(f"{name + ' ':.<{WIDTH}} {value}")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvcc_version(path: str | None) -> str:
    if path is None:
        return "not found"
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"{path} (does not run: {err})"
    match = re.search(r"release ([\d.]+)", text)
    return f"{path} (CUDA {match.group(1) if match else 'unknown'})"


def _build_lines(record: Any) -> None:
    """What a build (a ``builder.BuildRecord``) was made for and from."""
    _line("  built for torch", record.torch)
    _line("  built for torch CUDA", record.torch_cuda or "none (CPU build)")
    _line("  CUDA kernels", f"yes ({', '.join(record.cuda_archs)})" if record.cuda_kernels else "no")
    _line("  build hash", f"{record.hash} (sources sha256 {record.sources[:12]}…)")
    _line("  flags", "; ".join(f"{compiler}: {' '.join(flags)}" for compiler, flags in record.flags.items()))


def _aot_lines(library: str | None) -> bool:
    """The ahead-of-time build's lines; whether it fits this environment (False when there is none)."""
    from dora_engine.ops import builder

    _line("ahead-of-time build", library or "not installed (DORA_BUILD_OPS=1 pip install --no-build-isolation .)")
    if library is None:
        return False
    record, found = builder.check_aot(library)
    if record is not None:
        _build_lines(record)
    _line("  matches this environment", "yes" if not found else f"NO: {'; '.join(found)}")
    return not found


def self_check(device: str) -> float:
    """Largest relative difference between the fused op and the float64 reference on a tiny batch."""
    import torch

    from dora_engine import ops

    g = torch.Generator().manual_seed(0)
    B, K, T, V = 2, 3, 5, 131
    logits = torch.randn(B * K, T, V, generator=g)
    labels = torch.randint(0, V, (B * K, T), generator=g)
    labels[:, 0] = ops.IGNORE_INDEX
    kwargs: dict[str, Any] = dict(
        num_responses=K, scores=torch.randn(B, K, generator=g), h_tilde=torch.rand(B, generator=g) + 0.5,
        ref_logps=-torch.rand(B * K, generator=g) * 10, objective=ops.RobustObjective("dpo_pl", {}, "dora", 0.5),
    )
    results = []
    for backend, dtype in (("fused", torch.float32), ("reference", torch.float64)):
        z = logits.to(device=device, dtype=dtype).clone().requires_grad_(True)
        moved = {k: v.to(device=device, dtype=dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out = ops.dora_loss(z, labels.to(device), **moved, backend=backend)
        out.loss.backward()
        results.append((out.loss.detach().double().cpu(), z.grad.double().cpu()))
    (loss, grad), (loss_ref, grad_ref) = results
    return max(
        (abs(loss - loss_ref) / abs(loss_ref)).item(),
        ((grad - grad_ref).abs().max() / grad_ref.abs().max()).item(),
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from dora_engine import __version__
    from dora_engine.ops import builder

    print("dora-engine environment report")
    _line("dora-engine", __version__)
    _line("torch", f"{torch.__version__} ({torch.__file__.rsplit('/', 2)[0]})")
    _line("torch CUDA", torch.version.cuda or "none (CPU build)")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    _line("GPUs", ", ".join(gpus) or "none visible")
    _line("deepspeed", _package_version("deepspeed"))
    _line("transformers", _package_version("transformers"))
    _line("nvcc", _nvcc_version(builder.OpBuilder.nvcc_path()))
    from torch.utils.cpp_extension import is_ninja_available

    _line("ninja", "available" if is_ninja_available() else "not found (just-in-time builds need it)")
    _line("CUDA kernels buildable", "yes" if builder.OpBuilder.cuda_toolkit_available() else "no (torch CUDA + nvcc)")
    aot_fits = _aot_lines(builder.aot_library_path())
    if args.no_build and not aot_fits:
        _line("op", "not loaded (--no-build): not checked")
        return 1
    try:
        with warnings.catch_warnings():  # a mismatching ahead-of-time build is reported above
            warnings.simplefilter("ignore", RuntimeWarning)
            builder.load_ops(verbose=args.verbose)
    except builder.OpLoadError as err:
        _line("op loads", f"NO: {err}")
        return 1
    _line("op loads", f"yes, {builder.loaded_from()}")
    if not aot_fits and builder.loaded_build() is not None:
        _build_lines(builder.loaded_build())
    healthy = True
    for backend, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        if not builder.has_kernel(backend):
            if device == "cuda" and torch.cuda.is_available():
                _line(f"{backend} kernels", "NOT built, yet a GPU is visible: install the CUDA toolkit of torch's "
                      f"CUDA ({torch.version.cuda}) so that nvcc is found, then run this report again")
                healthy = False
            else:
                _line(f"{backend} kernels", "not built")
            continue
        if device == "cuda" and not torch.cuda.is_available():
            _line(f"{backend} kernels", "built; no GPU visible to check them")
            continue
        try:
            error = self_check(device)
        except Exception as err:  # report any failure of the kernels rather than crash the report
            _line(f"{backend} kernels", f"built, INCOMPATIBLE: {err}")
            healthy = False
            continue
        ok = error < 1e-4
        healthy &= ok
        _line(f"{backend} kernels", f"built, {'compatible' if ok else 'INCOMPATIBLE'} (max rel. diff {error:.1e})")
    return 0 if healthy else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="versions, and whether the fused op is built, loadable and compatible",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--no-build", action="store_true",
                        help="do not build the op just in time: without an ahead-of-time build that fits this "
                             "environment the op is not loaded nor checked, and the exit code is 1")
    parser.add_argument("--verbose", action="store_true", help="show the compiler output of a just-in-time build")
    parser.set_defaults(func=run)
