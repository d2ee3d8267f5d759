"""Global robust reduction across data-parallel ranks (docs/design.md section 5, "Data parallel").

Ranks all-gather their per-prompt scalars, every rank evaluates the same global loss, and the backward
returns to each rank the gradient of that loss for its own prompts multiplied by the world size, so
that DeepSpeed's gradient *averaging* yields exactly the gradient of the global loss. The group is
``data_parallel_group()`` (re-exported by ``dora_engine.preference`` for the trainers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_group() -> dist.ProcessGroup | None:
    """The world group whenever a process group is initialised, else None (no communication).

    A world of one gets its group too, so that a one-GPU run makes every collective a multi-GPU run makes
    (on the same device types, through the same code) and shows its failures first."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _sizes(local: int, group: dist.ProcessGroup | None, device: torch.device) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return torch.cat(every).tolist()  # one host read for all ranks' sizes


def gather_uneven(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, int, int]:
    """All-gather ``x`` of shape (n,) or (C, n) along its last dimension (n may differ by rank). Returns
    (global, offset of this rank, world)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = _sizes(x.shape[-1], group, x.device)
    padded = torch.zeros(*x.shape[:-1], max(sizes), dtype=x.dtype, device=x.device)
    padded[..., : x.shape[-1]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    full = torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)
    return full, sum(sizes[:rank]), world


class _GatherForGlobalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        full, offset, world = gather_uneven(x.detach(), group)
        ctx.slice = (offset, offset + x.shape[-1])
        ctx.world = world
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo, hi = ctx.slice
        return grad[..., lo:hi] * ctx.world, None


def gather_for_global_loss(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather per-prompt values, (n,) or (C, n) along the last dimension; backward keeps this rank's
    slice scaled by the world size."""
    return _GatherForGlobalLoss.apply(x, group)


def local_slice(full: torch.Tensor, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's part of a gathered tensor whose local part has ``local.numel()`` entries."""
    offset = sum(_sizes(local.numel(), group, local.device)[: dist.get_rank(group)])
    return full[offset : offset + local.numel()]
