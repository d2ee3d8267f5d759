"""Hostile or unlucky input that must not run code, leak a secret, hang or show a traceback
(docs/design.md section 7): remote model code, output permissions, the HTTP judge's deadlines and
redaction, and one-line messages for bad data, templates and overrides."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch
from training_toy import build_tokenizer

from dora_engine import atomic
from dora_engine.atomic import atomic_path, atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- output permissions ---------------------------------------------------------------------------------


def test_a_link_to_a_setuid_file_is_replaced_not_followed_and_gets_a_new_files_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o4777)
    link = tmp_path / "out.jsonl"
    link.symlink_to(victim)
    with atomic_write(link) as handle:
        handle.write("new")
    assert not link.is_symlink() and link.read_text() == "new" and _mode(link) == 0o644
    assert victim.read_text() == "keep" and _mode(victim) == 0o4777


def test_an_existing_file_keeps_its_permissions_but_never_setuid_setgid_or_sticky(tmp_path):
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"old")
    kept.chmod(0o7751)
    with atomic_path(kept) as tmp:
        tmp.write_bytes(b"new")
    assert _mode(kept) == 0o751 and kept.read_bytes() == b"new"


def test_an_export_folder_and_its_weights_get_the_umask_modes(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from dora_engine.training.export import write_export

    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    tokenizer = build_tokenizer(tmp_path / "tok")
    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1)
    final = write_export(tmp_path / "run" / "final", {"w": torch.zeros(2)}, config, tokenizer, {"stage": "sft"})
    modes = {p.name: _mode(p) for p in [final, *final.iterdir()]}
    assert modes["final"] == 0o755 and modes["model.safetensors"] == 0o644
    assert set(modes.values()) <= {0o755, 0o644}, modes


# --- bad input: one line naming the record, file, key or override ---------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from training_toy import make_toy

    return make_toy(tmp_path_factory.mktemp("sec"), n_records=6)


def _train_error(capsys: pytest.CaptureFixture[str], config: Path, *overrides: str) -> str:
    """The one line of a ``dora-engine train`` that fails on bad input (exit code 2)."""
    from dora_engine import cli

    assert cli.main(["train", "--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1].strip() for line in err.split("\n")]
    lines = [line for line in lines if line and "[WARNING]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dora-engine train: error: "), lines
    return lines[0]


def test_a_chat_template_that_rejects_a_role_names_the_record(toy, tmp_path, capsys):
    import json
    import shutil

    from training_toy import make_records, write_jsonl

    model = tmp_path / "model"
    shutil.copytree(toy.parent / "model", model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                 "{{ raise_exception('System role not supported') }}{% endif %}"
                                 "{{ m['content'] }}{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    records = make_records(4)
    records[2]["prompt"] = [{"role": "system", "content": "w1"}, {"role": "user", "content": records[2]["prompt"]}]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    line = _train_error(capsys, toy, f"model.path={model}", f"data.train=[{data}]", f"output_dir={tmp_path / 'out'}",
                        f"data.cache_dir={tmp_path / 'cache'}")
    assert "record 2 (id='toy-2')" in line and "System role not supported" in line and str(model) in line


@pytest.mark.parametrize("key", ["data.train", "data.eval"])
def test_an_empty_data_file_is_named_with_its_key(toy, tmp_path, capsys, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _train_error(capsys, toy, f"{key}=[{empty}]", f"output_dir={tmp_path / 'out'}",
                        f"data.cache_dir={tmp_path / 'cache'}")
    assert f"{key}: no records in {empty}" in line


@pytest.mark.parametrize("override", ["data.train=[/tmp/a.jsonl", "train.lr=!!python/object/apply:os.system ['true']"])
def test_an_override_that_is_not_yaml_is_one_line_naming_it(toy, capsys, override):
    line = _train_error(capsys, toy, override)
    assert f"override {override!r}: the value is not valid YAML" in line


# --- remote code -----------------------------------------------------------------------------------------


def _folder_with_its_own_code(root: Path, toy_model: Path) -> Path:
    """A copy of ``toy_model`` given its own code (``_give_its_own_code``)."""
    import shutil

    folder = root / "custom"
    shutil.copytree(toy_model, folder)
    return _give_its_own_code(folder)


def _give_its_own_code(folder: Path) -> Path:
    """``folder``'s config made to map a model type transformers lacks to the folder's own Python, which
    leaves a file ``RAN`` beside itself when imported."""
    import json

    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "configuration_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder


def test_no_loader_calls_from_pretrained_but_the_one_that_sets_trust_remote_code():
    package = Path(__file__).resolve().parents[1] / "dora_engine"
    callers = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if ".from_pretrained(" in p.read_text(encoding="utf-8")]
    assert callers == ["hf_loading.py"]


def test_a_folder_with_its_own_code_is_refused_by_every_loader_and_nothing_runs(toy, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from dora_engine.generation import EVALUATION_SAMPLING, make_generator
    from dora_engine.hf_loading import RemoteCodeError, load_pretrained
    from dora_engine.training.model import load_causal_lm, model_vocab_size

    folder = _folder_with_its_own_code(tmp_path, toy.parent / "model")
    expected = f"{folder}: config.json 'auto_map' (model_type 'custom_llama') asks to run the model's own Python code"
    for load in (lambda: model_vocab_size(str(folder), trust_remote_code=False),
                 lambda: load_causal_lm(str(folder), torch.float32, trust_remote_code=False),
                 lambda: load_pretrained(AutoConfig, str(folder), trust_remote_code=False),
                 lambda: load_pretrained(AutoTokenizer, str(folder), trust_remote_code=False),
                 lambda: make_generator(str(folder), EVALUATION_SAMPLING, device="cpu")):
        with pytest.raises(RemoteCodeError) as caught:
            load()
        assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    assert not (folder / "RAN").exists()


def test_the_opt_in_runs_the_folders_code(toy, tmp_path):
    from transformers import AutoConfig

    from dora_engine.hf_loading import load_pretrained

    folder = _folder_with_its_own_code(tmp_path, toy.parent / "model")
    assert type(load_pretrained(AutoConfig, str(folder), trust_remote_code=True)).__name__ == "CustomConfig"


def test_train_and_generate_refuse_such_a_folder_in_one_line(toy, tmp_path, capsys):
    from dora_engine import cli

    folder = _folder_with_its_own_code(tmp_path, toy.parent / "model")
    line = _train_error(capsys, toy, f"model.path={folder}", f"output_dir={tmp_path / 'out'}")
    assert f"{folder}: config.json 'auto_map'" in line and "model.trust_remote_code: true" in line
    data = tmp_path / "prompts.jsonl"
    data.write_text((toy.parent / "train.jsonl").read_text().splitlines()[0] + "\n")
    code = cli.main(["eval", "generate", "--model", str(folder), "--data", str(data),
                     "--output", str(tmp_path / "g.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--trust-remote-code" in err[0], err
    assert not (folder / "RAN").exists()


class _Recorded(Exception):
    """Raised by the recording loader below, so that nothing is loaded."""


def _command_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line of a command that fails on bad input (exit code 2)."""
    from dora_engine import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1].strip() for line in err.split("\n")]
    lines = [line for line in lines if line and "[WARNING]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def commands_loading(toy, tmp_path) -> tuple[Path, dict[str, list[str]]]:
    """A model folder with its own code, and the command lines that load it as their model: a generator
    (``data augment``), a reward model (``data score``), a calibration encoder (``calibrate``, ``calibrate
    --apply`` of a calibration fitted on the folder before it had its own code, ``eval calibration``)."""
    import json
    import shutil

    from training_toy import make_records, write_jsonl

    from dora_engine import cli

    folder = tmp_path / "custom"
    shutil.copytree(toy.parent / "model", folder)
    data = write_jsonl(tmp_path / "data.jsonl", make_records(12))
    new_prompts = write_jsonl(tmp_path / "new.jsonl", make_records(4, seed=1))
    fit = ["calibrate", str(data), "--out", str(tmp_path / "h.jsonl"), "--target", "chosen", "--backbone",
           str(folder), "--folds", "2", "--min-examples", "1", "--device", "cpu"]
    calibration = tmp_path / "h-calibration"
    assert cli.main(fit) == 0 and (calibration / "calibration.json").is_file()
    _give_its_own_code(folder)
    generations = tmp_path / "generations.jsonl"
    generations.write_text("".join(json.dumps({"instruction": f"w{i}", "output": f"w{i + 1}", "reward": i}) + "\n"
                                   for i in range(3)))
    return folder, {
        "data augment": ["data", "augment", str(data), "--out", str(tmp_path / "a.jsonl"), "--model", str(folder),
                         "--n", "1", "--device", "cpu"],
        "data score": ["data", "score", str(data), "--out", str(tmp_path / "s.jsonl"), "--model", str(folder),
                       "--device", "cpu"],
        # other data than the fit above, whose features this process keeps
        "calibrate": ["calibrate", str(new_prompts), "--out", str(tmp_path / "h2.jsonl"), *fit[4:]],
        "calibrate --apply": ["calibrate", str(new_prompts), "--out", str(tmp_path / "n.jsonl"), "--apply",
                              str(calibration), "--device", "cpu"],
        "eval calibration": ["eval", "calibration", "--model", f"m={generations}", "--classifier", str(calibration),
                             "--output-dir", str(tmp_path / "diag"), "--device", "cpu"],
    }


@pytest.mark.parametrize("command", ["data augment", "data score", "calibrate", "calibrate --apply",
                                     "eval calibration"])
def test_every_command_that_loads_a_model_refuses_its_code_in_one_line_and_opts_in_with_the_flag(
        commands_loading, capsys, monkeypatch, command):
    from dora_engine import cli, hf_loading

    folder, commands = commands_loading
    argv = commands[command]
    line = _command_error(capsys, argv)
    assert f"{folder}: config.json 'auto_map' (model_type 'custom_llama')" in line, line
    assert "--trust-remote-code" in line and "Traceback" not in line
    assert not (folder / "RAN").exists()

    seen: list[tuple[str, bool]] = []

    def record(source, trust_remote_code: bool) -> None:
        seen.append((str(source), trust_remote_code))
        raise _Recorded

    monkeypatch.setattr(hf_loading, "refuse_remote_code", record)
    with pytest.raises(_Recorded):
        cli.main([*argv, "--trust-remote-code"])
    assert seen == [(str(folder), True)], seen


# --- the HTTP judge: deadlines and redaction ----------------------------------------------------------------


class _SlowServer:
    """A chat endpoint on 127.0.0.1 that sends its headers at once and then one byte of body every
    ``every_s`` seconds (``every_s`` None: never answers at all), or, with ``echo``, a 401 whose body
    echoes the request in encoded forms."""

    def __init__(self, every_s: float | None = None, echo: bool = False):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                import base64
                import json
                import urllib.parse

                self.rfile.read(int(self.headers["Content-Length"]))
                server.requests += 1
                if echo:
                    auth = self.headers["Authorization"]
                    key = auth.split(" ", 1)[1]
                    body = json.dumps({"seen": [urllib.parse.quote(key, safe=""), json.dumps(key),
                                                base64.b64encode(auth.encode()).decode(),
                                                base64.b64encode(key.encode()).decode()]}).encode()
                    self.send_response(401)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if every_s is None:
                    server.stop.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                while not server.stop.wait(every_s):
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _judge(url: str, tmp_path: Path, **options):
    from dora_engine.eval.http_judge import ChatJudge, ChatOptions

    return ChatJudge("m", ChatOptions(base_url=url, api_key="sk-live-0123456789abcdef", cache_dir=tmp_path,
                                      backoff_s=0.001, **options))


def _pairs(n: int):
    from dora_engine.eval.comparison import Comparison

    return [Comparison(f"id{i}", f"prompt {i}", "x", "y") for i in range(n)]


def test_a_reply_that_trickles_in_is_cut_off_at_the_requests_deadline(tmp_path):
    import time

    from dora_engine.eval.http_judge import JudgeEndpointError

    server = _SlowServer(every_s=0.2)
    try:
        judge = _judge(server.url, tmp_path, timeout_s=5, request_deadline_s=1.0, max_retries=0)
        started = time.monotonic()
        with pytest.raises(JudgeEndpointError, match="deadline"):
            judge.judge(_pairs(1))
        assert time.monotonic() - started < 3
    finally:
        server.close()


def test_the_run_deadline_and_consecutive_failures_stop_the_run_early(tmp_path):
    import time

    from dora_engine.eval.http_judge import JudgeEndpointError

    server = _SlowServer(every_s=None)
    try:
        judge = _judge(server.url, tmp_path, timeout_s=0.3, max_retries=5, workers=2, run_deadline_s=1.5,
                       max_consecutive_failures=1000)
        started = time.monotonic()
        with pytest.raises(JudgeEndpointError, match="--timeout"):
            judge.judge(_pairs(40))
        assert time.monotonic() - started < 4
        judge = _judge(server.url, tmp_path, timeout_s=0.2, max_retries=5, workers=2, max_consecutive_failures=3)
        before = server.requests
        with pytest.raises(JudgeEndpointError, match="3 failed attempts in a row"):
            judge.judge(_pairs(40))
        assert server.requests - before <= 4  # the two workers' attempts in flight when the third failure came
    finally:
        server.close()


def test_the_keys_encoded_forms_and_the_urls_password_are_redacted(tmp_path):
    from dora_engine.eval.http_judge import JudgeEndpointError

    server = _SlowServer(echo=True)
    try:
        url = server.url.replace("http://", "http://alice:s3cret-pass@")
        with pytest.raises(JudgeEndpointError) as caught:
            _judge(url, tmp_path, max_retries=0).judge(_pairs(1))
    finally:
        server.close()
    message = str(caught.value)
    assert "HTTP 401" in message and "alice:[redacted]@127.0.0.1" in message
    for leaked in ("s3cret-pass", "0123456789abcdef", "c2stbGl2", "QmVhcmVy"):  # base64 of "sk-liv…", "Bearer"
        assert leaked not in message, message
