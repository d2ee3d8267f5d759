"""The reference log-prob cache: correct values, reused, invalidated by data or model changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_toy import build_model, make_records, make_toy, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _ref_logps(config: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "dora_engine.training", "--task", "ref-logps", "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cache_files(root: Path) -> set[Path]:
    return set((root / "ref_cache").glob("ref_logps-*.pt"))


def _independent_logps(model_dir: Path, record: dict) -> list[float]:
    """Σ log p(response token | prefix) with plain transformers, from the raw text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tok(record["prompt"])["input_ids"]
    out = []
    for response in record["responses"]:
        target = tok(response["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(target)))
    return out


@pytest.mark.multiproc
def test_reference_cache_is_reused_and_invalidated(tmp_path):
    config = make_toy(tmp_path, n_records=6)
    assert "reference log-probs: computing" in _ref_logps(config)
    (first,) = _cache_files(tmp_path)
    cached = torch.load(first)["ref_logps"]
    records = make_records(6)
    for i in (0, 5):
        assert cached[i].tolist() == pytest.approx(_independent_logps(tmp_path / "model", records[i]), abs=1e-4)

    stamp = first.stat().st_mtime_ns
    assert "reference log-probs: reusing" in _ref_logps(config)  # second run: no reference pass
    assert _cache_files(tmp_path) == {first} and first.stat().st_mtime_ns == stamp

    records[2]["responses"][1]["text"] = "w1 w2"  # the data changes
    write_jsonl(tmp_path / "train.jsonl", records)
    assert "reference log-probs: computing" in _ref_logps(config)
    assert len(_cache_files(tmp_path)) == 2

    build_model(tmp_path / "model", vocab_size=28, seed=1)  # the model changes
    assert "reference log-probs: computing" in _ref_logps(config)
    newest = max(_cache_files(tmp_path), key=lambda p: p.stat().st_mtime_ns)
    assert len(_cache_files(tmp_path)) == 3
    assert not torch.allclose(torch.load(newest)["ref_logps"], cached)
