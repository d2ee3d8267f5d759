"""The vllm backend against a stand-in ``vllm`` module that records how the engine is built and called
(vllm itself needs a GPU): the HF tokenizer and formats, the engine flags of ``eval generate`` and
``data augment``, the seeds of the requests."""

from __future__ import annotations

import sys
import types

import pytest

from dora_engine.cli import main as cli_main
from dora_engine.data.schema import Record, Response, read_records, write_records
from dora_engine.errors import UserValueError
from dora_engine.eval.generate import read_generations
from dora_engine.generation import EVALUATION_SAMPLING, VLLMOptions, make_generator, vllm_load_format


class _Tokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<s>[INST] " + " ".join(m["content"] for m in messages) + " [/INST]"

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [len(word) for word in text.split()]}


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose ``LLM`` records its keyword arguments and answers every request with
    ``"<seed>/<j>"`` for its j-th completion."""
    module = types.ModuleType("vllm")
    module.engines = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.requests = []
            module.engines.append(self)

        def get_tokenizer(self):
            return _Tokenizer()

        def generate(self, requests, params, use_tqdm):
            self.requests += requests
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" {p.seed}/{j} ") for j in range(p.n)])
                    for p in params]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    responses = [Response("a", "golden", 1.0), Response("b", "x", 0.0)]
    write_records(path, [Record(f"r{i}", f"question number {i}", responses) for i in range(3)])
    return path


def test_engine_reads_the_hf_tokenizer_config_and_weights(fake_vllm, tmp_path):
    generator = make_generator("org/model", EVALUATION_SAMPLING, backend="vllm", dtype="bfloat16")
    kwargs = fake_vllm.engines[0].kwargs
    assert kwargs == {"model": "org/model", "dtype": "bfloat16", "tokenizer_mode": "hf", "config_format": "hf",
                      "load_format": "safetensors", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                      "max_model_len": None, "trust_remote_code": False}
    texts = generator.generate(["hi there"], 2, [7])
    assert texts == [["7/0", "7/1"]]
    # the chat template's rendering, as token ids (no second bos)
    assert fake_vllm.engines[0].requests == [{"prompt_token_ids": [9, 2, 5, 7]}]


def test_load_format_of_local_folders(tmp_path):
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    for name in ("consolidated.safetensors", "model-00001-of-00001.safetensors", "params.json", "config.json"):
        (mistral / name).write_text("")
    assert vllm_load_format(str(mistral)) == "safetensors"  # the indexed HF shards, not consolidated.*
    old = tmp_path / "bin_only"
    old.mkdir()
    (old / "pytorch_model.bin").write_text("")
    assert vllm_load_format(str(old)) == "auto"


def test_eval_generate_passes_the_engine_flags(fake_vllm, data, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert cli_main(["eval", "generate", "--model", "m", "--data", str(data), "--output", str(out),
                     "--backend", "vllm", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5",
                     "--max-model-len", "4096"]) == 0
    kwargs = fake_vllm.engines[0].kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["max_model_len"]) == (2, 0.5, 4096)
    assert kwargs["tokenizer_mode"] == "hf"
    assert [g.id for g in read_generations(out)] == ["r0", "r1", "r2"]


def test_data_augment_passes_the_engine_flags(fake_vllm, data, tmp_path):
    out = tmp_path / "aug.jsonl"
    assert cli_main(["data", "augment", str(data), "--out", str(out), "--model", "m", "--n", "2",
                     "--backend", "vllm", "--tensor-parallel-size", "4", "--max-model-len", "2048"]) == 0
    kwargs = fake_vllm.engines[0].kwargs
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["max_model_len"]) == (4, 0.9, 2048)
    assert all(len(r.responses) == 4 for r in read_records(out))


def test_engine_flags_are_refused_without_vllm(data, tmp_path, capsys):
    assert cli_main(["eval", "generate", "--model", "m", "--data", str(data), "--output", str(tmp_path / "g.jsonl"),
                     "--max-model-len", "4096"]) == 2
    assert "--max-model-len apply to --backend vllm only" in capsys.readouterr().err
    with pytest.raises(UserValueError, match="backend 'vllm' only"):
        make_generator("m", EVALUATION_SAMPLING, vllm=VLLMOptions())


@pytest.mark.parametrize("field, value", [("tensor_parallel_size", 0), ("gpu_memory_utilization", 0.0),
                                          ("gpu_memory_utilization", 1.5), ("max_model_len", 0)])
def test_bad_engine_settings_name_the_field(field, value):
    with pytest.raises(UserValueError, match=field):
        VLLMOptions(**{field: value})
