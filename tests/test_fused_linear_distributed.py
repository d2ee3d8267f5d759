"""Fused-linear DoRA loss across ranks (docs/design.md section 5): two gloo processes, and two DeepSpeed
ZeRO-3 ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import run_gloo

from dora_engine import ops

dora_loss_linear = partial(ops.dora_loss_linear, backend="fused")
reference_loss_linear = partial(ops.dora_loss_linear, backend="reference")

B, K, T, H, V = 5, 2, 6, 8, 23
RANK_PROMPTS = (slice(0, 3), slice(3, 5))  # uneven on purpose
CASES = [(mode, strategy) for mode in ("single_pass", "recompute") for strategy in ("dora", "drdpo", "erm")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B * K, T), generator=g)
    labels[:, :2] = -100
    return {
        "hidden": torch.randn(B * K, T, H, generator=g),
        "weight": torch.randn(V, H, generator=g) / H**0.5,
        "bias": torch.randn(V, generator=g),
        "labels": labels,
        "scores": torch.randn(B, K, generator=g),
        "h_tilde": torch.rand(B, generator=g) + 0.5,
        "ref_logps": 2 * torch.randn(B * K, generator=g),
    }


def _loss(fn, data: dict[str, torch.Tensor], prompts: slice, strategy: str, **extra):
    rows = slice(prompts.start * K, prompts.stop * K)
    leaves = [data[k][rows] if k == "hidden" else data[k] for k in ("hidden", "weight", "bias")]
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    out = fn(
        leaves[0], leaves[1], data["labels"][rows], bias=leaves[2], num_responses=K, scores=data["scores"][prompts],
        h_tilde=data["h_tilde"][prompts], ref_logps=data["ref_logps"][rows], loss="dpo_pl", strategy=strategy,
        lam=0.4, **extra,
    )
    out.loss.backward()
    return out.loss.item(), out.weights, [t.grad for t in leaves]


def _rank_main(rank: int) -> dict:
    data = _problem()
    return {
        (mode, strategy): _loss(
            dora_loss_linear, data, RANK_PROMPTS[rank], strategy, mode=mode, chunk_bytes=1,
            process_group=dist.group.WORLD,
        )
        for mode, strategy in CASES
    }


@pytest.mark.multiproc
def test_two_gloo_ranks_equal_one_process():
    ranks0, ranks1 = run_gloo(_rank_main, 2)
    data = _problem()
    for case in CASES:
        loss, weights, (g_hidden, g_weight, g_bias) = _loss(reference_loss_linear, data, slice(0, B), case[1])
        (loss0, w0, grads0), (loss1, w1, grads1) = ranks0[case], ranks1[case]
        assert loss0 == pytest.approx(loss, rel=1e-5) and loss1 == pytest.approx(loss, rel=1e-5), case
        torch.testing.assert_close(torch.cat([w0, w1]), weights)
        # Each rank returns world size × the global gradient of its own rows; DeepSpeed averages over ranks.
        torch.testing.assert_close(torch.cat([grads0[0], grads1[0]]) / 2, g_hidden, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((grads0[1] + grads1[1]) / 2, g_weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((grads0[2] + grads1[2]) / 2, g_bias, rtol=1e-4, atol=1e-6)


@pytest.mark.multiproc
def test_zero3_tiny_llama_lm_head_gradient_equals_one_process(tmp_path: Path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    script = Path(__file__).with_name("zero3_lm_head_script.py")
    out = tmp_path / "zero3.json"
    root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": python_path}
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(script), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    oracle = torch.tensor(result["oracle_grad"])
    for mode in ("single_pass", "recompute"):
        run = result[mode]
        assert run["tied"], "the loss head must share the input embedding's parameter"
        assert run["loss_path"] == "fused_linear", "the first forward's check must pass a plain lm_head"
        assert run["losses"][0] == pytest.approx(result["oracle_loss"], rel=1e-5)
        torch.testing.assert_close(torch.tensor(run["grad"]), oracle, rtol=1e-4, atol=1e-6 * oracle.abs().max().item())
        assert run["losses"][-1] < run["losses"][0], f"{mode} did not train: {run['losses']}"
    # A transform only rank 0's tokens show: the largest difference over the group sends both ranks to logits.
    assert result["unlisted_transform_paths"] == ["logits", "logits"]
