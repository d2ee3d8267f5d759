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


def _reference_pass_frees_its_model(rank: int, config: str) -> tuple[list[int], list[bool]]:
    """Rank body: ``ensure_reference`` with the cycle collector off, recording the models it loads."""
    import gc
    import weakref

    from dora_engine.training import ref_logps
    from dora_engine.training.config import load_config
    from dora_engine.training.dsconfig import build_deepspeed_config
    from dora_engine.training.loading import load_run_data
    from dora_engine.training.process_group import Ranks

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    cfg = load_config(config)
    data = load_run_data(cfg, False)
    loaded: list[weakref.ref] = []
    load = ref_logps.load_causal_lm

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    ref_logps.load_causal_lm = recording_load
    gc.disable()  # only the trainer's own collection may free the model
    try:
        ref = ref_logps.ensure_reference(cfg, data.train, build_deepspeed_config(cfg, 1), Ranks(), data.pad_id, False)
        return list(ref.shape), [r() is not None for r in loaded]
    finally:
        gc.enable()


@pytest.mark.multiproc
def test_reference_model_is_freed_before_the_policy_loads(tmp_path):
    """Once the reference pass returns, nothing refers to its model any more and it has been collected
    (DeepSpeed's engine and the module form reference cycles, which only a collection after the last
    reference is gone frees)."""
    from multiproc import run_gloo

    config = make_toy(tmp_path, n_records=4)
    ((shape, alive),) = run_gloo(_reference_pass_frees_its_model, 1, str(config))
    assert shape == [4, 3] and alive == [False]


# --------------------------------------------------------------------------------- a damaged cache file


def _garble_values(path: Path, ref: torch.Tensor) -> None:
    """Change the stored values in place, keeping the file's size (the zip stores tensor bytes uncompressed)."""
    blob = path.read_bytes()
    stored = ref.numpy().tobytes()
    at = blob.index(stored)
    edited = (ref + 1.0).numpy().tobytes()
    path.write_bytes(blob[:at] + edited + blob[at + len(stored):])


@pytest.mark.parametrize("damage", ["garbled", "truncated", "no checksum"])
def test_a_damaged_cache_file_is_recomputed_after_one_warning(tmp_path, monkeypatch, capsys, damage):
    """A cache file whose values were edited (same size), cut short, or written without a checksum is not
    used: one warning line, then the reference pass runs again and rewrites it (docs/design.md section 7.4)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from dora_engine.training import ref_logps
    from dora_engine.training.config import load_config
    from dora_engine.training.process_group import Ranks

    cfg = load_config(make_toy(tmp_path, n_records=4))
    data = SimpleNamespace(data_hash="d" * 64, token_hash="t" * 64, num_records=4, num_responses=3)
    right = torch.arange(12, dtype=torch.float32).view(4, 3) - 20
    passes = []
    monkeypatch.setattr(ref_logps, "reference_pass", lambda *args: passes.append(1) or right.clone())
    monkeypatch.setattr(dist, "barrier", lambda: None)

    def ensure() -> torch.Tensor:
        return ref_logps.ensure_reference(cfg, data, {}, Ranks(), 0, False)

    assert torch.equal(ensure(), right) and len(passes) == 1
    (path,) = _cache_files(tmp_path)
    loaded, problem = ref_logps.load_cached(path, data)
    assert torch.equal(loaded, right) and problem is None
    capsys.readouterr()
    if damage == "garbled":
        _garble_values(path, right)
        assert torch.load(path, weights_only=True)["ref_logps"][0, 0] == right[0, 0] + 1  # loads, wrong values
        why = "its values differ from the SHA-256 recorded when it was written"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        why = "it does not open ("
    else:
        torch.save({"ref_logps": right + 1, "key": {}}, path)
        why = "it records no SHA-256 of its values (written by an older version)"
    assert ref_logps.load_cached(path, data)[0] is None
    assert torch.equal(ensure(), right) and len(passes) == 2
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "Traceback" not in err, err
    assert warnings[0].startswith(f"[dora-engine] warning: reference log-probs cache {path} cannot be used ({why}")
    assert warnings[0].endswith("; computing it again")
    assert torch.equal(ref_logps.load_cached(path, data)[0], right)  # rewritten, intact
    assert torch.equal(ensure(), right) and len(passes) == 2  # reused
