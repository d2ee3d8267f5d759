"""Benchmark of the fused-linear DoRA loss (docs/design.md section 5, "Fused-linear").

Forward + backward of the DoRA loss from hidden states (N = B·K, T, H) and an lm_head weight (V, H),
one method per process so that each peak is its own: CUDA ``max_memory_allocated``, CPU ``ru_maxrss``.
"extra" is the peak beyond the inputs and their final gradients (hidden, weight).

Methods:
  single_pass       dora_loss_linear(mode="single_pass"): 3 GEMMs, nothing recomputed
  recompute         dora_loss_linear(mode="recompute"): 4 GEMMs, least memory
  logits_fused      logits = hidden @ Wᵀ, then the fused op writing its gradient over the logits
  logits_reference  logits = hidden @ Wᵀ, then the pure-PyTorch reference op
  gemms3, gemms4    the bare GEMMs of single_pass / recompute on the same chunks: the physical floor
  liger_simpo       Liger-Kernel's chunked SimPO loss (K = 2; needs liger_kernel, CUDA); compare with
                    ``--loss simpo --strategy erm``, the same objective
  liger_dpo         Liger-Kernel's chunked DPO loss (K = 2) without its in-loss reference model, as ours takes
                    precomputed reference log-probs; compare with ``--loss dpo --strategy erm``

Examples (figures go to benchmarks/RESULTS.md):
  python benchmarks/bench_linear.py --preset cpu      # fp32, V=32000, H=1024, T=512, N=32 (B=8, K=4)
  python benchmarks/bench_linear.py --preset gpu      # bf16, V=128256, H=4096, T=2048, N=16 (B=4, K=4)
  python benchmarks/bench_linear.py --preset liger    # Liger's setting: bf16, T=1024, N=16 (B=8, K=2), simpo
  python benchmarks/bench_linear.py --preset liger_dpo  # the same point, dpo
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from dora_engine.ops import IGNORE_INDEX

METHODS = ("single_pass", "recompute", "logits_fused", "logits_reference", "gemms3", "gemms4", "liger_simpo",
           "liger_dpo")


@dataclass(frozen=True)
class Point:
    device: str = "cpu"
    dtype: str = "float32"
    V: int = 32000
    H: int = 1024
    T: int = 512
    B: int = 8
    K: int = 4
    loss: str = "dpo_pl"
    strategy: str = "dora"
    chunk_bytes: int | None = None
    repeats: int = 1


PRESETS = {
    "cpu": (Point(), ("single_pass", "recompute", "logits_fused", "logits_reference", "gemms3")),
    "gpu": (
        Point(device="cuda", dtype="bfloat16", V=128256, H=4096, T=2048, B=4, K=4, repeats=3),
        ("single_pass", "recompute", "logits_fused", "logits_reference", "gemms3", "gemms4"),
    ),
    "liger": (
        Point(device="cuda", dtype="bfloat16", V=128256, H=4096, T=1024, B=8, K=2, loss="simpo", strategy="erm",
              repeats=3),
        ("single_pass", "recompute", "logits_fused", "gemms3", "liger_simpo"),
    ),
    "liger_dpo": (
        Point(device="cuda", dtype="bfloat16", V=128256, H=4096, T=1024, B=8, K=2, loss="dpo", strategy="erm",
              repeats=3),
        ("single_pass", "recompute", "logits_fused", "gemms3", "liger_dpo"),
    ),
}


# --------------------------------------------------------------------------------------------------
# One method in this process
# --------------------------------------------------------------------------------------------------


def make_inputs(p: Point) -> dict:
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, p.dtype)
    N = p.B * p.K
    hidden = torch.randn(N, p.T, p.H, generator=g).to(p.device, dtype).requires_grad_(True)
    weight = (torch.randn(p.V, p.H, generator=g) / p.H**0.5).to(p.device, dtype).requires_grad_(True)
    labels = torch.randint(0, p.V, (N, p.T), generator=g)
    labels[:, : p.T // 8] = IGNORE_INDEX  # a prompt prefix
    loss_kwargs = {
        "num_responses": p.K,
        "scores": torch.randn(p.B, p.K, generator=g),
        "h_tilde": torch.rand(p.B, generator=g) + 0.5,
        "ref_logps": -50.0 + torch.randn(N, generator=g),
        "loss": p.loss,
        "strategy": p.strategy,
    }
    loss_kwargs = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in loss_kwargs.items()}
    return {"hidden": hidden, "weight": weight, "labels": labels.to(p.device), "loss_kwargs": loss_kwargs}


def _gemms(x: dict, p: Point, count: int) -> None:
    """The GEMMs of the fused-linear loss on single_pass's chunks (whole prompts' scored rows), without
    anything else."""
    from dora_engine.ops.chunking import default_chunk_bytes, group_spans, tokens_per_chunk

    hidden, weight = x["hidden"].detach(), x["weight"].detach()
    scored = (x["labels"] != IGNORE_INDEX).reshape(-1)
    rows = hidden.reshape(-1, p.H)[scored]
    counts = scored.view(-1, p.K * p.T).sum(dim=1).tolist()
    budget = p.chunk_bytes or default_chunk_bytes(p.device, p.V, hidden.element_size())
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_rows = torch.empty_like(rows)
    starts = [0, *itertools.accumulate(counts)]
    for p0, p1 in group_spans(counts, tokens_per_chunk(budget, p.V, hidden.element_size())):
        h = rows[starts[p0] : starts[p1]]
        for _ in range(count - 2):
            z = h @ weight.t()
        torch.mm(z, weight, out=grad_rows[starts[p0] : starts[p1]])
        grad_weight.add_(z.t() @ h)
        del z


def _liger(x: dict, p: Point, loss_fn: torch.nn.Module) -> None:
    """Liger's chunked pairwise loss on the same rows: it stacks all chosen rows, then all rejected rows;
    here row b·K + k, response 0 the chosen one."""
    if p.K != 2:
        raise ValueError("Liger's pairwise losses compare two responses: use K = 2")
    order = torch.cat([torch.arange(0, p.B * 2, 2), torch.arange(1, p.B * 2, 2)]).to(p.device)
    out = loss_fn(x["weight"], x["hidden"][order], x["labels"][order])
    (out[0] if isinstance(out, tuple) else out).backward()


def _liger_simpo(x: dict, p: Point) -> None:
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

    _liger(x, p, LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.8, compute_nll_loss=False))


def _liger_dpo(x: dict, p: Point) -> None:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # use_ref_model=False: no reference GEMM inside the loss, like ours with precomputed S_ref (the
    # subtraction of S_ref is the only work this leaves out).
    _liger(x, p, LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=False))


def run_method(method: str, x: dict, p: Point) -> None:
    from dora_engine.ops import dora_loss, dora_loss_linear

    hidden, weight, labels, kw = x["hidden"], x["weight"], x["labels"], x["loss_kwargs"]
    if method in ("single_pass", "recompute"):
        out = dora_loss_linear(hidden, weight, labels, mode=method, chunk_bytes=p.chunk_bytes, backend="fused", **kw)
    elif method == "logits_fused":
        out = dora_loss(F.linear(hidden, weight), labels, inplace_backward=True, backend="fused", **kw)
    elif method == "logits_reference":
        out = dora_loss(F.linear(hidden, weight), labels, backend="reference", **kw)
    elif method in ("gemms3", "gemms4"):
        return _gemms(x, p, int(method[-1]))
    elif method == "liger_simpo":
        return _liger_simpo(x, p)
    elif method == "liger_dpo":
        return _liger_dpo(x, p)
    else:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    out.loss.backward()


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_bytes(device: str) -> int:
    """Memory held now: the baseline (the peak so far also counts temporaries of building the inputs)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(method: str, p: Point) -> dict:
    from dora_engine.ops.builder import load_ops

    load_ops()
    x = make_inputs(p)
    grads_bytes = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"]))
    _sync(p.device)
    if p.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _current_bytes(p.device)
    times = []
    for _ in range(p.repeats):
        x["hidden"].grad = x["weight"].grad = None
        _sync(p.device)
        start = time.perf_counter()
        run_method(method, x, p)
        _sync(p.device)
        times.append(time.perf_counter() - start)
    extra = _peak_bytes(p.device) - baseline - grads_bytes  # the bare GEMMs fill gradient buffers too
    return {"method": method, "time_s": min(times), "times_s": times, "extra_bytes": extra, **asdict(p)}


# --------------------------------------------------------------------------------------------------
# Driver: one subprocess per method, then a table
# --------------------------------------------------------------------------------------------------


def run_all(methods: list[str], p: Point, timeout: float) -> list[dict]:
    """``p.repeats`` rounds over the methods, interleaved so that a slow spell of a shared machine hits every
    method alike; per method the best time and the largest extra memory."""
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    errors: dict[str, list[str]] = {}
    single = json.dumps(asdict(replace(p, repeats=1)))
    for _, method in tqdm([(r, m) for r in range(p.repeats) for m in methods], desc="runs", unit="run"):
        if method in errors:
            continue
        cmd = [sys.executable, __file__, "--worker", method, "--point", single]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            errors[method] = proc.stderr.strip().splitlines()[-1:]
            continue
        runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = []
    for method in methods:
        if method in errors:
            results.append({"method": method, "error": errors[method]})
            continue
        times = [t for r in runs[method] for t in r["times_s"]]
        extra = max(r["extra_bytes"] for r in runs[method])
        results.append({**runs[method][0], "time_s": min(times), "times_s": times, "extra_bytes": extra,
                        "repeats": p.repeats})
    return results


def table(results: list[dict], p: Point) -> str:
    by_method = {r["method"]: r for r in results if "error" not in r}
    logits = by_method.get("logits_fused")
    lines = [
        f"{p.device}, {p.dtype}, V={p.V}, H={p.H}, T={p.T}, N={p.B * p.K} (B={p.B}, K={p.K}), "
        f"{p.loss}/{p.strategy}, chunk_bytes={p.chunk_bytes or 'default'}, best of {p.repeats}",
        "",
        "| method | time (s) | × logits_fused | × its bare GEMMs | extra memory (MiB) | ÷ logits_fused |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    floors = {"single_pass": by_method.get("gemms3"), "recompute": by_method.get("gemms4")}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {' '.join(r['error'])} | | | | |")
            continue
        floor = floors.get(r["method"])
        rel_t = f"{r['time_s'] / logits['time_s']:.2f}" if logits else "–"
        rel_floor = f"{r['time_s'] / floor['time_s']:.2f}" if floor else "–"
        rel_m = f"{r['extra_bytes'] / logits['extra_bytes']:.2f}" if logits and logits["extra_bytes"] > 0 else "–"
        lines.append(
            f"| {r['method']} | {r['time_s']:.3f} | {rel_t} | {rel_floor} | {r['extra_bytes'] / 2**20:.0f} | {rel_m} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)} (default: the preset's)")
    for field in ("V", "H", "T", "B", "K", "repeats", "chunk_bytes"):
        parser.add_argument(f"--{field}", type=int, help=f"override the preset's {field}")
    for field in ("device", "dtype", "loss", "strategy"):
        parser.add_argument(f"--{field}", help=f"override the preset's {field}")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Point(**json.loads(args.point)))))
        return 0
    point, methods = PRESETS[args.preset]
    overrides = {f: getattr(args, f) for f in asdict(point) if getattr(args, f, None) is not None}
    point = replace(point, **overrides)
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(","))
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    if point.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (the preset's) needs a CUDA device; use --preset cpu")
    results = run_all(list(methods), point, args.timeout)
    print(table(results, point))
    if args.out:
        from dora_engine.atomic import atomic_write

        with atomic_write(args.out) as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
