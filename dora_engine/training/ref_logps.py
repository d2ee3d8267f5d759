"""Reference log-probs S_ref: one pass of the frozen reference model, cached on disk.

The cache file is keyed by hashes of the data files, of the tokenised rows (tokenizer, chat template
and max lengths all show up there) and of the reference model's files, so a later run with the same
three reuses it and a change to any of them computes a new one. The file records the SHA-256 of its
values, checked on every load: a damaged file is computed again after one warning line (docs/design.md
section 7.4). No reference model is loaded while training. The pass is sharded across ranks (example i
goes to rank i mod world) and runs the model under the same ZeRO-3 engine as training, so a reference
that does not fit one device still works.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import atomic_path
from dora_engine.errors import TrainingError
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import TrainingData, collate
from dora_engine.training.dsconfig import build_deepspeed_config, resolve_precision, torch_dtype
from dora_engine.training.loading import load_run_data
from dora_engine.training.model import LossPath, ReferenceLogps, load_causal_lm
from dora_engine.training.process_group import Ranks, gather_objects, init_distributed

SMALL_FILE = 256 << 20  # files up to this size are hashed by content; larger ones by size and mtime


def model_hash(path: str) -> str:
    """sha256 over a model directory's files (content for small files, size + mtime for large ones)."""
    root = Path(path)
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"name:{path}".encode())
        return digest.hexdigest()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}|{stat.st_size}|".encode())
        if stat.st_size <= SMALL_FILE:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def cache_key(data: TrainingData, model_digest: str, precision: str) -> dict[str, str]:
    key = {"data": data.data_hash, "tokens": data.token_hash, "model": model_digest, "precision": precision}
    key["key"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return key


def cache_file(directory: Path, key: dict[str, str]) -> Path:
    return directory / f"ref_logps-{key['key']}.pt"


def tensor_digest(ref: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: what ``save_cache`` records and ``load_cached`` checks."""
    digest = hashlib.sha256(f"{ref.dtype}|{tuple(ref.shape)}|".encode())
    digest.update(ref.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_cached(path: Path, data: TrainingData) -> tuple[torch.Tensor | None, str | None]:
    """The cached (num_records, K) tensor, or None and why it cannot be used (None when there is no file).

    The file must open with the weights-only unpickler, hold a tensor of the data's shape and match the
    SHA-256 ``save_cache`` recorded beside it, so a truncated, garbled or edited file is recomputed rather
    than trained on (docs/design.md section 7.4)."""
    if not path.is_file():
        return None, None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or garbled zip or pickle fails in many ways, none of them a bug here
        return None, f"it does not open ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    ref = saved.get("ref_logps") if isinstance(saved, dict) else None
    if not isinstance(ref, torch.Tensor):
        return None, "it holds no ref_logps tensor"
    expected = (data.num_records, data.num_responses)
    if tuple(ref.shape) != expected:
        return None, f"its tensor has shape {tuple(ref.shape)}, the data need {expected}"
    recorded = saved.get("sha256")
    if recorded is None:
        return None, "it records no SHA-256 of its values (written by an older version)"
    if tensor_digest(ref) != recorded:
        return None, "its values differ from the SHA-256 recorded when it was written"
    return ref, None


def compute_reference(
    engine: Any, data: TrainingData, *, batch_prompts: int, pad_id: int, rank: int, world: int, progress: bool,
    device: torch.device,
) -> torch.Tensor:
    """S_ref (num_records, K) on every rank. Each rank scores its shard; the shards are all-gathered.
    ``engine`` maps a batch on ``device`` to S: a DeepSpeed engine around ``ReferenceLogps`` or, in one
    process, the ``ReferenceLogps`` module itself."""
    from tqdm.auto import tqdm

    mine = list(range(rank, len(data), world))
    per_rank = -(-len(data) // world)  # every rank runs the same number of forwards (ZeRO-3 needs lockstep)
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    values: dict[int, list[float]] = {}
    engine.eval()
    batches = range(0, len(padded), batch_prompts)
    for lo in tqdm(batches, desc="reference log-probs", disable=not progress, unit="batch"):
        indices = padded[lo : lo + batch_prompts]
        batch = collate(data, indices, pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        S = engine(**batch).float().cpu().view(len(indices), data.num_responses)
        for j, i in enumerate(indices):
            if lo + j < len(mine):
                values[i] = S[j].tolist()
    shards = gather_objects(values)
    num_records = data.num_records
    ref = torch.zeros(num_records, data.num_responses, dtype=torch.float32)
    for shard in shards:
        for i, row in shard.items():
            ref[data.examples[i].record_index] = torch.tensor(row)
    return ref


def save_cache(path: Path, ref: torch.Tensor, key: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"ref_logps": ref, "key": key, "sha256": tensor_digest(ref)}, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(key, indent=1), encoding="utf-8")



def release_memory() -> None:
    """Free what is no longer referenced now: a DeepSpeed engine and its module refer to each other (hooks),
    so only the cycle collector frees them, and CUDA's caching allocator keeps freed blocks until asked to
    give them back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reference_pass(
    cfg: TrainingConfig, data: TrainingData, ds_config: dict[str, Any], ranks: Ranks, pad_id: int, progress: bool
) -> torch.Tensor:
    """S_ref (num_records, K) of ``data``: one pass of ``model.reference`` under ZeRO-3 (no optimizer),
    sharded over the ranks. The model and its engine live only inside this call and only the tensor
    leaves it, so once it returns nothing refers to them (``release_memory`` frees them)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 - while it lives, the weights load partitioned
    model = load_causal_lm(cfg.model.reference or cfg.model.path, torch_dtype(resolve_precision(cfg.train.precision)),
                           trust_remote_code=cfg.model.trust_remote_code)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=ReferenceLogps(model, LossPath.of(cfg.train)), config=config)
    try:
        return compute_reference(
            engine, data, batch_prompts=cfg.train.micro_batch_prompts, pad_id=pad_id, rank=ranks.rank,
            world=ranks.world, progress=progress and ranks.main, device=engine.device,
        )
    finally:
        engine.destroy()  # its ZeRO-3 hooks and partitions
        forget_zero3_module(engine.module)


def forget_zero3_module(module: torch.nn.Module) -> None:
    """Drop the references DeepSpeed's ZeRO-3 keeps to ``module`` in its own module state after
    ``engine.destroy()`` (DeepSpeed 0.19): the root module stays on its forward stack
    (``parameter_offload.FWD_MODULE_STACK``), and an ``lru_cache`` on a method of the parameter coordinator
    holds the coordinator and the submodules it was called with. Without this the model is never freed."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    # The cached method is wrapped (by DeepSpeed's NVTX instrumentation) without functools.wraps: the cache
    # sits in the wrapper's closure. Clearing it only costs the coordinators still alive a recomputation.
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(method, "__closure__", None) or ():
        cache_clear = getattr(cell.cell_contents, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def ensure_reference(
    cfg: TrainingConfig, data: TrainingData, ds_config: dict[str, Any], ranks: Ranks, pad_id: int, progress: bool
) -> torch.Tensor:
    """S_ref (num_records, K) for ``data``: from the cache when its key matches, else one sharded pass whose
    model is freed (CUDA memory included) before this returns, so the policy loads into the room it held."""
    reference = cfg.model.reference or cfg.model.path
    key = cache_key(data, model_hash(reference), resolve_precision(cfg.train.precision))
    directory = Path(cfg.data.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")
    path = cache_file(directory, key)
    cached, problem = load_cached(path, data)
    usable = gather_objects(cached is not None)  # one verdict: the pass below is collective
    if cached is not None and not all(usable):
        cached, problem = None, "another rank cannot use its copy"
    if problem is not None and ranks.main:
        print(f"[dora-engine] warning: reference log-probs cache {path} cannot be used ({problem}); computing it "
              "again", file=sys.stderr, flush=True)
    if cached is not None:
        if ranks.main:
            print(f"[dora-engine] reference log-probs: reusing {path}", flush=True)
        return cached
    if ranks.main:
        print(f"[dora-engine] reference log-probs: computing {path} with {reference}", flush=True)
    ref = reference_pass(cfg, data, ds_config, ranks, pad_id, progress)
    release_memory()
    if ranks.local_rank == 0:
        save_cache(path, ref, key)
    dist.barrier()
    return ref


def precompute_reference(cfg: TrainingConfig, *, progress: bool = True) -> list[torch.Tensor]:
    """``dora-engine ref-logps``: fill the reference cache of the train (and eval) data of ``cfg``."""
    if not cfg.needs_reference:
        raise TrainingError(f"loss {cfg.loss.name!r} in stage {cfg.stage!r} uses no reference log-probs")
    data = load_run_data(cfg, progress)
    ranks = init_distributed(timedelta(minutes=cfg.train.dist_timeout_minutes))
    ds_config = build_deepspeed_config(cfg, ranks.world)
    splits = [split for split in (data.train, data.eval) if split is not None]
    return [ensure_reference(cfg, split, ds_config, ranks, data.pad_id, progress) for split in splits]
