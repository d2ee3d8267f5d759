"""Every CUDA kernel of the op once, on small inputs: the workload of the compute-sanitizer steps of gpu_check.sh.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/kernel_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 benchmarks/kernel_smoke.py

Covers the row passes (forward with its merge kernel, backward into a new buffer and in place) in every dtype,
on contiguous logits and on an unaligned shifted view (heads and tails of 16-byte packs, strided rows), on a
few long rows that the launcher splits over several blocks, with ignored and unchecked out-of-range labels;
the per-batch stage kernels (prompt_loss, robust_reduce, batch_stage) in fp32 and fp64; rescale_ with a
factor of 1 (skipped on the device) and another. Exits 0 when every result is as expected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dora_engine.losses import LOSSES, STRATEGIES, encode_params, resolve_params  # noqa: E402
from dora_engine.ops.builder import load_ops  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def row_cases(dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for name, (N, T, V) in {"short rows": (2, 3, 1003), "split rows": (1, 2, 70_000)}.items():
        flat = torch.randn(N * (T + 1) * V + 1, generator=g).to(dtype).cuda()
        labels = torch.randint(0, V, (N, T), generator=g).cuda()
        labels[0, 0] = -100
        labels[-1, -1] = V  # unchecked out-of-range label: a NaN row, nothing read outside
        cases.append((f"{name}, contiguous", flat[: N * T * V].view(N, T, V), labels))
        cases.append((f"{name}, unaligned shifted view", flat[1:].view(N, T + 1, V)[:, :-1], labels))
    return cases


def check_row_passes(ops) -> None:
    for dtype in DTYPES:
        for name, logits, labels in row_cases(dtype):
            S, L, lse = ops.seq_logprobs_fwd(logits, labels, -100)
            gS = torch.ones_like(S)
            grad = ops.seq_logprobs_bwd(logits, labels, lse, gS, -100)
            ops.seq_logprobs_bwd_(logits, labels, lse, gS, -100)
            torch.cuda.synchronize()
            assert torch.isnan(S[-1]) and torch.isfinite(S[:-1]).all(), (dtype, name, S)
            in_place = logits.contiguous()
            assert torch.equal(grad.isnan(), in_place.isnan()) and torch.equal(grad.nan_to_num(), in_place.nan_to_num())
            assert torch.isnan(grad[-1, -1]).all() and not grad[0, 0].any(), (dtype, name)
            assert (L == (labels != -100).sum(dim=1)).all(), (dtype, name)


def check_stage(ops) -> None:
    g = torch.Generator().manual_seed(1)
    B, K = 5, 3
    for dtype in (torch.float32, torch.float64):
        S = (-torch.rand(B * K, generator=g, dtype=dtype) * 50).cuda()
        L = torch.randint(1, 20, (B * K,), generator=g).to(dtype).cuda()
        S_ref = (-torch.rand(B * K, generator=g, dtype=dtype) * 50).cuda()
        scores = torch.randn(B, K, generator=g, dtype=dtype).cuda()
        h = (torch.rand(B, generator=g, dtype=dtype) + 0.5).cuda()
        for loss in LOSSES:
            params = encode_params(loss, resolve_params(loss))
            ell, _ = ops.prompt_loss(S, L, S_ref, scores, LOSSES[loss].code, params)
            for strategy in STRATEGIES.values():
                ops.robust_reduce(ell, h, strategy.code, 0.5)
                out = ops.batch_stage(S, L, S_ref, scores, h, LOSSES[loss].code, params, strategy.code, 0.5)
                assert all(torch.isfinite(t).all() for t in out), (dtype, loss, strategy)
    torch.cuda.synchronize()


def check_rescale(ops) -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1000, 33, dtype=dtype, device="cuda")
        before = x.clone()
        ops.rescale_(x, torch.ones((), dtype=dtype, device="cuda"))
        assert torch.equal(x, before)
        ops.rescale_(x, torch.full((), 0.25, dtype=dtype, device="cuda"))
        torch.testing.assert_close(x, before * 0.25)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_smoke: no CUDA device", file=sys.stderr)
        return 2
    load_ops()
    ops = torch.ops.dora_engine
    check_row_passes(ops)
    check_stage(ops)
    check_rescale(ops)
    torch.cuda.synchronize()
    print("kernel_smoke: every kernel ran; results as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
