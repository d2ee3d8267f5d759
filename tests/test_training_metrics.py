"""Per-step alignment statistics against values written out by hand, and their reduction over ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from dora_engine.ops import DoRAOutput
from dora_engine.preference import data_parallel_group
from dora_engine.rows import IGNORE_INDEX
from dora_engine.training.metrics import StepAccumulator, align_stats
from dora_engine.training.model import StepOutput


def _step(seq_logps: list[float], seq_lens: list[int], weights: list[float]) -> StepOutput:
    S, L = torch.tensor(seq_logps), torch.tensor(seq_lens)
    out = DoRAOutput(torch.tensor(0.0), torch.zeros(len(weights)), S, L, torch.tensor(weights))
    return StepOutput(torch.tensor(0.0), torch.tensor(0.0), S, L, out)


def test_align_stats_picks_best_and_worst_by_score():
    # prompt 0: best is response 2, worst response 1
    # prompt 1: the scores tie at the top, and the tie goes to list order: best is response 0, worst response 2
    step = _step([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], [1, 2, 4, 1, 1, 2], [0.25, 0.75])
    batch = {"scores": torch.tensor([[0.5, 0.1, 0.9], [2.0, 2.0, 1.0]]), "h_tilde": torch.tensor([1.5, 0.5])}

    simpo = align_stats(step, batch, "simpo", {"beta": 2.0})  # reward β·S/L, no reference
    chosen, rejected = 2.0 * -3.0 / 4 + 2.0 * -4.0 / 1, 2.0 * -2.0 / 2 + 2.0 * -6.0 / 2
    sums = simpo["sums"]
    assert sums["rewards/chosen"].item() == pytest.approx(chosen)
    assert sums["rewards/rejected"].item() == pytest.approx(rejected)
    assert sums["rewards/margins"].item() == pytest.approx(chosen - rejected)
    assert sums["rewards/accuracies"].item() == 1.0  # prompt 0 only: -1.5 > -2, but -8 < -6
    assert sums["logps/chosen"].item() == pytest.approx(-3.0 + -4.0)
    assert sums["logps/rejected"].item() == pytest.approx(-2.0 + -6.0)
    assert sums["h_tilde/mean"].item() == pytest.approx(2.0)
    assert simpo["count"] == 2
    assert simpo["w_sq"].item() == pytest.approx(0.25**2 + 0.75**2) and simpo["w_max"].item() == 0.75

    batch["ref_logps"] = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -7.0])
    dpo = align_stats(step, batch, "dpo", {"beta": 0.5})  # reward β·(S − S_ref)
    assert dpo["sums"]["rewards/chosen"].item() == pytest.approx(0.5 * (-2.0 + -3.0))
    assert dpo["sums"]["rewards/rejected"].item() == pytest.approx(0.5 * (-1.0 + 1.0))
    assert dpo["sums"]["rewards/accuracies"].item() == 0.0


# --------------------------------------------------------------------------------------------------
# The step accumulator: device tensors, one host read, collectives on the model's device at any world size
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def group_of_one():
    """A one-process gloo group serving the device types given (e.g. "cuda:gloo"), destroyed after the test."""
    made = []

    def start(backend: str) -> None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        made.append(backend)

    yield start
    if made:
        dist.destroy_process_group()


def _micro_steps(device: torch.device, n: int = 3, seed: int = 0) -> list[tuple[StepOutput, torch.Tensor, dict]]:
    """``n`` micro-steps of B = 2 prompts × K = 3 responses with random statistics in float32, as a run has."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n):
        S = -torch.rand(6, generator=gen) * 10
        L = torch.randint(1, 8, (6,), generator=gen)
        w = torch.rand(2, generator=gen)
        out = DoRAOutput(torch.rand((), generator=gen), torch.zeros(2), S, L, w / w.sum())
        step = StepOutput(out.loss, out.loss, S, L, out)
        batch = {"scores": torch.rand(2, 3, generator=gen), "h_tilde": torch.rand(2, generator=gen) + 0.5,
                 "ref_logps": -torch.rand(6, generator=gen) * 10, "attention_mask": torch.ones(6, 5, dtype=torch.int64)}
        stats = align_stats(step, batch, "dpo", {"beta": 0.5})
        moved = (
            StepOutput(*(t.to(device) for t in step[:4]), None),
            batch["attention_mask"].sum().to(device),
            {"sums": {k: v.to(device) for k, v in stats["sums"].items()}, "count": stats["count"],
             "w_sq": stats["w_sq"].to(device), "w_max": stats["w_max"].to(device)},
        )
        steps.append(moved)
    return steps


def _host_metrics(steps: list[tuple[StepOutput, torch.Tensor, dict]]) -> dict[str, float]:
    """The step's metrics computed on the host with Python floats, micro-step by micro-step (the oracle)."""
    losses, sums, count, inv_ess, weight_max, tokens = [], {}, 0, 0.0, 0.0, 0
    for step, n_tokens, stats in steps:
        losses.append(float(step.value))
        tokens += int(n_tokens)
        for k, v in stats["sums"].items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += stats["count"]
        inv_ess += float(stats["w_sq"])
        weight_max = max(weight_max, float(stats["w_max"]))
    metrics = {"loss": sum(losses) / len(losses), **{k: v / count for k, v in sums.items()}}
    metrics.update({"robust/ess": 1.0 / (inv_ess / len(steps)), "robust/weight_max": weight_max,
                    "tokens": float(tokens)})
    return metrics


def test_accumulated_metrics_equal_the_host_computation_exactly(group_of_one) -> None:
    group_of_one("gloo")
    steps = _micro_steps(torch.device("cpu"))
    acc = StepAccumulator(torch.device("cpu"))
    for step, tokens, stats in steps:
        acc.add(step, tokens, stats)
    metrics, stop = acc.reduce(False)
    assert metrics == _host_metrics(steps) and stop is False  # bit for bit
    assert StepAccumulator(torch.device("cpu")).reduce(True)[1] is True


class _HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (each a synchronisation on an accelerator)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_micro_steps_do_not_read_the_device_and_reduce_reads_it_once(group_of_one) -> None:
    group_of_one("gloo")
    steps = _micro_steps(torch.device("cpu"))
    acc = StepAccumulator(torch.device("cpu"))
    with _HostReads() as reads:
        for step, tokens, stats in steps:
            acc.add(step, tokens, stats)
    assert reads.count == 0
    with _HostReads() as reads:
        acc.reduce(False)
    assert reads.count == 1


def test_collectives_run_at_world_size_one(group_of_one, monkeypatch) -> None:
    """A one-process run makes the collectives of a multi-process run (so one GPU exercises them)."""
    assert data_parallel_group() is None  # no process group: nothing to communicate with
    group_of_one("gloo")
    assert data_parallel_group() is dist.group.WORLD
    calls = []
    real = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        calls.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    acc = StepAccumulator(torch.device("cpu"))
    for step, tokens, stats in _micro_steps(torch.device("cpu")):
        acc.add(step, tokens, stats)
    acc.reduce(False)
    assert len(calls) == 2


def test_step_reductions_run_on_the_models_device(group_of_one, monkeypatch) -> None:
    """Under a group whose backend serves only the model's device type (NCCL: CUDA only) the reductions
    work. On a CPU machine "cuda:gloo" is such a group for a CUDA model, and rejects CPU tensors as NCCL
    does; the model's device is stood in for by ``meta`` (no CUDA here): tensors on it pass through to a
    no-op, every other tensor goes to the real cuda-only group."""
    group_of_one("cuda:gloo")
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(2, dtype=torch.float64))  # what the reduction on CPU tensors met
    model_device = torch.device("meta")
    real, served = dist.all_reduce, []

    def all_reduce(tensor, *args, **kwargs):
        if tensor.device == model_device:
            served.append(tensor.shape)
            return None
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    acc = StepAccumulator(model_device)
    for step, tokens, stats in _micro_steps(model_device):
        acc.add(step, tokens, stats)
    totals = acc.reduced(False)
    assert totals.device == model_device and len(served) == 2


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("strategy", ["dora", "erm"])
def test_the_loss_over_a_group_of_one_equals_the_loss_without(group_of_one, backend: str, strategy: str) -> None:
    """The op's data-parallel path (all-gather of ℓ and h̃, each rank's slice of the gradient) on a world of
    one gives the one-process result bit for bit, in value, weights and gradient."""
    from dora_engine.ops import dora_loss

    group_of_one("gloo")
    gen = torch.Generator().manual_seed(3)
    B, K, T, V = 3, 2, 5, 11
    logits = torch.randn(B * K, T, V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B * K, T), generator=gen)
    labels[:, 0] = IGNORE_INDEX
    inputs = dict(num_responses=K, scores=torch.randn(B, K, generator=gen, dtype=torch.float64),
                  h_tilde=torch.rand(B, generator=gen, dtype=torch.float64) + 0.5, strategy=strategy,
                  ref_logps=-torch.rand(B * K, generator=gen, dtype=torch.float64), loss="dpo", backend=backend)
    results = []
    for group in (None, dist.group.WORLD):
        z = logits.clone().requires_grad_()
        out = dora_loss(z, labels, process_group=group, **inputs)
        out.loss.backward()
        results.append((out.loss.detach(), out.weights, z.grad))
    for without, with_group in zip(*results, strict=True):
        assert torch.equal(without, with_group)


def test_object_gathers_run_at_world_size_one(group_of_one, monkeypatch) -> None:
    """The checkpoint's and the reference cache's verdicts are gathered by a group of one too."""
    from dora_engine.training.process_group import gather_objects

    assert gather_objects({"a": 1}) == [{"a": 1}]  # no process group: nothing to gather
    group_of_one("gloo")
    calls = []
    real = dist.all_gather_object

    def spy(out, obj, *args, **kwargs):
        calls.append(obj)
        return real(out, obj, *args, **kwargs)

    monkeypatch.setattr(dist, "all_gather_object", spy)
    assert gather_objects(("leader", [1, 2])) == [("leader", [1, 2])] and calls == [("leader", [1, 2])]
