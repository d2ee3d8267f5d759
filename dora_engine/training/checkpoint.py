"""DeepSpeed checkpoints: the data position in client state, a manifest of every file, safe loading,
and the choice of checkpoint for ``--resume`` (docs/design.md section 7.5).

Each checkpoint is a DeepSpeed tag directory ``<output_dir>/checkpoints/step_<N>``. Once every rank has
finished writing a tag, the ranks hash its files (each rank a share: of the whole world when all nodes
see one shared folder, else of its node's files, ``hashing_share``) and the writer records every file's
size and SHA-256 digest, with the step, world size and config, in ``dora_checkpoint.json``. A tag counts
as complete once its ``dora_checkpoint.json`` exists, so a run killed mid-save resumes from the previous
complete checkpoint.

Before anything is loaded, the ranks check the chosen tag against its manifest (every listed file
present with its size and digest, no other file) and open each ``.pt`` file with torch's weights-only
unpickler, which builds tensors and plain data and refuses any other object, allowing only the few
DeepSpeed classes that its state holds (``SAFE_GLOBALS``). DeepSpeed itself reads its files with
``torch.load(weights_only=False)``; ``load`` runs it with the weights-only unpickler forced
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so a checkpoint never runs code, even one whose manifest was
forged along with its payload. The manifest guards integrity (truncated or altered files); the
weights-only load guards against code. Every rank takes part in each check and all see the same verdict,
so a bad file on one rank stops all of them before DeepSpeed's collective load starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import TEMPORARY_NAME, atomic_write
from dora_engine.errors import TrainingError, UserError
from dora_engine.training.data import TrainingData
from dora_engine.training.digests import file_entry
from dora_engine.training.process_group import Ranks, gather_objects

META = "dora_checkpoint.json"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
CLIENT_KEY = "dora_engine"  # our client state lives under one key: DeepSpeed reserves names like skipped_steps
# Config keys a resumed run may change without breaking the identical continuation.
RESUMABLE_CHANGES = ("logging", "checkpoint", "output_dir", "train.max_steps", "train.epochs", "train.eval_every",
                     "train.dist_timeout_minutes", "data.cache_dir", "data.num_proc")
DATA_KEYS = ("data.train", "data.eval")  # may change too with checkpoint.allow_data_change
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
FULL_BELOW = 16 << 20  # free bytes under which a write error without an errno is taken for a full disk
MB = 1 << 20


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used (missing, damaged, or holding more than tensors and plain data);
    the message names the checkpoint and the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(directory: Path) -> list[str]:
    """Tags with a ``dora_checkpoint.json``, newest first."""
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
    return sorted((t for t in tags if (directory / t / META).is_file()), reverse=True)


# ----------------------------------------------------------------------------------------- safe loading


def safe_globals() -> list[Any]:
    """The classes besides tensors and plain data that DeepSpeed's ZeRO-3 checkpoint state holds: the
    stage enum and the loss scaler objects (plain attributes, rebuilt without calling any code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def tensors_only() -> Iterator[None]:
    """Every ``torch.load`` in the block uses the weights-only unpickler, whatever its caller asks for,
    with ``safe_globals()`` allowed."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _unsafe_reason(err: BaseException) -> str | None:
    """What the weights-only unpickler refused (e.g. ``GLOBAL builtins.open``), or None when ``err`` is
    not such a refusal."""
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in str(err):
        return None
    match = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(err))
    if match:
        return match.group(1)
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", str(err))
    return match.group(1).strip() if match else "an object that is not a tensor or plain data"


def _first_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_loadable(path: Path) -> tuple[str, str] | None:
    """Open a checkpoint file as ``load`` will, with the weights-only unpickler; None when it loads, else
    ``("unsafe" | "damaged", reason)``. Memory-mapped: the tensors' bytes are not read."""
    try:
        with tensors_only():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:  # noqa: BLE001 - any failure to read the file is a verdict on the file
        reason = _unsafe_reason(err)
        if reason is not None:
            return "unsafe", f"holds {reason}, not only tensors and plain data"
        return "damaged", f"cannot be read ({_first_line(err)})"
    return None


# ----------------------------------------------------------------------------------------- manifests


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Relative paths of the files DeepSpeed wrote in a tag (everything but our manifest and temporaries)."""
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != META and not TEMPORARY_NAME.match(p.name)
    )


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """A tag's ``dora_checkpoint.json``; a ``CheckpointError`` naming it when it is not a JSON object."""
    path = tag_dir / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return meta


def written_world_size(tag_dir: Path, meta: dict[str, Any]) -> int:
    """The number of ranks that wrote a checkpoint: from its manifest, or the ZeRO optimizer shards."""
    if isinstance(meta.get("world_size"), int):
        return meta["world_size"]
    return len(list(tag_dir.glob("*optim_states.pt")))


@dataclass(frozen=True)
class Problem:
    kind: str  # "damaged" (skipped by --resume auto) or "unsafe" (always an error)
    message: str



def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def hashing_share(tag_dir: Path, names: list[str], ranks: Ranks) -> tuple[list[str], bool]:
    """This rank's share of the files ``names`` of ``tag_dir`` to read, and whether the share is of the
    whole world (collective: every rank calls it with the files it sees).

    When every rank sees the same files (the same names, sizes and modification times: one filesystem
    shared by all nodes), file i goes to rank i mod world, so each file is read once in the whole run.
    Otherwise (node-local folders) each node reads what it sees, file i going to local rank i mod
    local_size."""
    view = [(name, *_size_and_mtime(tag_dir / name)) for name in names]
    views = gather_objects(view)
    if all(v == views[0] for v in views):
        return [name for i, name in enumerate(names) if i % ranks.world == ranks.rank], True
    return ranks.share(names), False


def _size_and_mtime(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def verify(tag_dir: Path, ranks: Ranks) -> list[Problem]:
    """Check a complete tag before loading it (collective: every rank calls it, all get the same list).

    With a manifest: every listed file is present with its size and digest, and no other file is; then
    every ``.pt`` file opens with the weights-only unpickler. Without one (a checkpoint of an older
    version) only the second check runs.
    """
    problems: list[Problem] = []
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as err:
        meta = None
        problems.append(Problem("damaged", str(err)))
    present = checkpoint_files(tag_dir) if meta is not None else []
    expected = meta.get("files") if meta is not None else None
    listed = isinstance(expected, dict)
    if listed and ranks.rank == 0:
        problems += [Problem("damaged", f"file {name} is missing") for name in sorted(set(expected) - set(present))]
        problems += [Problem("unsafe", f"file {name} is not in the manifest; refusing to load it")
                     for name in sorted(set(present) - set(expected))]
    # Every rank takes part in the share, whatever it found: it is a collective.
    share, _ = hashing_share(tag_dir, sorted(set(expected) & set(present)) if listed else present, ranks)
    intact = []
    for name in share:
        if listed:
            want, path = expected[name], tag_dir / name
            size = path.stat().st_size
            if size != want.get("bytes"):
                message = f"file {name} has {size} bytes, the manifest says {want.get('bytes')}"
                problems.append(Problem("damaged", message))
                continue
            if file_entry(path)["sha256"] != want.get("sha256"):
                problems.append(Problem("damaged", f"file {name} differs from the manifest (SHA-256)"))
                continue
        intact.append(name)
    for name in intact:
        if name.endswith(".pt"):
            verdict = check_loadable(tag_dir / name)
            if verdict is not None:
                problems.append(Problem(verdict[0], f"file {name} {verdict[1]}"))
    merged = [p for part in gather_objects(problems) for p in part]
    return sorted(set(merged), key=lambda p: (p.kind != "unsafe", p.message))


def broadcast(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointManager:
    """Saves, prunes, verifies and restores the DeepSpeed engine's state plus the trainer's client state."""

    def __init__(self, directory: Path, *, keep: int, ranks: Ranks):
        self.directory = directory
        self.keep = keep
        self.ranks = ranks
        self.writer = ranks.local_rank == 0  # the local rank 0 of each node writes manifests, prunes

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        tag_dir = self.directory / tag
        if self.writer and tag_dir.exists():  # a skipped (damaged) checkpoint of the same step: start afresh
            (tag_dir / META).unlink(missing_ok=True)  # first, so that the tag stops counting as complete
            shutil.rmtree(tag_dir, ignore_errors=True)  # the writers of several nodes may race here
        _barrier()
        state = {**client_state, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        with self._out_of_space_reported(tag_dir):
            engine.save_checkpoint(str(self.directory), tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
        _barrier()
        share, whole_world = hashing_share(tag_dir, checkpoint_files(tag_dir), self.ranks)
        mine = {name: file_entry(tag_dir / name) for name in share}
        leader = self.ranks.rank - self.ranks.local_rank
        files: dict[str, Any] = {}
        for node, entries in gather_objects((leader, mine)):
            if whole_world or node == leader:
                files.update(entries)
        if self.writer:
            meta = dict(client_state) | {"tag": tag, "world_size": self.ranks.world}
            meta["files"] = dict(sorted(files.items()))
            with self._out_of_space_reported(tag_dir):
                with atomic_write(tag_dir / META) as handle:
                    json.dump(meta, handle, indent=1)
            self._prune(keep_tag=tag)
        _barrier()
        return tag

    @contextlib.contextmanager
    def _out_of_space_reported(self, tag_dir: Path) -> Iterator[None]:
        """Turn a write of ``tag_dir`` that failed for want of space (``out_of_space``) into one line
        naming the folder, the space a checkpoint takes and the one to resume from; the partial tag is
        removed first, so its space is free again and an earlier complete checkpoint stays the latest.
        Any other failure goes on as it is."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            reason = out_of_space(err, tag_dir)
            if reason is None:
                raise
            written = folder_bytes(tag_dir)
            (tag_dir / META).unlink(missing_ok=True)
            shutil.rmtree(tag_dir, ignore_errors=True)
            earlier = [t for t in complete_tags(self.directory) if t != tag_dir.name]
            need = checkpoint_bytes(self.directory / earlier[0]) if earlier else None
            size = f"about {need / MB:.1f} MB" if need else f"more than the {written / MB:.1f} MB written"
            resume = (f"checkpoint {self.directory / earlier[0]} stays the one to resume from" if earlier
                      else "no checkpoint of this run was complete")
            raise TrainingError(
                f"{reason} writing checkpoint {tag_dir} (a checkpoint takes {size}; "
                f"{free_bytes(self.directory) / MB:.1f} MB free there); the partial checkpoint was removed and "
                f"{resume}. Free space there, then continue with --resume auto"
            ) from None

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        complete = [t for t in tags if (self.directory / t / META).is_file()]
        stale = [t for t in complete[: max(len(complete) - self.keep, 0)] if t != keep_tag]
        stale += [t for t in tags if t not in complete and t < keep_tag]  # remains of an interrupted save
        for tag in stale:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    def choose(self, wanted: str, say: Any) -> tuple[str, dict[str, Any]] | None:
        """The checkpoint to resume from, verified (collective), and its manifest; None for a fresh start.

        ``auto``: the newest complete tag that passes ``verify``; damaged ones are skipped with a message
        (``say``) naming the file and why, a file that is not plain data is an error. A named tag must pass.
        """
        tags = broadcast(complete_tags(self.directory) if wanted == "auto" else [wanted])
        if wanted != "auto" and not (self.directory / wanted / META).is_file():
            available = ", ".join(broadcast(complete_tags(self.directory))) or "none"
            raise CheckpointError(
                f"checkpoint {self.directory / wanted} is not a complete checkpoint (complete ones: {available})"
            )
        skipped = []
        for tag in tags:
            problems = verify(self.directory / tag, self.ranks)
            unsafe = [p for p in problems if p.kind == "unsafe"]
            if unsafe:
                raise CheckpointError(f"checkpoint {self.directory / tag}: {unsafe[0].message}; it was not loaded")
            if problems:
                if wanted != "auto":
                    raise CheckpointError(f"checkpoint {self.directory / tag}: {problems[0].message}")
                say(f"skipping checkpoint {self.directory / tag}: {problems[0].message}"
                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
                skipped.append(tag)
                continue
            meta = read_meta(self.directory / tag)
            if "files" not in meta:
                say(f"checkpoint {self.directory / tag} has no manifest (an older version wrote it): "
                    "its files are loaded unverified, as tensors and plain data only")
            return tag, meta
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} (skipped {', '.join(skipped)}); "
                "remove them to start from step 0, or use another output_dir"
            )
        return None

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Restore module, optimizer, scheduler and RNG state; returns the client state. Every file is read
        with the weights-only unpickler (module docstring)."""
        try:
            with tensors_only():
                path, client = engine.load_checkpoint(str(self.directory), tag=tag)
        except pickle.UnpicklingError as err:
            reason = _unsafe_reason(err)
            if reason is None:
                raise
            raise CheckpointError(
                f"checkpoint {self.directory / tag} holds {reason}, not only tensors and plain data; it was not loaded"
            ) from None
        if path is None or CLIENT_KEY not in (client or {}):
            raise CheckpointError(f"could not load checkpoint {self.directory / tag}")
        state = client[CLIENT_KEY]
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
        return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def check_resumable(tag: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A ``TrainingError`` when the config a checkpoint was written with differs from this run's in a key
    that affects the optimisation (any key but ``RESUMABLE_CHANGES``, and ``DATA_KEYS`` when this run sets
    ``checkpoint.allow_data_change``)."""
    allowed = RESUMABLE_CHANGES + (DATA_KEYS if current.get("checkpoint", {}).get("allow_data_change") else ())
    changed = [k for k in config_differences(saved, current) if not k.startswith(allowed)]
    if changed:
        raise TrainingError(
            f"checkpoint {tag} was written with a different configuration ({', '.join(changed)}); "
            "resuming would not continue the same run"
        )


def data_hashes(train: TrainingData, evaluation: TrainingData | None) -> dict[str, str | None]:
    """The content hashes of a run's data files (``TrainingData.data_hash``), recorded in each checkpoint."""
    return {"data.train": train.data_hash, "data.eval": evaluation.data_hash if evaluation is not None else None}


def check_same_data(tag: str, saved: dict[str, Any] | None, current: dict[str, str | None], allow: bool) -> str | None:
    """Compare the data hashes a checkpoint recorded (``saved``; None for a checkpoint written before they
    were) with this run's. Changed content is a ``TrainingError`` naming what changed, or, when ``allow``
    (``checkpoint.allow_data_change``), the warning to print (None when nothing changed)."""
    if not isinstance(saved, dict):
        return None
    changed = [key for key in DATA_KEYS if saved.get(key) != current.get(key)]
    if not changed:
        return None
    what = " and ".join(changed)
    hashes = "; ".join(f"{key}: {_short(saved.get(key))} then, {_short(current.get(key))} now" for key in changed)
    if allow:
        return f"{what} content changed since checkpoint {tag} ({hashes}); continuing on the changed data " \
               "(checkpoint.allow_data_change)"
    raise TrainingError(
        f"{what} content changed since checkpoint {tag} (SHA-256 of the files, {hashes}), so resuming would not "
        "continue the same run; restore the data, start a new output_dir, or set checkpoint.allow_data_change=true "
        "to continue on the changed data"
    )


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none"


def out_of_space(err: BaseException, folder: Path) -> str | None:
    """What made a write in ``folder`` fail when it is a want of space, else None: the message of an
    ``OSError`` with ENOSPC or EDQUOT in ``err`` or its causes; or ``"No space left on device"`` for a
    ``RuntimeError`` of torch's C++ writer (which reports a full disk as ``unexpected pos …`` without an
    errno) while less than ``FULL_BELOW`` bytes are free there, or once another rank that found the disk
    full has removed the folder."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in OUT_OF_SPACE:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and (free_bytes(folder) < FULL_BELOW or not folder.exists()):
        return os.strerror(errno.ENOSPC)
    return None


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the filesystem of ``path`` (or of its nearest existing parent)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return 0


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def checkpoint_bytes(tag_dir: Path) -> int | None:
    """Total size of a complete checkpoint's files, from its manifest (None without one)."""
    with contextlib.suppress(CheckpointError):
        files = read_meta(tag_dir).get("files")
        if isinstance(files, dict):
            return sum(entry.get("bytes", 0) for entry in files.values() if isinstance(entry, dict))
    return None
