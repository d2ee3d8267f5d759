"""Reference log-probs S_ref: one pass of the frozen reference model, cached on disk.

The cache file is keyed by hashes of the data files, of the tokenised rows (tokenizer, chat template
and max lengths all show up there) and of the reference model's files, so a later run with the same
three reuses it and a change to any of them computes a new one. No reference model is loaded while
training. The pass is sharded across ranks (example i goes to rank i mod world) and runs the model
under the same ZeRO-3 engine as training, so a reference that does not fit one device still works.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import atomic_path
from dora_engine.errors import TrainingError
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import TrainingData, collate
from dora_engine.training.dsconfig import build_deepspeed_config, resolve_precision, torch_dtype
from dora_engine.training.loading import load_data
from dora_engine.training.model import ReferenceLogps, load_causal_lm, load_tokenizer
from dora_engine.training.process_group import Ranks, init_distributed

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


def load_cached(path: Path, data: TrainingData) -> torch.Tensor | None:
    """The cached (num_records, K) tensor when the file exists and matches the data's shape."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    ref = saved["ref_logps"]
    num_records = data.num_records
    return ref if tuple(ref.shape) == (num_records, data.num_responses) else None


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
    shards = [values]
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, values)
    num_records = data.num_records
    ref = torch.zeros(num_records, data.num_responses, dtype=torch.float32)
    for shard in shards:
        for i, row in shard.items():
            ref[data.examples[i].record_index] = torch.tensor(row)
    return ref


def save_cache(path: Path, ref: torch.Tensor, key: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"ref_logps": ref, "key": key}, tmp)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(key, indent=1), encoding="utf-8")


def release(engine: Any) -> None:
    """Free the reference engine (its ZeRO-3 hooks and partitions) before the policy is built."""
    engine.destroy()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ensure_reference(
    cfg: TrainingConfig, data: TrainingData, ds_config: dict, dist_info: Ranks, pad_id: int, progress: bool
) -> torch.Tensor:
    """S_ref (num_records, K) for ``data``: from the cache when its key matches, else one sharded pass."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    reference = cfg.model.reference or cfg.model.path
    precision = resolve_precision(cfg.train.precision)
    key = cache_key(data, model_hash(reference), precision)
    directory = Path(cfg.data.ref_cache_dir or Path(cfg.output_dir) / "ref_cache")
    path = cache_file(directory, key)
    cached = load_cached(path, data)
    if cached is not None:
        if dist_info.main:
            print(f"[dora-engine] reference log-probs: reusing {path}", flush=True)
        return cached
    if dist_info.main:
        print(f"[dora-engine] reference log-probs: computing {path} with {reference}", flush=True)
    config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    keep_alive = HfDeepSpeedConfig(config)  # partitioned loading, as for the policy
    model = load_causal_lm(reference, torch_dtype(precision))
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=ReferenceLogps(model, cfg), config=config)
    ref = compute_reference(
        engine, data, batch_prompts=cfg.train.micro_batch_prompts, pad_id=pad_id, rank=dist_info.rank,
        world=dist_info.world, progress=progress and dist_info.main, device=engine.device,
    )
    release(engine)
    del keep_alive, model
    if dist_info.local_rank == 0:
        save_cache(path, ref, key)
    dist.barrier()
    return ref


def precompute_reference(cfg: TrainingConfig, *, progress: bool = True) -> list[torch.Tensor]:
    """``dora-engine ref-logps``: fill the reference cache of the train (and eval) data of ``cfg``."""
    if not cfg.needs_reference:
        raise TrainingError(f"loss {cfg.loss.name!r} in stage {cfg.stage!r} uses no reference log-probs")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    splits = [load_data(cfg, tokenizer, cfg.data.train, progress)]
    if cfg.data.eval:
        splits.append(load_data(cfg, tokenizer, cfg.data.eval, progress, splits[0]))
    dist_info = init_distributed()
    ds_config = build_deepspeed_config(cfg, dist_info.world)
    return [ensure_reference(cfg, data, ds_config, dist_info, pad_id, progress) for data in splits]
