"""End-to-end training throughput: tokens/s and peak memory per optimizer step, by loss path.

Each variant trains the same tiny Llama on the same batches (``dora-engine train``, one process,
ZeRO-3, DoRA with dpo_pl) in a fresh process, so peak memory is per variant. The trainer's own loss path
runs (``dora_engine.training.model.PolicyLoss``), selected by config keys only:

- ``logits/reference``: model logits → ``dora_loss`` with the pure-PyTorch reference op;
- ``logits/fused``: model logits → ``dora_loss`` with the fused op, gradient written over the logits;
- ``fused_linear/single_pass`` and ``fused_linear/recompute``: hidden states → ``dora_loss_linear`` inside
  the loss head (no full logits), in each of its two modes.

Reported per variant: median tokens/s and step time over the steps after ``--warmup``, and the peak
memory (GPU: max allocated; CPU: the process's peak resident set). ``--results`` rewrites the section
"Training throughput, CPU" (or ", GPU") of benchmarks/RESULTS.md.

    python benchmarks/bench_train.py [--vocab 32000 --hidden 256 --layers 2 --seq 128 --k 4 --prompts 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: name → config overrides of the variant.
VARIANTS = {
    "logits/reference": ["train.loss_path=logits", "train.backend=reference"],
    "logits/fused": ["train.loss_path=logits", "train.backend=fused"],
    "fused_linear/single_pass": ["train.loss_path=fused_linear", "train.backend=fused",
                                 "train.fused_linear_mode=single_pass"],
    "fused_linear/recompute": ["train.loss_path=fused_linear", "train.backend=fused",
                               "train.fused_linear_mode=recompute"],
}


def build_model(directory: Path, vocab: int, hidden: int, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 4)]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                         max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(directory)


def write_data(path: Path, prompts: int, k: int, seq: int, vocab: int) -> None:
    """Prompts of seq/4 tokens, responses of the remaining length minus EOS; scores and h̃ random."""
    rng = random.Random(0)
    word = lambda: f"t{rng.randrange(vocab - 4)}"  # noqa: E731
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(prompts):
            prompt = " ".join(word() for _ in range(seq // 4))
            responses = [{"text": " ".join(word() for _ in range(seq - seq // 4 - 1)), "source": f"s{j}",
                          "score": rng.random()} for j in range(k)]
            handle.write(json.dumps({"id": f"b{i}", "prompt": prompt, "responses": responses,
                                     "h_tilde": rng.uniform(0.5, 1.5)}) + "\n")


def run_variant(work: Path, config: Path, name: str) -> list[dict]:
    out = work / name.replace("/", "-")
    cmd = [sys.executable, "-m", "dora_engine.training", "--config", str(config), f"output_dir={out}",
           *VARIANTS[name]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(records: list[dict], warmup: int) -> dict[str, float]:
    timed = [r for r in records if r["step"] > warmup]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "mem_peak_mib": max(r["mem_peak"] for r in records) / 2**20,
        "final_loss": records[-1]["loss"],
    }


def results_section(args: argparse.Namespace, rows: dict[str, dict], device: str) -> str:
    command = (f"python benchmarks/bench_train.py --vocab {args.vocab} --hidden {args.hidden} --layers {args.layers} "
               f"--seq {args.seq} --k {args.k} --prompts {args.prompts} --steps {args.steps} --results")
    base = next(iter(rows.values()))
    lines = [
        f"## Training throughput, {device.upper()}", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads default; a shared VM: the same "
        "variant's step time varied up to 2× between runs, so compare the rows of one run.", "", f"    {command}", "",
        f"One process (`dora-engine train`, DeepSpeed ZeRO-3, fp32), DoRA with dpo_pl: tiny Llama (V = {args.vocab}, "
        f"H = {args.hidden}, {args.layers} layers), {args.prompts} prompts × K = {args.k} responses of {args.seq} "
        f"tokens per step; median over steps {args.warmup + 1}-{args.steps}. Peak memory: "
        + ("max allocated." if device == "gpu" else "peak resident set of the training process, which also holds "
           "the libraries, weights and optimizer state (the same for every variant), so only the differences "
           "between rows come from the loss path."), "",
        "| variant | tokens/s | step s | speedup | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_time_s']:.3f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {r['mem_peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(section: str, title: str) -> Path:
    from dora_engine.atomic import atomic_write

    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with atomic_write(path) as handle:
        handle.write(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="tokens per response row (prompt + response)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="the first is the speedup's baseline")
    parser.add_argument("--results", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()

    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        build_model(work / "model", args.vocab, args.hidden, args.layers)
        write_data(work / "train.jsonl", args.prompts * args.steps, args.k, args.seq, args.vocab)
        config = {
            "stage": "align", "model": {"path": str(work / "model")},
            "data": {"train": [str(work / "train.jsonl")], "max_prompt_tokens": args.seq,
                     "max_response_tokens": args.seq},
            "loss": {"name": "dpo_pl"}, "robust": {"strategy": "dora", "lam": 1.0},
            "train": {"micro_batch_prompts": args.prompts, "lr": 1e-5, "max_steps": args.steps,
                      "schedule": "constant"},
            "logging": {"tensorboard": "off"}, "checkpoint": {"export": False},
        }
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        rows = {}
        for name in args.variants:
            rows[name] = row = summarise(run_variant(work, config_path, name), args.warmup)
            print(f"{name:>26}: {json.dumps({k: round(v, 4) for k, v in row.items()})}", flush=True)
    section = results_section(args, rows, device)
    print(section)
    if args.results:
        print(f"written to {write_results(section, f'Training throughput, {device.upper()}')}")


if __name__ == "__main__":
    main()
