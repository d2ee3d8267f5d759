"""Bad input that used to slip through, and the pieces of safe resume that need no process group.

Each bad input ends ``dora-engine train`` with exit code 2 and one line that names the field, record or
file, and leaves no output folder behind (docs/design.md section 7).
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from training_toy import make_records, make_toy, write_jsonl

from dora_engine import cli
from dora_engine.atomic import TEMPORARY_NAME, atomic_path, atomic_write, remove_stale_temporaries
from dora_engine.data.schema import RecordError, read_records
from dora_engine.errors import UserValueError
from dora_engine.training.checkpoint import META, check_loadable, tensors_only, verify
from dora_engine.training.commands import master_port
from dora_engine.training.config import ConfigError, load_config
from dora_engine.training.process_group import Ranks


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("rel"), n_records=8)


def _train(config: Path, *overrides: str) -> list[str]:
    return ["train", "--config", str(config), *overrides]


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line of a bad-input failure (a progress bar cleared with carriage returns may precede it)."""
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1].strip() for line in err.split("\n")]
    lines = [line for line in lines if line and "[WARNING]" not in line]  # DeepSpeed's import-time notice
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dora-engine train: error: "), lines
    return lines[0]


def _records_file(tmp_path: Path, edit) -> Path:
    records = make_records(6)
    edit(records)
    return write_jsonl(tmp_path / "data.jsonl", records)


# ------------------------------------------------------------------------------------ bad input via the CLI


@pytest.mark.parametrize(
    ("edit", "allow", "expected"),
    [
        (lambda r: r[2]["responses"][1].update(text=""), False,
         "record 2 (id='toy-2'): field 'responses[1].text' is empty"),
        (lambda r: [x["responses"][0].update(text="  ") for x in r], False,
         "record 0 (id='toy-0'): field 'responses[0].text' is empty"),
        (lambda r: r[4].update(h_tilde=1e308), False, "record 4 (id='toy-4'): field 'h_tilde'"),
        (lambda r: r[2]["responses"][1].update(text=""), True, None),  # the documented flag keeps them
    ],
)
def test_bad_records_are_named_before_anything_runs(toy, tmp_path, capsys, edit, allow, expected):
    data = _records_file(tmp_path, edit)
    out = tmp_path / "out"
    overrides = [f"data.train=[{data}]", f"output_dir={out}", f"data.allow_empty_responses={str(allow).lower()}"]
    if expected is None:  # accepted: the data load passes (checked without training)
        from training_toy import build_tokenizer

        from dora_engine.training.loading import load_data

        cfg = load_config(toy, overrides)
        assert len(load_data(cfg, build_tokenizer(tmp_path / "tok"), cfg.data.train, False)) == 6
        return
    assert cli.main(_train(toy, *overrides)) == 2
    line = _one_line(capsys)
    assert expected in line
    assert not out.exists()


def test_invalid_utf8_names_file_and_line(toy, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r) for r in make_records(3)]
    data.write_bytes(("\n".join(lines[:2]) + "\n").encode() + lines[2].replace("w1", "caf\u00e9").encode("latin-1"))
    out = tmp_path / "out"
    assert cli.main(_train(toy, f"data.train=[{data}]", f"output_dir={out}")) == 2
    line = _one_line(capsys)
    assert f"{data}: line 3 is not valid UTF-8" in line
    assert not out.exists()


def test_gzip_is_read_whatever_the_name_and_a_false_gz_is_named(tmp_path):
    records = make_records(3)
    payload = "".join(json.dumps(r) + "\n" for r in records).encode()
    hidden = tmp_path / "data.jsonl"
    hidden.write_bytes(gzip.compress(payload))
    assert [r.id for r in read_records(hidden)] == ["toy-0", "toy-1", "toy-2"]
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_bytes(payload)
    with pytest.raises(RecordError, match=f"{fake}: the name ends in .gz but the file is not gzip-compressed"):
        read_records(fake)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + payload)
    assert len(read_records(bom)) == 3


def test_model_folder_without_a_model_is_named(toy, tmp_path, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "out"
    assert cli.main(_train(toy, f"model.path={empty}", f"output_dir={out}")) == 2
    line = _one_line(capsys)
    assert f"'model.path': folder {empty} is empty" in line
    (empty / "README.md").write_text("weights elsewhere")
    with pytest.raises(ConfigError, match="'model.path': folder .* has none of config.json"):
        load_config(toy, [f"model.path={empty}"])
    with pytest.raises(ConfigError, match="'model.tokenizer': folder .* has none of tokenizer.json"):
        load_config(toy, [f"model.tokenizer={empty}"])
    assert not out.exists()


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_not_in_the_cache_fails_fast_without_a_network(toy, monkeypatch, capsys, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        reason = "offline mode is on (HF_HUB_OFFLINE)"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
        reason = "http://127.0.0.1:9 cannot be reached"
    started = time.monotonic()
    assert cli.main(_train(toy, "model.path=no-such-org/no-such-model-17")) == 2
    assert time.monotonic() - started < 10
    line = _one_line(capsys)
    assert "'model.path': 'no-such-org/no-such-model-17' is neither a local folder nor in the Hugging Face" in line
    assert reason in line


def test_output_dir_is_checked_and_named_first(toy, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(_train(toy, f"output_dir={blocker}")) == 2
    assert f"config key 'output_dir': {blocker} is a file, not a folder" in _one_line(capsys)
    assert cli.main(_train(toy, f"output_dir={blocker / 'run'}")) == 2
    assert f"config key 'output_dir': cannot make {blocker / 'run'}: {blocker} is a file" in _one_line(capsys)
    with pytest.raises(ConfigError, match="'data.ref_cache_dir'"):
        load_config(toy, [f"data.ref_cache_dir={blocker}"])


def test_tensorboard_off_as_yaml_reads_it(toy, tmp_path):
    raw = toy.read_text().replace("tensorboard: 'off'", "tensorboard: off")
    assert "tensorboard: off" in raw
    path = tmp_path / "c.yaml"
    path.write_text(raw)
    assert yaml.safe_load(raw)["logging"]["tensorboard"] is False  # what YAML makes of it
    assert load_config(path).logging.tensorboard == "off"
    assert load_config(path, ["logging.tensorboard=on"]).logging.tensorboard == "on"
    with pytest.raises(ConfigError, match="'logging.wandb' must be true or false"):
        load_config(path, ["logging.wandb=maybe"])


def test_num_procs_port_comes_from_the_flag_the_environment_or_a_free_one(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert master_port(29555) == 29555
    free = {master_port(None) for _ in range(3)}
    assert all(1024 <= p < 65536 for p in free)
    monkeypatch.setenv("MASTER_PORT", "29444")
    assert master_port(None) == 29444 and master_port(29555) == 29555
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(UserValueError, match="MASTER_PORT must be a port number"):
        master_port(None)


# ----------------------------------------------------------------------------------------- temporaries


def test_stale_temporaries_of_our_naming_are_removed_and_nothing_else(tmp_path):
    with atomic_write(tmp_path / "kept.txt") as handle:  # the names our writers make are the ones removed
        handle.write("x")
        (name,) = [p.name for p in tmp_path.iterdir()]
        assert TEMPORARY_NAME.match(name)
    with atomic_path(tmp_path / "kept.pt") as tmp:
        assert TEMPORARY_NAME.match(tmp.name)
        tmp.write_text("y")
    ours = [tmp_path / ".metrics.jsonl.ab12cd34.tmp", tmp_path / ".ref.pt.zz_9yx87.tmp.pt"]  # killed writes' remains
    for path in ours:
        path.write_text("partial")
    (tmp_path / ".final.k2j3h4g5.tmp").mkdir()
    theirs = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / ".x.ABCDEFGH.tmp", tmp_path / "data.jsonl"]
    for path in theirs:
        path.write_text("user's")
    old = time.time() - 3600
    os.utime(ours[0], (old, old))
    assert remove_stale_temporaries(tmp_path, older_than_s=600) == [ours[0]]  # only the old one in a shared folder
    rest = sorted(p.name for p in remove_stale_temporaries(tmp_path))
    assert rest == [".final.k2j3h4g5.tmp", ".ref.pt.zz_9yx87.tmp.pt"]
    assert all(p.exists() for p in theirs) and (tmp_path / "kept.txt").read_text() == "x"
    assert remove_stale_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------ checkpoints


class Payload:
    """Unpickling it creates a file: the side effect a planted checkpoint would have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tag(tmp_path: Path, files: dict[str, object], manifest: bool = True) -> Path:
    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    entries = {}
    for name, obj in files.items():
        torch.save(obj, tag / name)
        data = (tag / name).read_bytes()
        entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta = {"step": 2, "world_size": 1} | ({"files": entries} if manifest else {})
    (tag / META).write_text(json.dumps(meta))
    return tag


def test_weights_only_loading_refuses_a_payload_even_when_the_caller_asks_for_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, path)
    with tensors_only(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed's checkpoint engine calls
    assert check_loadable(path) == ("unsafe", "holds GLOBAL io.open, not only tensors and plain data")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the context restores the environment


def test_verify_names_damaged_unsafe_and_unlisted_files(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "w": torch.arange(4.0)}
    tag = _tag(tmp_path, {"optim_states.pt": state, "model_states.pt": {"module": {"w": torch.ones(3)}}})
    assert verify(tag, Ranks()) == []  # DeepSpeed's own classes are allowed
    data = (tag / "optim_states.pt").read_bytes()
    (tag / "optim_states.pt").write_bytes(data[:-100])
    (tag / "extra.pt").write_bytes(b"")
    problems = [(p.kind, p.message) for p in verify(tag, Ranks())]
    assert problems == [
        ("unsafe", "file extra.pt is not in the manifest; refusing to load it"),
        ("damaged", f"file optim_states.pt has {len(data) - 100} bytes, the manifest says {len(data)}"),
    ]
    (tag / "extra.pt").unlink()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    (tag / "optim_states.pt").write_bytes(bytes(flipped))
    assert [p.message for p in verify(tag, Ranks())] == ["file optim_states.pt differs from the manifest (SHA-256)"]
    (tag / "optim_states.pt").write_bytes(data)
    torch.save({"module": {}, "x": Payload(tmp_path / "ran")}, tag / "model_states.pt")  # manifest left stale
    problems = [(p.kind, p.message.split(" has ")[0]) for p in verify(tag, Ranks())]
    assert problems == [("damaged", "file model_states.pt")]
    assert not (tmp_path / "ran").exists()


def test_checkpoint_without_manifest_is_still_loaded_as_plain_data_only(tmp_path):
    tag = _tag(tmp_path, {"model_states.pt": {"x": Payload(tmp_path / "ran")}}, manifest=False)
    problems = verify(tag, Ranks())
    assert [(p.kind, p.message) for p in problems] == [
        ("unsafe", "file model_states.pt holds GLOBAL io.open, not only tensors and plain data")
    ]
    assert not (tmp_path / "ran").exists()


def test_atomic_writes_give_new_files_the_umask_mode_and_keep_an_existing_mode(tmp_path, monkeypatch):
    import stat

    from dora_engine import atomic

    assert atomic._UMASK == atomic._read_umask()  # read without changing it
    monkeypatch.setattr(atomic, "_UMASK", 0o027)  # the process's umask when dora_engine.atomic was imported
    with atomic_write(tmp_path / "new.txt") as handle:
        handle.write("x")
    with atomic_path(tmp_path / "new.png") as tmp:
        tmp.write_bytes(b"x")
    (tmp_path / "kept.txt").write_text("old")
    (tmp_path / "kept.txt").chmod(0o604)
    with atomic_write(tmp_path / "kept.txt") as handle:
        handle.write("new")
    mode = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("new.txt", "new.png", "kept.txt")}
    assert mode == {"new.txt": 0o640, "new.png": 0o640, "kept.txt": 0o604}
    assert (tmp_path / "kept.txt").read_text() == "new"


class _WritingEngine:
    """Stands in for DeepSpeed's engine in ``CheckpointManager.save``: each rank writes its own shard."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (folder / f"rank{self.rank}_part{i}.bin").write_bytes(bytes([self.rank, i]) * 1000)


def _save_on_two_nodes(rank: int, root: str, shared: bool) -> tuple[list[str], dict]:
    """Rank body: two one-rank nodes save a checkpoint into one shared folder or one folder each; returns
    the files this rank hashed and the manifest its node wrote."""
    from dora_engine.training import checkpoint
    from dora_engine.training.checkpoint import CheckpointManager

    hashed: list[str] = []
    entry = checkpoint.file_entry

    def counting_entry(path: Path) -> dict:
        hashed.append(path.name)
        return entry(path)

    checkpoint.file_entry = counting_entry
    directory = Path(root) / ("shared" if shared else f"node{rank}")
    manager = CheckpointManager(directory, keep=2, ranks=Ranks(rank=rank, local_rank=0, local_size=1, world=2))
    tag = manager.save(_WritingEngine(rank), 1, {"step": 1})
    problems = checkpoint.verify(directory / tag, manager.ranks)
    assert problems == [], problems
    return hashed, json.loads((directory / tag / META).read_text())["files"]


@pytest.mark.multiproc
@pytest.mark.parametrize("shared", [True, False])
def test_checkpoint_hashing_is_spread_over_the_ranks_of_all_nodes(tmp_path, shared):
    """One folder shared by two nodes: each file is hashed once in the whole world (at save and at
    verify), and each node's manifest lists every file. Node-local folders: each node hashes its own."""
    from multiproc import run_gloo

    (hashed0, files0), (hashed1, files1) = run_gloo(_save_on_two_nodes, 2, str(tmp_path), shared)
    if shared:
        everything = sorted(f"rank{r}_part{i}.bin" for r in range(2) for i in range(3))
        assert sorted(files0) == sorted(files1) == everything and files0 == files1
        assert sorted(hashed0 + hashed1) == sorted(everything * 2)  # save + verify, each file once
        assert not set(hashed0) & set(hashed1)
    else:
        assert sorted(files0) == [f"rank0_part{i}.bin" for i in range(3)]
        assert sorted(files1) == [f"rank1_part{i}.bin" for i in range(3)]
        assert sorted(hashed0) == sorted(list(files0) * 2) and sorted(hashed1) == sorted(list(files1) * 2)


def test_process_group_waits_as_long_as_the_config_says(monkeypatch, tmp_path):
    """``train.dist_timeout_minutes`` reaches the process group (DeepSpeed's default is 10 minutes)."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    from dora_engine.training import process_group

    asked: dict = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: asked.update(kwargs))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # records the variable's state, which the teardown restores
        monkeypatch.delenv(name)  # init_distributed sets these for a world of one
    assert process_group.init_distributed(timedelta(minutes=90)) == Ranks()
    assert asked["timeout"] == timedelta(minutes=90)
    toy = make_toy(tmp_path)
    assert load_config(toy).train.dist_timeout_minutes == 60
    with pytest.raises(ConfigError, match="train.dist_timeout_minutes"):
        load_config(toy, ["train.dist_timeout_minutes=0"])


# ------------------------------------------------------------------------------------ a full disk at save


class _FillingEngine:
    """Stands in for DeepSpeed's engine: writes ``size`` bytes with torch.save, or fails with ``error``
    after writing part of them."""

    def __init__(self, size: int, error: BaseException | None = None):
        self.size, self.error = size, error

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.zeros(self.size // 4)}, folder / "model_states.pt")
        if self.error is not None:
            raise self.error


def _manager(directory: Path):
    from dora_engine.training.checkpoint import CheckpointManager

    return CheckpointManager(directory, keep=2, ranks=Ranks(rank=0, local_rank=0, local_size=1, world=1))


def _full_disk_line(directory: Path, err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"No space left on device writing checkpoint {directory / 'step_00000002'} (a "), message
    assert message.endswith(f"the partial checkpoint was removed and checkpoint {directory / 'step_00000001'} stays "
                            "the one to resume from. Free space there, then continue with --resume auto"), message
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000001"]
    return message


@pytest.mark.parametrize("error", ["ENOSPC", "torch writer"])
def test_a_full_disk_at_save_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch, error):
    """An OSError with ENOSPC, or torch's C++ writer error (no errno) on a filesystem with no space left:
    one line naming the folder and the space a checkpoint takes; the partial tag is removed."""
    from dora_engine.errors import TrainingError
    from dora_engine.training import checkpoint

    directory = tmp_path / "checkpoints"
    manager = _manager(directory)
    manager.save(_FillingEngine(3 << 20), 1, {"step": 1})
    written = sum(e["bytes"] for e in json.loads((directory / "step_00000001" / META).read_text())["files"].values())
    if error == "ENOSPC":
        failure: BaseException = OSError(28, "No space left on device")
    else:
        failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(TrainingError) as err:
        manager.save(_FillingEngine(1 << 20, failure), 2, {"step": 2})
    assert f"(a checkpoint takes about {written / (1 << 20):.1f} MB; " in _full_disk_line(directory, err)


def test_another_write_error_is_not_taken_for_a_full_disk(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = _manager(directory)
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        manager.save(_FillingEngine(1 << 10, failure), 1, {"step": 1})
    assert err.value is failure


def test_a_real_full_tmpfs_at_save(tmp_path):
    """A 2 MB tmpfs (where mounting is allowed): torch's own error on the full filesystem becomes the line."""
    import subprocess

    from dora_engine.errors import TrainingError

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        directory = mount / "checkpoints"
        manager = _manager(directory)
        manager.save(_FillingEngine(600 << 10), 1, {"step": 1})
        with pytest.raises(TrainingError) as err:
            manager.save(_FillingEngine(4 << 20), 2, {"step": 2})
        assert "MB free there)" in _full_disk_line(directory, err)
    finally:
        err = None  # its traceback holds torch's writer, whose file keeps the mount busy
        gc.collect()
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)  # detached now, freed once unused
