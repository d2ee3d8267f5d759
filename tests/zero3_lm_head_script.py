"""Two-rank DeepSpeed ZeRO-3 (CPU, gloo) run of a tiny Llama whose tied lm_head computes the DoRA loss.

Launched by tests/test_fused_linear_distributed.py as ``deepspeed --num_gpus 2 this.py --out F.json``.
For each mode of the fused-linear loss, both ranks train ``DoRAPolicy`` for a few steps on their half
of one global batch, with the robust reduction over both ranks. Rank 0 also runs the plain logits path
in one process on the whole global batch; it writes both step-1 lm_head gradients and the losses to
``--out`` as JSON. Last, a model whose logits are scaled only where rank 0's tokens hold token 0 (a
transform no config name announces) shows that the first forward's check sends both ranks to ``logits``.
"""

from __future__ import annotations

import argparse
import copy
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from transformers import LlamaConfig, LlamaForCausalLM

from dora_engine.atomic import atomic_write
from dora_engine.ops import dora_loss
from dora_engine.ops.lm_head import DoRAPolicy, RobustObjective

PROMPTS, K, T, VOCAB, PROMPT_TOKENS = 4, 3, 10, 64, 3
LOSS_ARGS = {"loss": "dpo_pl", "strategy": "dora", "lam": 0.5}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).float()


class ScaledWhereTokenZero(LlamaForCausalLM):
    """Logits ×2 wherever the input holds token 0."""

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if bool((input_ids == 0).any()):
            out.logits = out.logits * 2
        return out


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    N = PROMPTS * K
    input_ids = torch.randint(0, VOCAB, (N, T), generator=g)
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(N, T, dtype=torch.int64),
        "labels": labels,
        "scores": torch.randn(PROMPTS, K, generator=g),
        "h_tilde": torch.rand(PROMPTS, generator=g) + 0.5,
        "ref_logps": -30.0 + torch.randn(N, generator=g),
    }


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per_rank = PROMPTS // world
    prompts = slice(rank * per_rank, (rank + 1) * per_rank)
    rows = slice(prompts.start * K, prompts.stop * K)
    return {k: v[prompts] if k in ("scores", "h_tilde") else v[rows] for k, v in batch.items()}


def logits_path_grad(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """One process, whole batch, full logits and the reference op: the independent oracle."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = dora_loss(
        logits[:, :-1], batch["labels"][:, 1:].contiguous(), num_responses=K, scores=batch["scores"],
        h_tilde=batch["h_tilde"], ref_logps=batch["ref_logps"], backend="reference", **LOSS_ARGS,
    )
    out.loss.backward()
    return out.loss.item(), model.lm_head.weight.grad.clone()


def train(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], mode: str, steps: int) -> dict:
    policy = DoRAPolicy(  # a prompt per chunk
        model, RobustObjective(**LOSS_ARGS), mode=mode, chunk_bytes=K * T * VOCAB * 4, backend="fused"
    )
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config)
    tied = engine.module.model.lm_head.weight is engine.module.model.model.embed_tokens.weight
    losses, first_grad = [], None
    for _ in range(steps):
        out = engine(
            batch["input_ids"], batch["attention_mask"], batch["labels"], scores=batch["scores"],
            h_tilde=batch["h_tilde"], ref_logps=batch["ref_logps"], process_group=dist.group.WORLD,
        )
        engine.backward(out.loss)
        if first_grad is None:
            first_grad = safe_get_full_grad(engine.module.model.lm_head.weight).clone()
        engine.step()
        losses.append(out.loss.item())
    return {"losses": losses, "grad": first_grad.flatten().tolist(), "tied": tied,
            "loss_path": engine.module.loss_path}


def unlisted_transform_paths(base: LlamaForCausalLM, local: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Each rank's loss path after one step of ``auto`` on ``ScaledWhereTokenZero``, token 0 on rank 0 only."""
    model = ScaledWhereTokenZero(base.config)
    model.load_state_dict(base.state_dict())
    input_ids = local["input_ids"].masked_fill(local["input_ids"] == 0, 1)
    if rank == 0:
        input_ids[:, 1] = 0
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, train(model, {**local, "input_ids": input_ids}, "single_pass", 1)["loss_path"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = tiny_llama()
    batch = global_batch()
    oracle_loss, oracle_grad = logits_path_grad(copy.deepcopy(base), batch)
    local = rank_slice(batch, rank, world)
    runs = {mode: train(copy.deepcopy(base), local, mode, args.steps) for mode in ("single_pass", "recompute")}
    unlisted = unlisted_transform_paths(base, local, rank)
    if rank == 0:
        result = {"world": world, "oracle_loss": oracle_loss, "oracle_grad": oracle_grad.flatten().tolist(), **runs,
                  "unlisted_transform_paths": unlisted}
        with atomic_write(args.out) as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
