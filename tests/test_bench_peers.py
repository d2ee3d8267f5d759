"""benchmarks/bench_peers.py: the same-work check, the table, and a --quick run end to end (slow: seven
processes, each importing torch, transformers and TRL or DeepSpeed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_script import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_peers")


def _row(loss: float, tokens: int = 2048, rounds: int = 1) -> dict:
    return {"loss1": loss, "loss1_rounds": [loss] * rounds, "tokens_per_step": tokens, "s_per_step": 1.0,
            "s_per_step_range": [1.0, 1.0], "tokens_per_s": tokens, "tokens_per_s_range": [tokens, tokens],
            "x_gemm": 2.0, "peak_mib": 100.0, "step_peak_mib": 90.0, "base_mib": 50.0}


def test_fp32_rounding_is_the_same_work_and_anything_else_is_not(bench):
    rows = {"trl_dpo": _row(0.821184), "ours_dpo_erm": _row(0.821158), "adapter_erm": _row(0.8213),
            "ours_sft": _row(11.97), "adapter_dora": _row(0.9), "ours_dpo_pl_dora": _row(0.9, tokens=2047)}
    assert bench.same_work("trl_dpo", rows) and bench.same_work("ours_dpo_erm", rows)
    assert not bench.same_work("adapter_erm", rows)  # 1.4e-4 relative: beyond fp32 rounding
    assert bench.same_work("ours_sft", rows)  # alone in its group
    assert bench.same_work("adapter_dora", rows) and not bench.same_work("ours_dpo_pl_dora", rows)  # tokens
    rows["ours_dpo_erm"]["loss1_rounds"] = [0.821158, 0.83]  # a later round that differs
    assert not bench.same_work("ours_dpo_erm", rows)


def test_the_table_lists_every_variant_skipped_ones_with_the_reason(bench):
    variants = {v: _row(0.5 if v != "ours_sft" else 7.0) for v in bench.VARIANTS if v != "trl_liger_dpo"}
    variants["adapter_erm"] = {**_row(0.6), "same_work": False}
    for v in variants:
        variants[v].setdefault("same_work", True)
    summary = {"setup": {"work": "", "vocab": 512}, "gemm_floor_s": 0.5, "machine": "m", "variants": variants,
               "skipped": {"trl_liger_dpo": "liger_kernel is not installed"}}
    text = bench.table(summary, rounds=1, warmup=1)
    names = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert names[1:] == list(bench.VARIANTS)
    assert "| trl_liger_dpo | skipped: liger_kernel is not installed |" in text
    assert text.count("(not the same work)") == 1 and "| adapter_erm |" in text


def test_the_liger_trainer_has_trls_loss_and_gradients(bench, tmp_path):
    """``trl_liger_dpo``'s trainer against TRL's own ``DPOTrainer`` on one batch of the quick setup whose rows have
    different prompt and response lengths (padding, masked labels): the same loss and the same gradient of every
    parameter, up to fp32 rounding."""
    pytest.importorskip("trl")
    pytest.importorskip("liger_kernel")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    s = bench.Setup(str(tmp_path), vocab=512, hidden=64, layers=2, seq=32)
    bench.prepare(s)
    records = [json.loads(x) for x in (tmp_path / "trl.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, r in enumerate(records):  # prompts of 8 - i words, rejected responses of 23 - 3 i words, then EOS
        r["prompt"] = " ".join(r["prompt"].split()[: 8 - i])
        r["rejected"] = " " + " ".join(r["rejected"].split()[: 23 - 3 * i] + ["</s>"])
    dataset = Dataset.from_list(records)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    results = []
    for trainer_class in (DPOTrainer, bench.liger_dpo_trainer()):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32)
        args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=s.prompts, use_cpu=True,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None, report_to="none",
                         disable_tqdm=True)
        trainer = trainer_class(model, reference, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["attention_mask"] == 0).any() and (batch["completion_mask"] == 0).any()
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}))
    (trl_loss, trl_grads), (liger_loss, liger_grads) = results
    assert liger_loss == pytest.approx(trl_loss, rel=1e-5)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(liger_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_run_has_every_variant_and_equal_step_one_losses(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \|(.*)$", proc.stdout, re.M)}
    assert set(json.loads((tmp_path / "peers_v512.json").read_text())["variants"]) <= set(rows)
    names = ["trl_dpo", "adapter_erm", "adapter_dora", "ours_dpo_erm", "ours_dpo_pl_dora", "ours_sft"]
    if importlib.util.find_spec("liger_kernel") is not None:
        names.append("trl_liger_dpo")
    else:
        assert "skipped: liger_kernel is not installed" in rows["trl_liger_dpo"], proc.stdout
    for name in names:
        assert name in rows and "not the same work" not in rows[name] and "skipped" not in rows[name], proc.stdout


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_trace_names_our_ops_and_deepspeeds_allocations(tmp_path):
    """``--trace``: our trainer's traced step lists the loss head's d W (our op) and DeepSpeed's step copies."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--trace", "0.1", "--variants", "ours_dpo_erm",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "peers_trace_v512.json").read_text())
    made_in = [a["made_in"] for a in result["variants"]["ours_dpo_erm"]["allocations"]]
    assert any(m.startswith("dora_engine/ops/fused_linear.py(") for m in made_in), made_in
    assert any(m.startswith("deepspeed/runtime/zero/stage3.py(") for m in made_in), made_in
    assert "ours_dpo_erm: base" in proc.stdout and "| MiB | device | operators | made in |" in proc.stdout
