"""Tokenised-data benchmark (docs/design.md section 3.2): build time, resident memory, cached start-up.

For each N: a synth file of N records (``dora_engine.data.synth``, K = 4; a block of distinct records
repeated under new ids), then two fresh processes:

1. *build*: tokenise into an empty cache with ``--num-proc`` processes; wall time, records/s;
2. *reuse*: a second run with the same key, measured from the process's start (imports included) to
   data ready (cache mapped, token-range check, sampler, first collated batch); its resident memory
   then (VmRSS, split into anonymous and file-backed pages), its peak (VmHWM), and the resident memory
   after the imports alone, which is what the data add to.

    python benchmarks/bench_data.py --records 100000 1000000 --num-proc 2 --work /tmp/bench_data

The tokenizer is the synth word-level one unless ``--tokenizer`` names a folder. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 20_000  # distinct synth records, repeated under new ids up to N


def write_synth(path: Path, n: int) -> None:
    from dora_engine.data.synth import synth_records

    if path.is_file():
        return
    block = [r.to_dict() for r in synth_records(num_prompts=min(n, BLOCK), k=4, seed=0)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for i in range(n):
            rec = dict(block[i % len(block)])
            rec["id"] = f"synth-{i}"
            handle.write(json.dumps(rec) + "\n")
    tmp.rename(path)


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def child(args: argparse.Namespace) -> None:
    """One run: load (building when the cache is empty) and report as JSON on stdout's last line."""
    started = time.perf_counter()
    from transformers import AutoTokenizer

    from dora_engine.training.config import DataConfig, ModelConfig
    from dora_engine.training.data import Sampler, check_token_range, collate, row_tokenizer
    from dora_engine.training.tokenised import load_tokenised

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    imports = _status()
    tokenizer = row_tokenizer(tok, ModelConfig(path=args.tokenizer), DataConfig(max_prompt_tokens=256,
                                                                            max_response_tokens=256))
    loading = time.perf_counter()
    data = load_tokenised([args.data], tokenizer, stage="align", target_source="golden", num_responses=None,
                          needs_h_tilde=False, cache_dir=args.cache, num_proc=args.num_proc, progress=False)
    loaded = time.perf_counter()
    check_token_range(data, len(tok), "data.train")
    sampler = Sampler(len(data), 8, 1, 1, 0)
    batch = collate(data, sampler.step_indices(0, 0)[0], pad_id=0)
    ready = time.perf_counter()
    status = _status()
    print(json.dumps({"built": data.built, "examples": len(data), "load_s": loaded - loading,
                      "startup_s": ready - started, "imports_rss": imports["VmRSS"], **status,
                      "batch": list(batch["input_ids"].shape)}))


def run_child(data: Path, cache: Path, tokenizer: str, num_proc: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--cache", str(cache), "--tokenizer", tokenizer,
           "--num-proc", str(num_proc)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ,
                                                                              "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_data"))
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the synth word-level one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from dora_engine.data.synth import build_synth_tokenizer

        tokenizer = str(args.work / "synth_tokenizer")
        build_synth_tokenizer(tokenizer)
    rows = []
    for n in args.records:
        data = args.work / f"synth-{n}.jsonl"
        write_synth(data, n)
        cache = args.work / f"cache-{n}"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        build = run_child(data, cache, tokenizer, args.num_proc)
        reuse = run_child(data, cache, tokenizer, args.num_proc)
        assert build["built"] and not reuse["built"]
        rows.append((n, data.stat().st_size / 2**20, build, reuse))
        print(json.dumps({"records": n, "build": build, "reuse": reuse}), flush=True)
    print()
    print("| records | JSONL MiB | tokenise (build run, s) | records/s | reuse start-up (s) | RSS after imports (MiB) "
          "| RSS data ready (MiB): total / anon / file | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, size, build, reuse in rows:
        print(f"| {n:,} | {size:.0f} | {build['load_s']:.1f} | {n / build['load_s']:,.0f} | {reuse['startup_s']:.2f} "
              f"| {reuse['imports_rss']:.0f} | {reuse['VmRSS']:.0f} / {reuse['RssAnon']:.0f} / {reuse['RssFile']:.0f} "
              f"| {reuse['VmHWM']:.0f} |")
    print("\nbuild-run peak RSS (MiB, the tokenising process itself): "
          + ", ".join(f"{n:,}: {b['VmHWM']:.0f}" for n, _, b, _ in rows))


if __name__ == "__main__":
    main()
