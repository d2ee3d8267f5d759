"""Fused DoRA op vs the PyTorch reference: forward+backward time and peak memory over a grid.

    python benchmarks/bench_op.py --device cpu                       # default CPU grid, a few minutes
    python benchmarks/bench_op.py --device cuda --out runs/bench_op  # the full grid of docs/design.md section 5

Workload: ``dora_loss`` (dpo_pl, dora, K = 2) on random logits (N, T, V), then d loss / d logits.
Implementations: ``reference`` (pure PyTorch), ``fused`` (gradient in a new buffer), ``fused_inplace``
(gradient written over the logits). Time: median of ``--repeats`` after ``--warmup`` runs. Memory: the
peak above what the inputs already hold; on CUDA ``torch.cuda.max_memory_allocated``, on CPU the peak
resident set (``ru_maxrss``) of a fresh process per point minus its resident set before the first run.
On CUDA the forward and backward row passes are also timed alone and reported as achieved bandwidth
(bytes moved / time) and as a share of the HBM bound: the forward reads each scored token's logits once,
the backward reads them once and writes every token's gradient once (an ignored token's zero row is only
written). The bound is the device's nominal peak (H200 4.8 TB/s, H100 SXM 3.35 TB/s, …; ``--hbm-gbps``
overrides it). Points that run out of memory are skipped and reported.

Writes ``results.json``, ``results.md`` (markdown table) and ``results.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dora_engine.atomic import atomic_path, atomic_write  # noqa: E402

IMPLS = ("reference", "fused", "fused_inplace")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
K = 2
# Nominal peak HBM bandwidth (GB/s) by device name, first match wins (so the more specific names first).
HBM_GBPS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--vocab", type=int, nargs="+", help="V values (default: CPU 32000; CUDA 32000 128256)")
    p.add_argument("--seq", type=int, nargs="+", help="T values (default: CPU 256; CUDA 256 1024 2048)")
    p.add_argument("--rows", type=int, nargs="+", help="N values (default: 4 8 16)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default: CPU fp32; CUDA fp32 bf16")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (default CPU 5, CUDA 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default CPU 1, CUDA 3)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM bound in GB/s (default: from the device)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; grid points not started by then are reported as skipped")
    p.add_argument("--out", type=Path, default=Path("runs/bench_op"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one CPU point in this process
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.vocab = args.vocab or ([32000] if cpu else [32000, 128256])
    args.seq = args.seq or ([256] if cpu else [256, 1024, 2048])
    args.rows = args.rows or [4, 8, 16]
    args.dtypes = args.dtypes or (["fp32"] if cpu else ["fp32", "bf16"])
    args.repeats = args.repeats or (5 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    return args


# --------------------------------------------------------------------------------------------------
# One point
# --------------------------------------------------------------------------------------------------


def make_inputs(point: dict, device: str) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    N, T, V = point["N"], point["T"], point["V"]
    logits = torch.randn(N, T, V, generator=g, device=device, dtype=DTYPES[point["dtype"]])
    labels = torch.randint(0, V, (N, T), generator=g, device=device)
    labels[:, : T // 8] = -100  # a prompt prefix, as in training
    return dict(
        logits=logits.requires_grad_(True),
        labels=labels,
        num_responses=K,
        scores=torch.randn(N // K, K, generator=g, device=device),
        h_tilde=torch.rand(N // K, generator=g, device=device) + 0.5,
        ref_logps=-torch.rand(N, generator=g, device=device) * 100,
    )


def make_step(impl: str, inputs: dict[str, Any]):
    from functools import partial

    from dora_engine.ops import dora_loss

    logits = inputs["logits"]
    rest = {k: v for k, v in inputs.items() if k != "logits"}
    fn = partial(dora_loss, backend="reference" if impl == "reference" else "fused")
    extra = {"inplace_backward": True} if impl == "fused_inplace" else {}

    def step() -> None:
        # autograd.grad hands back d logits as the op produced it (backward() would copy it into .grad
        # of the leaf whenever the buffer is still referenced, as an in-place gradient always is).
        torch.autograd.grad(fn(logits, **rest, loss="dpo_pl", strategy="dora", lam=1.0, **extra).loss, logits)

    return step


def timed(step, repeats: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_cpu_point(point: dict, args: argparse.Namespace) -> dict:
    """In this (fresh) process: time and peak resident memory above the inputs."""
    inputs = make_inputs(point, "cpu")
    step = make_step(point["impl"], inputs)
    before = resident_bytes()
    seconds = timed(step, args.repeats, args.warmup, lambda: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"time_ms": seconds * 1e3, "peak_extra_mb": max(peak - before, 0) / 2**20}


def hbm_bound(args: argparse.Namespace) -> tuple[float | None, str]:
    """(GB/s, where the figure comes from): ``--hbm-gbps``, else the device's nominal peak by name, else the
    memory clock and bus width the device reports."""
    if args.hbm_gbps:
        return args.hbm_gbps, "--hbm-gbps"
    props = torch.cuda.get_device_properties(0)
    for name, gbps in HBM_GBPS.items():
        if name in props.name:
            return gbps, f"{name} nominal"
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock × bus width"  # double data rate
    return None, "unknown"


def row_pass_bandwidth(inputs: dict[str, Any], args: argparse.Namespace) -> dict:
    """GB/s of the row passes: forward reads the valid tokens' logits; backward reads them and writes the
    whole gradient (ignored tokens' rows are written as zeros without being read)."""
    ops = torch.ops.dora_engine
    z, y = inputs["logits"].detach(), inputs["labels"]
    S, _, lse = ops.seq_logprobs_fwd(z, y, -100)
    gS = torch.ones_like(S)
    row_bytes = z.shape[-1] * z.element_size()
    valid_rows, all_rows = int((y != -100).sum()), y.numel()
    fwd = timed(lambda: ops.seq_logprobs_fwd(z, y, -100), args.repeats, args.warmup, torch.cuda.synchronize)
    bwd = timed(lambda: ops.seq_logprobs_bwd(z, y, lse, gS, -100), args.repeats, args.warmup, torch.cuda.synchronize)
    bound, source = hbm_bound(args)
    result = {
        "fwd_ms": fwd * 1e3,
        "bwd_ms": bwd * 1e3,
        "fwd_gbps": valid_rows * row_bytes / fwd / 1e9,
        "bwd_gbps": (valid_rows + all_rows) * row_bytes / bwd / 1e9,
        "hbm_gbps": bound,
        "hbm_source": source,
    }
    if bound:
        result.update(fwd_of_bound=result["fwd_gbps"] / bound, bwd_of_bound=result["bwd_gbps"] / bound)
    return result


def run_cuda_point(point: dict, args: argparse.Namespace) -> dict:
    torch.cuda.empty_cache()
    inputs = make_inputs(point, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(make_step(point["impl"], inputs), args.repeats, args.warmup, torch.cuda.synchronize)
    result = {"time_ms": seconds * 1e3, "peak_extra_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    if point["impl"] == "fused":
        result.update(row_pass_bandwidth(inputs, args))
    return result


def run_point(point: dict, args: argparse.Namespace) -> dict:
    """One grid point; out-of-memory is a result ("skipped"), not a failure."""
    if args.device == "cuda":
        try:
            return {**point, **run_cuda_point(point, args)}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**point, "skipped": "out of memory"}
    cmd = [sys.executable, __file__, "--device", "cpu", "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--worker", json.dumps(point)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = proc.returncode < 0 or "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower()
        why = "out of memory" if killed else proc.stderr.strip().splitlines()[-1:] or ["failed"]
        return {**point, "skipped": why if isinstance(why, str) else why[0]}
    return {**point, **json.loads(proc.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def summarise(results: list[dict]) -> list[dict]:
    """Per configuration: each implementation's time and memory, and fused/reference ratios."""
    rows = []
    key = lambda r: (r["dtype"], r["V"], r["T"], r["N"])  # noqa: E731
    for config, group in itertools.groupby(sorted(results, key=key), key=key):
        by_impl = {r["impl"]: r for r in group}
        row = dict(zip(("dtype", "V", "T", "N"), config, strict=True), impls=by_impl)
        ref = by_impl.get("reference", {})
        for impl in ("fused", "fused_inplace"):
            mine = by_impl.get(impl, {})
            if "time_ms" in ref and "time_ms" in mine:
                row[f"{impl}_speedup"] = ref["time_ms"] / mine["time_ms"]
                row[f"{impl}_memory_ratio"] = mine["peak_extra_mb"] / max(ref["peak_extra_mb"], 1e-9)
        rows.append(row)
    return rows


def _cell(result: dict | None, field: str, fmt: str) -> str:
    if result is None:
        return "–"
    if "skipped" in result:
        return f"skipped ({result['skipped']})"
    return format(result[field], fmt) if field in result else "–"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Fused op benchmark ({meta['device']}: {meta['device_name']}, torch {meta['torch']})",
        "",
        "Forward+backward of `dora_loss` (dpo_pl, dora, K = 2); time = median ms, memory = peak MB above the inputs.",
        *(["Row passes alone: fwd = one read of the scored tokens' logits, bwd = that read + one write of the whole",
           f"gradient, in GB/s and % of the HBM bound ({_bound_text(rows)})."] if meta["device"] == "cuda" else []),
        "",
        "| dtype | V | T | N | reference ms | fused ms | in-place ms | speedup | reference MB | fused MB "
        "| in-place MB | memory ratio | fwd GB/s (% HBM) | bwd GB/s (% HBM) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        impls = row["impls"]
        ref, fu, ip = (impls.get(i) for i in IMPLS)
        bandwidth = []
        for d in ("fwd", "bwd"):
            if fu and f"{d}_gbps" in fu:
                share = f" ({100 * fu[f'{d}_of_bound']:.0f}%)" if f"{d}_of_bound" in fu else ""
                bandwidth.append(f"{fu[f'{d}_gbps']:.0f}{share}")
            else:
                bandwidth.append("–")
        speedup = f"{row['fused_speedup']:.2f}×" if "fused_speedup" in row else "–"
        ratio = f"{row['fused_memory_ratio']:.2f}" if "fused_memory_ratio" in row else "–"
        lines.append(
            f"| {row['dtype']} | {row['V']} | {row['T']} | {row['N']} | {_cell(ref, 'time_ms', '.1f')} "
            f"| {_cell(fu, 'time_ms', '.1f')} | {_cell(ip, 'time_ms', '.1f')} | {speedup} "
            f"| {_cell(ref, 'peak_extra_mb', '.0f')} | {_cell(fu, 'peak_extra_mb', '.0f')} "
            f"| {_cell(ip, 'peak_extra_mb', '.0f')} | {ratio} | {bandwidth[0]} | {bandwidth[1]} |"
        )
    return "\n".join(lines) + "\n"


def _bound_text(rows: list[dict]) -> str:
    for row in rows:
        fused = row["impls"].get("fused") or {}
        if fused.get("hbm_gbps"):
            return f"{fused['hbm_gbps'] / 1000:.2f} TB/s, {fused['hbm_source']}"
    return "no CUDA point"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dtype']} V={r['V']}\nT={r['T']} N={r['N']}" for r in rows]
    x = range(len(rows))
    fig, (ax_time, ax_mem) = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(rows) + 2), 7), sharex=True)
    width = 0.27
    for offset, impl in zip((-width, 0.0, width), IMPLS, strict=True):
        times = [r["impls"].get(impl, {}).get("time_ms", 0.0) for r in rows]
        mems = [r["impls"].get(impl, {}).get("peak_extra_mb", 0.0) for r in rows]
        ax_time.bar([i + offset for i in x], times, width, label=impl)
        ax_mem.bar([i + offset for i in x], mems, width, label=impl)
    ax_time.set_ylabel("fwd+bwd time (ms)")
    ax_mem.set_ylabel("peak extra memory (MB)")
    ax_time.set_title(title)
    ax_time.legend()
    ax_mem.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_cpu_point(json.loads(args.worker), args)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    from dora_engine.ops.builder import load_ops

    load_ops()  # build once before the timed subprocesses reuse the cache
    grid = [
        {"impl": impl, "dtype": dtype, "V": V, "T": T, "N": N}
        for dtype, V, T, N, impl in itertools.product(args.dtypes, args.vocab, args.seq, args.rows, args.impls)
    ]
    from tqdm import tqdm

    results = []
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    for point in tqdm(grid, desc="bench_op", unit="point"):
        if deadline is not None and time.monotonic() > deadline:
            results.append({**point, "skipped": "time budget"})
            continue
        results.append(run_point(point, args))
        tqdm.write(json.dumps(results[-1]))
    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    rows = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / "results.json") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    table = markdown(rows, meta)
    with atomic_write(args.out / "results.md") as f:
        f.write(table)
    plot(rows, args.out / "results.png", f"dora_loss fwd+bwd on {meta['device_name']}")
    print(table)
    skipped = [r for r in results if "skipped" in r]
    for r in skipped:
        print(f"skipped: {r['impl']} {r['dtype']} V={r['V']} T={r['T']} N={r['N']}: {r['skipped']}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    return f"{name}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
