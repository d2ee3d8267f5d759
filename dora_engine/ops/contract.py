"""The C++/Python contract of the fused op, asked from the extension when it loads (docs/design.md section 5.6).

The kernels dispatch on the registry's codes (``dora_engine.losses``) and read the parameters by position,
so a loss code, parameter count or need of a reference that drifted between the header
(``csrc/include/dora_math.h``) and the registry would compute another loss than the one asked for. The
extension therefore reports what it was built with (the ``contract`` op of ``csrc/bindings.cpp``: the
response limit, and per code the loss's name, parameter count and need of a reference, the strategy's
name) and its in-place rule (the ``rows_disjoint`` op); ``contract_problems`` compares them with the registry
and refuses the extension with an ``OpLoadError`` that lists every difference. Python mirrors no number:
``OpContract.max_responses`` is the header's ``kMaxResponses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dora_engine.losses import LOSSES, STRATEGIES


@dataclass(frozen=True)
class OpContract:
    """What the loaded extension was built with; list positions are the codes."""

    max_responses: int
    losses: tuple[str, ...]
    loss_param_counts: tuple[int, ...]
    loss_needs_reference: tuple[bool, ...]
    strategies: tuple[str, ...]


def read_contract(kernels: Any) -> OpContract:
    """The contract the extension reports (``torch.ops.dora_engine.contract``)."""
    max_responses, losses, counts, reference, strategies = kernels.contract()
    return OpContract(int(max_responses), tuple(losses), tuple(counts), tuple(reference), tuple(strategies))


def contract_mismatches(contract: OpContract) -> list[str]:
    """How ``contract`` differs from the registry of ``dora_engine.losses`` (empty: they agree)."""
    found = []
    by_code = {spec.code: spec for spec in LOSSES.values()}
    if contract.losses != tuple(by_code[code].name for code in sorted(by_code)):
        found.append(f"loss codes: the extension has {list(contract.losses)}, the registry "
                     f"{[by_code[code].name for code in sorted(by_code)]}")
    for code, name in enumerate(contract.losses):
        spec = LOSSES.get(name)
        if spec is None or spec.code != code:
            continue
        if contract.loss_param_counts[code] != len(spec.param_names):
            found.append(f"loss {name!r}: the extension reads {contract.loss_param_counts[code]} parameters, the "
                         f"registry has {len(spec.param_names)} ({', '.join(spec.param_names)})")
        if contract.loss_needs_reference[code] != spec.needs_reference:
            found.append(f"loss {name!r}: the extension says needs_reference = {contract.loss_needs_reference[code]}, "
                         f"the registry {spec.needs_reference}")
    strategies = tuple(sorted(STRATEGIES, key=lambda name: STRATEGIES[name].code))
    if contract.strategies != strategies or any(STRATEGIES[s].code != i for i, s in enumerate(strategies)):
        found.append(f"strategy codes: the extension has {list(contract.strategies)}, the registry "
                     f"{list(strategies)}")
    if contract.max_responses < 2:
        found.append(f"the extension's response limit is {contract.max_responses} (< 2)")
    return found


def overwritable(logits: torch.Tensor) -> bool:
    """Whether the backward row pass can write over ``logits`` (N, T, V): a unit stride over the vocabulary and
    token rows that do not overlap in memory. The extension's own rule is ``rows_disjoint``; the two are
    compared when it loads (``inplace_rule_mismatches``). Python keeps its copy so that ``torch.compile``
    traces the backward's choice on sizes and strides alone."""
    N, T, V = logits.shape
    if V > 1 and logits.stride(2) != 1:
        return False
    span = V
    for size, stride in sorted(((N, logits.stride(0)), (T, logits.stride(1))), key=lambda d: (d[1], -d[0])):
        if size <= 1:
            continue
        if stride < span:
            return False
        span += stride * (size - 1)
    return True


#: Layouts (sizes, strides) on which ``overwritable`` and the extension's ``rows_disjoint`` must agree: contiguous,
#: sliced views, transposed rows, overlapping rows, broadcast rows, a strided vocabulary and single rows.
PROBE_LAYOUTS = (
    ((2, 3, 5), (15, 5, 1)),
    ((2, 2, 5), (15, 5, 1)),
    ((2, 3, 4), (15, 5, 1)),
    ((2, 3, 5), (5, 10, 1)),
    ((2, 3, 5), (5, 3, 1)),
    ((2, 3, 5), (0, 5, 1)),
    ((2, 3, 5), (15, 0, 1)),
    ((1, 3, 5), (0, 5, 1)),
    ((2, 1, 5), (5, 0, 1)),
    ((2, 3, 5), (30, 10, 2)),
    ((2, 3, 1), (3, 1, 7)),
    ((3, 2, 4), (4, 12, 1)),
    ((3, 2, 4), (4, 11, 1)),
)


def inplace_rule_mismatches(kernels: Any) -> list[str]:
    """The probe layouts on which ``overwritable`` and the extension's ``rows_disjoint`` disagree."""
    found = []
    for sizes, strides in PROBE_LAYOUTS:
        logits = torch.empty_strided(sizes, strides, device="meta")
        ours, theirs = overwritable(logits), bool(kernels.rows_disjoint(logits))
        if ours != theirs:
            found.append(f"in-place rule for sizes {sizes}, strides {strides}: the extension says {theirs}, "
                         f"ops/contract.py {ours}")
    return found


def contract_problems(kernels: Any) -> list[str]:
    """Every way the loaded extension breaks the contract; one entry when it cannot report it (a build older
    than the ``contract`` op)."""
    try:
        contract = read_contract(kernels)
    except (AttributeError, RuntimeError) as err:
        return [f"the extension does not report its contract ({err}); it was built from older sources"]
    return contract_mismatches(contract) + inplace_rule_mismatches(kernels)
