"""Loss and strategy codes: the registry (dora_engine/losses.py) against the C++ header (dora_math.h).

The fused kernels dispatch on these integers and read the parameters by position: a registry entry and
an enum value or parameter count that drift apart would compute another loss than the one asked for.
The header is parsed as text (no build needed); the built op is checked too where it loads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dora_engine.losses import LOSSES, STRATEGIES, encode_params, resolve_params

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "dora_math.h"


def strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def cpp_enum(text: str, name: str) -> dict[str, int]:
    """Enumerator -> value of ``enum name`` (implicit values count up from the previous one)."""
    body = re.search(rf"\benum\s+{name}\b[^{{]*\{{(.*?)\}}", text, flags=re.S)
    assert body, f"enum {name} not found"
    values, next_value = {}, 0
    for item in filter(None, (part.strip() for part in body.group(1).split(","))):
        enumerator, _, value = (s.strip() for s in item.partition("="))
        values[enumerator] = next_value = int(value, 0) if value else next_value
        next_value += 1
    return values


def cpp_switch(text: str, function: str) -> dict[str, str]:
    """Case label -> returned expression of the switch in ``function`` (``case a: case b: return x;``)."""
    start = re.search(rf"\b{function}\s*\([^)]*\)\s*\{{", text)
    assert start, f"function {function} not found"
    body = text[start.end() : text.index("\n}", start.end())]
    result, pending = {}, []
    for label, returned in re.findall(r"case\s+(\w+)\s*:|return\s+([^;]+);", body):
        if label:
            pending.append(label)
        else:
            result.update(dict.fromkeys(pending, returned.strip()))
            pending = []
    return result


def registry_name(enumerator: str) -> str:
    """``kRobustDpo`` -> ``robust_dpo``, ``kDpoPl`` -> ``dpo_pl``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enumerator.removeprefix("k")).lower()


@pytest.fixture(scope="module")
def header() -> str:
    return strip_comments(HEADER.read_text())


def test_parsers_follow_the_text() -> None:
    text = "enum LossCode : int { kIpo = 0, kDpoPl, kDpo = 5, kNumLosses };\n" \
           "int count(int code) {\n  switch (code) {\n    case kIpo: case kDpo: return 1;\n    default: return -1;\n" \
           "  }\n}\n"
    assert cpp_enum(text, "LossCode") == {"kIpo": 0, "kDpoPl": 1, "kDpo": 5, "kNumLosses": 6}
    assert cpp_switch(text, "count") == {"kIpo": "1", "kDpo": "1"}
    assert [registry_name(e) for e in ("kRobustDpo", "kDpoPl", "kDrdpo")] == ["robust_dpo", "dpo_pl", "drdpo"]


@pytest.mark.parametrize(
    "enum, registry, count", [("LossCode", LOSSES, "kNumLosses"), ("StrategyCode", STRATEGIES, "kNumStrategies")]
)
def test_codes_match_the_header(header: str, enum: str, registry: dict, count: str) -> None:
    values = cpp_enum(header, enum)
    assert values.pop(count) == len(registry)
    assert {registry_name(e): v for e, v in values.items()} == {name: spec.code for name, spec in registry.items()}


def test_loss_traits_match_the_header(header: str) -> None:
    counts = {registry_name(e): int(v) for e, v in cpp_switch(header, "loss_param_count").items()}
    assert counts == {name: len(spec.param_names) for name, spec in LOSSES.items()}
    reference = {registry_name(e): v == "true" for e, v in cpp_switch(header, "loss_needs_reference").items()}
    assert reference == {name: spec.needs_reference for name, spec in LOSSES.items()}


# ------------------------------------------------------------------------------------------------------
# The same through the built op (CPU kernels)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ops():
    from dora_engine.ops.builder import OpLoadError, load_ops

    try:
        return load_ops()
    except OpLoadError as err:
        pytest.skip(f"fused op unavailable: {err}")


def prompt_inputs(B: int = 3, K: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    S = -torch.rand(B * K, generator=g, dtype=torch.float64) * 20
    L = torch.randint(1, 9, (B * K,), generator=g).double()
    S_ref = -torch.rand(B * K, generator=g, dtype=torch.float64) * 20
    return S, L, S_ref, torch.randn(B, K, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", list(LOSSES))
def test_op_checks_each_loss_code(ops, name: str) -> None:
    spec = LOSSES[name]
    S, L, S_ref, scores = prompt_inputs()
    params = encode_params(name, resolve_params(name))
    ell, dell_dS = ops.prompt_loss(S, L, S_ref, scores, spec.code, params)
    assert torch.isfinite(ell).all() and torch.isfinite(dell_dS).all()  # no code reaches the NaN default
    with pytest.raises(RuntimeError, match=f"takes {len(params)} parameters, got {len(params) + 1}"):
        ops.prompt_loss(S, L, S_ref, scores, spec.code, [*params, 1.0])
    if spec.needs_reference:
        with pytest.raises(RuntimeError, match="needs reference log-probs"):
            ops.prompt_loss(S, L, None, scores, spec.code, params)
    else:
        ops.prompt_loss(S, L, None, scores, spec.code, params)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_op_checks_each_strategy_code(ops, name: str) -> None:
    ell = torch.tensor([0.3, 1.2, -0.4], dtype=torch.float64)
    h = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    outputs = ops.robust_reduce(ell, h, STRATEGIES[name].code, 0.7)
    assert all(torch.isfinite(t).all() for t in outputs)


def test_op_rejects_codes_out_of_range(ops) -> None:
    S, L, S_ref, scores = prompt_inputs()
    with pytest.raises(RuntimeError, match=f"unknown loss code {len(LOSSES)}"):
        ops.prompt_loss(S, L, S_ref, scores, len(LOSSES), [0.1])
    with pytest.raises(RuntimeError, match="unknown strategy code -1"):
        ops.robust_reduce(torch.ones(2, dtype=torch.float64), None, -1, 1.0)


# ------------------------------------------------------------------------------------------------------
# The contract the extension reports at load (dora_engine/ops/contract.py)
# ------------------------------------------------------------------------------------------------------


def test_the_extension_reports_the_registry_and_the_header(ops, header: str) -> None:
    from dora_engine.ops.contract import contract_problems, read_contract

    contract = read_contract(ops)
    assert contract.losses == tuple(sorted(LOSSES, key=lambda name: LOSSES[name].code))
    assert contract.loss_param_counts == tuple(len(LOSSES[name].param_names) for name in contract.losses)
    assert contract.loss_needs_reference == tuple(LOSSES[name].needs_reference for name in contract.losses)
    assert contract.strategies == tuple(sorted(STRATEGIES, key=lambda name: STRATEGIES[name].code))
    assert contract.max_responses == int(re.search(r"kMaxResponses\s*=\s*(\d+)", header).group(1))
    assert contract_problems(ops) == []


class DriftedKernels:
    """The loaded extension with its reported contract edited, as a header that drifted would report it."""

    def __init__(self, ops, rows_disjoint=None, **changes) -> None:
        self.ops, self.changes = ops, changes
        self.rows_disjoint = rows_disjoint or ops.rows_disjoint

    def contract(self):
        fields = dict(zip(("max_responses", "losses", "counts", "reference", "strategies"), self.ops.contract(),
                          strict=True))
        fields.update(self.changes)
        return tuple(fields.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"losses": ["rdpo", "dpo", "ipo", "robust_dpo", "exo", "simpo", "dpo_pl", "rrhf", "lire"]}, "loss codes"),
        ({"counts": [1, 2, 1, 2, 2, 2, 1, 1, 2]}, "loss 'ipo': the extension reads 1 parameters, the registry has 2"),
        ({"reference": [True] * 9}, "loss 'simpo': the extension says needs_reference = True"),
        ({"strategies": ["erm", "dro", "reweight", "dora", "drdpo"]}, "strategy codes"),
        ({"rows_disjoint": lambda logits: True}, "in-place rule for sizes (2, 3, 5), strides (5, 3, 1)"),
    ],
)
def test_a_drifted_contract_is_named(ops, change: dict, message: str) -> None:
    from dora_engine.ops.contract import contract_problems

    problems = contract_problems(DriftedKernels(ops, **change))
    assert any(message in problem for problem in problems), problems


def test_load_refuses_an_extension_that_breaks_the_contract(ops, monkeypatch) -> None:
    from dora_engine.ops import builder, contract

    monkeypatch.setattr(builder, "_state", builder.SimpleNamespace(ops=None, source=None, build=None, failure=None))
    monkeypatch.setattr(builder, "_load_library", lambda verbose: ("test build", None))
    monkeypatch.setattr(contract, "read_contract", lambda kernels: contract.OpContract(64, ("dpo",), (1,), (True,),
                                                                                          ("erm",)))
    with pytest.raises(builder.OpLoadError, match="disagrees with dora_engine/losses.py: loss codes"):
        builder.load_ops()
    with pytest.raises(builder.OpLoadError, match="loss codes"):  # remembered
        builder.load_ops()


# ------------------------------------------------------------------------------------------------------
# docs/design.md section 4's tables against the registry
# ------------------------------------------------------------------------------------------------------

DESIGN = HEADER.parents[2] / "docs" / "design.md"


def doc_table(text: str, first_header: str) -> list[list[str]]:
    """The body rows (cells, stripped) of the Markdown table whose header row starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{re.escape(first_header)}\s*\|", line))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def quoted(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_design_tables_follow_the_registry() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    losses = doc_table(text, "loss | ℓ_b")
    assert [quoted(row[0])[0] for row in losses] == list(LOSSES)
    for row in losses:
        name = quoted(row[0])[0]
        assert ("no reference" in row[1]) == (not LOSSES[name].needs_reference), name
    params = {}
    for row in doc_table(text, "loss | `loss_params` (kernel order)"):
        params.update(dict.fromkeys(quoted(row[0]), tuple(quoted(row[1]))))
    assert params == {name: spec.param_names for name, spec in LOSSES.items()}
    assert [quoted(row[0])[0] for row in doc_table(text, "strategy | ℒ")] == list(STRATEGIES)
