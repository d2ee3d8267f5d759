"""End to end against what users would pick instead: TRL's ``DPOTrainer``, our TRL adapter and our trainer.

Every variant trains the same tiny Llama (H = 512, 4 layers, fp32, no gradient checkpointing) on the
same tokens: 4 prompts × K = 2 responses per step, every row exactly 256 tokens (a 64-token prompt,
191 response tokens and EOS), the same 4 prompts every step, AdamW at the same lr (constant, no weight
decay, gradient clipping at 1.0; torch's fused AdamW everywhere, Hugging Face's default optimizer and our
trainer's). The policy is the reference model plus a little noise, so that the
log-ratios ρ = S − S_ref are not 0 and the step-1 loss depends on every token. Reference log-probs are
precomputed for every variant; no variant holds a reference model while it trains.

Variants:
  trl_dpo            TRL ``DPOTrainer``, ``loss_type="sigmoid"`` (the DPO loss), ``precompute_ref_log_probs``
  trl_liger_dpo      the same ``DPOTrainer`` with its loss computed by Liger's chunked fused-linear preference loss
                     and Liger's sigmoid DPO on the last hidden states and the lm_head weight (the logits of one
                     pair of rows at a time) and TRL's precomputed reference log-probs (``liger_dpo_trainer``;
                     TRL 1.16 has no Liger flag for DPO); listed as skipped when ``liger_kernel`` does not
                     import (``pip install .[peers]``)
  adapter_erm        ``dora_engine.integrations.trl.DoRADPOTrainer``, ``dora_loss="dpo"``, ``dora_strategy="erm"``
  adapter_dora       the same, ``dora_strategy="dora"``, ``dora_lam=1`` (set here: the training default
                     ``TRAINING_LAM`` is 4), h̃ from the data divided by its mean (``dora_h_scale``'s default
                     ``dataset``)
  ours_dpo_erm       ``dora-engine train``'s path: ``Trainer.from_config(load_config(yaml))`` and its
                     ``train_step`` (DeepSpeed ZeRO-3, one process), loss ``dpo``, strategy ``erm``
  ours_dpo_pl_dora   the same, loss ``dpo_pl``, strategy ``dora``, ``robust.lam: 1`` (set here, as for adapter_dora),
                     ``robust.h_scale`` its default ``dataset``
  ours_sft           the same trainer, stage ``sft`` on the same 8 rows per step (every response a target)

For the TRL variants the reference model is passed as ``ref_model`` with ``precompute_ref_log_probs=True``;
once TRL has precomputed, the bench drops that model (from the trainer and from accelerate's list of
prepared models, checked freed through a weak reference), as TRL does itself when it loads the reference
only to precompute. Our trainer computes (and caches) the reference pass before it loads the policy.

Each variant runs in its own subprocess, ``--rounds`` times, the order of the variants rotated by one
each round (a slow spell of a shared machine then hits every variant alike). Reported per variant:

- s/step and tokens/s: median and range over the steps after ``--warmup`` of every round. A step is one
  optimizer step (forward, backward, clipping, AdamW): our trainer's ``train_step``; for TRL, from the
  Trainer callback ``on_step_begin`` to ``on_step_end``. tokens/step is the batch's attention-mask sum.
- × GEMM: median s/step ÷ the model's GEMM time, a floor measured on this machine in its own subprocess
  (``gemm_floor``): for every linear layer of the model (q, k, v, o, gate, up, down per layer) on the
  M = rows × T tokens of a step, and the lm_head (V × H) on the positions whose next token is scored
  (rows × response tokens), the three products of a linear layer's forward and backward with
  ``torch.mm``: Y = X Wᵀ (M×in · in×out), dX = dY W, dW = dYᵀ X; and per layer the two attention
  products per row and head with ``torch.bmm`` (Q Kᵀ, P V), three each likewise. Best of 3 passes in
  each round, the best over the rounds (a loaded spell of a shared machine only slows it). Nothing else
  (softmax, norms, the embedding's backward, the optimizer) is in it, so on an idle machine every ratio
  is > 1.
- peak MiB: the process's peak resident set (``ru_maxrss``) over its whole life, setup included;
  step MiB: the peak resident set while the steps ran (the kernel's high-water mark reset with
  ``/proc/self/clear_refs`` just before the first step); base MiB: the resident set just before the first
  step, with the model built and its weights read (TRL: ``on_train_begin``, its optimizer made, states not
  yet; ours: after ``Trainer.from_config``, the ZeRO-3 partitions made). step − base is what the steps add.
  Maximum over the rounds. CPU memory only: on a GPU the numbers would be the CUDA allocator's.
- step-1 loss: the loss of the first step, which variants computing the same loss must agree on within
  fp32 rounding (``LOSS_RTOL``); a row that does not is marked "not the same work". Groups: the
  sigmoid DPO loss under ERM (TRL, TRL + Liger, adapter erm, ours dpo erm); DPO under DoRA (adapter dora,
  ours dpo_pl dora: Plackett-Luce with K = 2 is DPO); SFT alone.

Full run (the machine should be otherwise idle; writes benchmarks/results/peers_v<V>.json):
    python benchmarks/bench_peers.py                       # V = 32000 and 128256, 3 rounds × 6 steps
    python benchmarks/bench_peers.py --vocab 128256 --results   # and the section in benchmarks/RESULTS.md
Quick (CI; tiny model, one round, prints the table, writes JSON only with --out):
    python benchmarks/bench_peers.py --quick [--out DIR]
Where each variant's memory goes (each variant once, no timings; writes peers_trace_v<V>.json): the operators of
its last step that allocate at least 32 MiB, with the code (ours, DeepSpeed's, TRL's, torch's collectives) that
called them (``memory_trace.py``):
    python benchmarks/bench_peers.py --vocab 128256 --steps 2 --trace 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # bench_train's and memory_trace's functions, imported where used
    sys.path.insert(0, str(ROOT / "benchmarks"))
VARIANTS = ("trl_dpo", "trl_liger_dpo", "adapter_erm", "adapter_dora", "ours_dpo_erm", "ours_dpo_pl_dora", "ours_sft")
FLOOR = "gemm_floor"
#: The loss each variant computes: variants of one group must agree on the step-1 loss.
LOSS_GROUP = {"trl_dpo": "dpo/erm", "trl_liger_dpo": "dpo/erm", "adapter_erm": "dpo/erm", "ours_dpo_erm": "dpo/erm",
              "adapter_dora": "dpo/dora", "ours_dpo_pl_dora": "dpo/dora", "ours_sft": "sft"}
#: fp32 rounding allowed between two step-1 losses of a group (relative): the log-probs S are sums of
#: ~10³ terms of size ~10 taken in different orders (chunked or not), so S differs in its ~6th digit.
LOSS_RTOL = 1e-4
K = 2
NOISE = 0.02  # std of the noise that makes the policy from the reference


@dataclass(frozen=True)
class Setup:
    """One model size and the work of a step; ``work`` holds the models, data and configs."""

    work: str
    vocab: int
    hidden: int = 512
    layers: int = 4
    seq: int = 256
    prompts: int = 4
    steps: int = 6
    lr: float = 1e-5

    @property
    def prompt_tokens(self) -> int:
        return self.seq // 4

    @property
    def rows(self) -> int:
        return self.prompts * K


# --------------------------------------------------------------------------------------------------
# Inputs: models, data, configs
# --------------------------------------------------------------------------------------------------


def prepare(s: Setup) -> None:
    """reference/ and policy/ (reference + N(0, NOISE²) noise), train.jsonl (our schema) and trl.jsonl
    (prompt / chosen / rejected / h_tilde, the same texts), and the YAML configs of our variants."""
    import torch
    import yaml
    from bench_train import build_model, write_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(s.work)
    build_model(work / "reference", s.vocab, s.hidden, s.layers)
    model = AutoModelForCausalLM.from_pretrained(work / "reference", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * NOISE)
    model.save_pretrained(work / "policy")
    AutoTokenizer.from_pretrained(work / "reference").save_pretrained(work / "policy")
    write_data(work / "train.jsonl", s.prompts, K, s.seq, s.vocab)
    with open(work / "trl.jsonl", "w", encoding="utf-8") as out:
        for line in (work / "train.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            ranked = sorted(record["responses"], key=lambda r: -r["score"])
            # TRL appends EOS to a completion that does not end with it; with the word-level tokenizer it must
            # stand apart to be its own token
            out.write(json.dumps({"prompt": record["prompt"], "chosen": f" {ranked[0]['text']} </s>",
                                  "rejected": f" {ranked[1]['text']} </s>", "h_tilde": record["h_tilde"]}) + "\n")
    base = {
        "model": {"path": str(work / "policy"), "reference": str(work / "reference")},
        "data": {"train": [str(work / "train.jsonl")], "max_prompt_tokens": s.seq, "max_response_tokens": s.seq,
                 "cache_dir": str(work / "tokenised")},
        "train": {"micro_batch_prompts": s.prompts, "lr": s.lr, "max_steps": s.steps, "schedule": "constant",
                  "precision": "fp32", "seed": 0},
        "logging": {"tensorboard": "off"}, "checkpoint": {"export": False}, "output_dir": str(work / "unused"),
    }
    configs = {
        "ours_dpo_erm": {"stage": "align", "loss": {"name": "dpo"}, "robust": {"strategy": "erm"}},
        "ours_dpo_pl_dora": {"stage": "align", "loss": {"name": "dpo_pl"}, "robust": {"strategy": "dora", "lam": 1.0}},
        "ours_sft": {"stage": "sft", "data": {**base["data"], "target_source": "*"},
                     "train": {**base["train"], "micro_batch_prompts": s.rows}},
    }
    for name, extra in configs.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump({**base, **extra}), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Memory of this process
# --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Reset the kernel's high-water mark of the resident set (VmHWM) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_bytes() -> int:
    """The peak resident set since the last ``reset_peak`` (since the start without one)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) * 1024


def life_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepClock:
    """Times the steps and measures the step phase's memory: ``begin_phase`` before the first step. With
    ``trace_mib`` it also traces the last of ``steps`` steps: its operators allocating at least that many MiB and
    the code that called them (``memory_trace.AllocationTrace``; the profiler slows that step)."""

    def __init__(self, steps: int, trace_mib: float | None = None) -> None:
        self.times: list[float] = []
        self.base = 0
        self._start = 0.0
        self._steps = steps
        self._trace_mib = trace_mib
        self._trace = None

    def begin_phase(self, model=None) -> None:
        """Take the base and reset the high-water mark; ``model``'s weights are read first, so that pages of
        a weights file mapped but not yet read count in the base as loaded weights."""
        if model is not None:
            for p in model.parameters():
                float(p.detach().sum())
        gc.collect()
        self.base = rss_bytes()
        reset_peak()

    def start(self) -> None:
        if self._trace_mib is not None and len(self.times) == self._steps - 1:
            from memory_trace import AllocationTrace

            self._trace = AllocationTrace()
            self._trace.start()
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._start)
        if self._trace is not None and len(self.times) == self._steps:
            self._trace.stop()

    def result(self, loss1: float, tokens_per_step: int) -> dict:
        # the peaks first: reading the trace's events costs memory of its own
        peaks = {"step_peak_bytes": hwm_bytes(), "peak_bytes": life_peak_bytes()}
        allocations = None if self._trace is None else self._trace.allocations(int(self._trace_mib * 2**20))
        return {"step_times": self.times, "loss1": loss1, "tokens_per_step": tokens_per_step,
                "base_bytes": self.base, **peaks, "allocations": allocations}


# --------------------------------------------------------------------------------------------------
# Workers: one variant in this process
# --------------------------------------------------------------------------------------------------


def skip_reason(variant: str) -> str | None:
    """Why ``variant`` cannot run here (None: it can)."""
    if variant == "trl_liger_dpo":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    return None


def liger_dpo_trainer():
    """TRL's ``DPOTrainer`` whose loss is Liger's fused-linear DPO loss (``trl_liger_dpo``).

    It replaces ``DPOTrainer._compute_loss`` alone, for the configuration of the bench (``loss_type="sigmoid"``,
    precomputed reference log-probs; anything else raises): the backbone gives the last hidden states h (the lm_head
    is not run), and Liger's chunked loss takes h, the lm_head weight W and the labels (the next token where TRL
    scores it, ``completion_mask`` = 1, else -100), computes per pair of rows the logits h Wᵀ, their log-softmax, the
    summed log-probs S of the labels (``average_log_prob=False``, as TRL sums) and the gradients of h and W, and
    never holds more logits than one pair's. The loss is Liger's sigmoid DPO, −log σ(β((S_c − R_c) − (S_r − R_r)))
    summed over pairs and divided by their number, which is TRL's mean over pairs, with TRL's β; R are TRL's
    precomputed reference log-probs of the batch.

    ``LigerFusedLinearDPOLoss`` takes the reference only as the reference model's hidden states and weight, from
    which it recomputes R at every step; its preference base (``LigerFusedLinearPreferenceBase``, Liger's
    extension point for custom losses) hands every chunk's S_c, S_r to a ``preference_loss_fn`` with the extra
    keyword arguments of the call. So the loss here is a subclass of that base whose ``preference_loss_fn`` takes
    R of the chunk's pairs from a ``ReferencePairs`` (the chunks come in the order of the batch; every pair must be
    taken exactly once) and calls Liger's DPO ``preference_loss_fn``. Eager (``compiled=False``): torch.compile
    would trace the hand-out again at every chunk.
    """
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase
    from trl import DPOTrainer

    class ReferencePairs:
        """R_c, R_r of a batch, handed out in order, ``n`` pairs at a time."""

        def __init__(self, chosen, rejected) -> None:
            self.chosen, self.rejected, self.taken = chosen, rejected, 0

        def take(self, n: int):
            start, self.taken = self.taken, self.taken + n
            return self.chosen[start:self.taken], self.rejected[start:self.taken]

    class PrecomputedReferenceDPO(LigerFusedLinearPreferenceBase):
        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta, reference):
            ref_chosen, ref_rejected = reference.take(chosen_logps.shape[0])
            return LigerFusedLinearDPOFunction.preference_loss_fn(
                chosen_logps, rejected_logps, full_target, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, beta=beta, loss_type="sigmoid")

        @classmethod
        def forward(cls, ctx, hidden, weight, labels, bias, reference, beta):
            return LigerFusedLinearPreferenceBase.forward(
                cls=cls, ctx=ctx, _input=hidden, weight=weight, target=labels, bias=bias, beta=beta,
                compute_nll_loss=False, compiled=False, use_ref_model=False, average_log_prob=False, chunk_size=1,
                reference=reference)

        @staticmethod
        def backward(ctx, *grad_output):
            return *LigerFusedLinearPreferenceBase.backward(ctx, grad_output)[:4], None, None

    class LigerDPOTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            if (self.loss_types != ["sigmoid"] or not self.precompute_ref_logps or self.ld_alpha is not None
                    or self.use_weighting or self.f_divergence_type != "reverse_kl" or self.aux_loss_enabled
                    or return_outputs):
                raise ValueError("the Liger loss of the bench is TRL's sigmoid DPO on precomputed reference "
                                 "log-probs only")
            kept = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                 "ref_rejected_logps")}
            hidden = model.get_decoder()(**kept, use_cache=False).last_hidden_state[:, :-1]
            labels = inputs["input_ids"][:, 1:].masked_fill(inputs["completion_mask"][:, 1:] == 0, -100)
            head = model.get_output_embeddings()
            reference = ReferencePairs(inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            loss, _ = PrecomputedReferenceDPO.apply(hidden, head.weight, labels, head.bias, reference, self.beta)
            if reference.taken != len(reference.chosen):
                raise RuntimeError(f"Liger's loss took {reference.taken} reference pairs of {len(reference.chosen)}")
            if self.model.training:
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            return loss

    return LigerDPOTrainer


def trl_worker(variant: str, s: Setup, out_dir: Path, clock: StepClock) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    work = Path(s.work)
    if variant.startswith("adapter"):
        from dora_engine.integrations.trl import DoRADPOConfig as Config
        from dora_engine.integrations.trl import DoRADPOTrainer as TrainerClass

        own = {"dora_loss": "dpo", "dora_strategy": variant.split("_")[1], "dora_lam": 1.0}
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer

        TrainerClass = liger_dpo_trainer() if variant == "trl_liger_dpo" else DPOTrainer
        own = {"loss_type": ["sigmoid"]}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.begin_phase(model)

        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    class Recorded(TrainerClass):
        """Records the loss of each call: the value the step back-propagates."""

        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    tokenizer = AutoTokenizer.from_pretrained(work / "policy")
    model = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(work / "reference", dtype=torch.float32)
    args = Config(
        output_dir=str(out_dir), per_device_train_batch_size=s.prompts, max_steps=s.steps, learning_rate=s.lr,
        lr_scheduler_type="constant", optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, bf16=False,
        use_cpu=True, gradient_checkpointing=False, precompute_ref_log_probs=True, max_length=None, seed=0,
        report_to="none", save_strategy="no", logging_steps=s.steps, disable_tqdm=True, **own,
    )
    dataset = Dataset.from_list([json.loads(x) for x in (work / "trl.jsonl").read_text(encoding="utf-8").splitlines()])
    trainer = Recorded(model, reference, args=args, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[Clock()])
    # The reference log-probs are in the dataset now: drop the reference model, and check that it is freed.
    gone = weakref.ref(reference)
    trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not trainer.ref_model]
    trainer.ref_model = reference = None
    gc.collect()
    if gone() is not None:
        raise RuntimeError("the reference model is still referenced after TRL's precompute")
    trainer.train()
    return clock.result(losses[0], round(trainer._total_train_tokens / s.steps))


def ours_worker(variant: str, s: Setup, out_dir: Path, clock: StepClock) -> dict:
    from dora_engine.training.config import load_config
    from dora_engine.training.engine import Trainer

    cfg = load_config(Path(s.work) / f"{variant}.yaml", [f"output_dir={out_dir}"])
    trainer = Trainer.from_config(cfg, progress=False)
    clock.begin_phase()
    first: dict = {}
    for step in range(s.steps):
        clock.start()
        metrics, _ = trainer.train_step(step)
        clock.stop()
        first = first or metrics
    result = clock.result(first["loss"], round(first["tokens_per_s"] * first["step_time_s"]))
    trainer.close()
    return result


def gemm_shapes(s: Setup) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, int]]]:
    """(M, in, out) of every linear product of a step and (batch, m, k, n) of every attention product,
    read from the policy's config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(Path(s.work) / "policy")
    head = c.hidden_size // c.num_attention_heads
    tokens = s.rows * s.seq
    scored = s.rows * (s.seq - s.prompt_tokens)
    per_layer = [(c.hidden_size, c.num_attention_heads * head), (c.hidden_size, c.num_key_value_heads * head),
                 (c.hidden_size, c.num_key_value_heads * head), (c.num_attention_heads * head, c.hidden_size),
                 (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
                 (c.intermediate_size, c.hidden_size)]
    linear = [(tokens, i, o) for _ in range(c.num_hidden_layers) for i, o in per_layer]
    linear.append((scored, c.hidden_size, c.vocab_size))
    batch = s.rows * c.num_attention_heads
    attention = [shape for _ in range(c.num_hidden_layers)
                 for shape in ((batch, s.seq, head, s.seq), (batch, s.seq, s.seq, head))]
    return linear, attention


def gemm_worker(s: Setup) -> dict:
    """The floor of the module docstring: best of 3 passes over the GEMMs of a step."""
    import torch

    linear, attention = gemm_shapes(s)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    tensors = [(rand(m, i), rand(o, i), rand(m, o)) for m, i, o in linear]
    batched = [(rand(b, m, k), rand(b, k, n), rand(b, m, n)) for b, m, k, n in attention]

    def one_pass() -> None:
        for x, w, dy in tensors:
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
        for a, b, dc in batched:
            torch.bmm(a, b)
            torch.bmm(dc, b.transpose(1, 2))
            torch.bmm(a.transpose(1, 2), dc)

    one_pass()  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return {"floor_s": min(times)}


def worker(variant: str, s: Setup, out_dir: Path, trace_mib: float | None = None) -> dict:
    if variant == FLOOR:
        return gemm_worker(s)
    clock = StepClock(s.steps, trace_mib)
    if variant.startswith("ours"):
        return ours_worker(variant, s, out_dir, clock)
    return trl_worker(variant, s, out_dir, clock)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_once(variant: str, s: Setup, out_dir: Path, timeout: float, trace_mib: float | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    cmd = [sys.executable, __file__, "--worker", variant, "--setup", json.dumps(asdict(s)), "--worker-out",
           str(out_dir), *([] if trace_mib is None else ["--trace", str(trace_mib)])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rounds(s: Setup, variants: list[str], rounds: int, timeout: float) -> dict[str, list[dict]]:
    """Every variant (and the GEMM floor) once per round, the order rotated by one each round."""
    order = [*variants, FLOOR]
    runs: dict[str, list[dict]] = {v: [] for v in order}
    for r in range(rounds):
        shift = r % len(order)
        for variant in order[shift:] + order[:shift]:
            started = time.perf_counter()
            runs[variant].append(run_once(variant, s, Path(s.work) / "runs" / f"{variant}-{r}", timeout))
            print(f"  round {r + 1}/{rounds} {variant}: {time.perf_counter() - started:.0f} s", flush=True)
    return runs


def summarise(s: Setup, runs: dict[str, list[dict]], warmup: int, skipped: dict[str, str]) -> dict:
    """Per variant: the figures of the module docstring; the step-1 check across each loss group."""
    floor = min(r["floor_s"] for r in runs[FLOOR])
    rows: dict[str, dict] = {}
    for variant, results in runs.items():
        if variant == FLOOR:
            continue
        times = [t for r in results for t in r["step_times"][warmup:]]
        tokens = results[0]["tokens_per_step"]
        step = statistics.median(times)
        rows[variant] = {
            "s_per_step": step, "s_per_step_range": [min(times), max(times)],
            "tokens_per_s": tokens / step, "tokens_per_s_range": [tokens / max(times), tokens / min(times)],
            "tokens_per_step": tokens, "x_gemm": step / floor,
            "peak_mib": max(r["peak_bytes"] for r in results) / 2**20,
            "step_peak_mib": max(r["step_peak_bytes"] for r in results) / 2**20,
            "base_mib": max(r["base_bytes"] for r in results) / 2**20,
            "loss1": results[0]["loss1"], "loss1_rounds": [r["loss1"] for r in results],
        }
    for variant, row in rows.items():
        row["same_work"] = same_work(variant, rows)
    return {"setup": asdict(s), "gemm_floor_s": floor, "variants": rows, "skipped": skipped,
            "machine": machine()}


def same_work(variant: str, rows: dict[str, dict]) -> bool:
    """Whether ``variant``'s step-1 loss and tokens per step equal those of the first variant of its loss
    group that ran (fp32 rounding: ``LOSS_RTOL``); every round's loss must agree too."""
    row = rows[variant]
    first = next(v for v in VARIANTS if v in rows and LOSS_GROUP[v] == LOSS_GROUP[variant])
    ref = rows[first]["loss1"]
    return (row["tokens_per_step"] == rows[first]["tokens_per_step"]
            and all(abs(x - ref) <= LOSS_RTOL * max(abs(ref), 1e-3) for x in row["loss1_rounds"]))


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def table(summary: dict, rounds: int, warmup: int) -> str:
    s = Setup(**summary["setup"])
    trl_row = summary["variants"].get("trl_dpo")
    lines = [
        f"V = {s.vocab}, H = {s.hidden}, {s.layers} layers, {s.prompts} prompts × K = {K} × {s.seq} tokens per "
        f"step, fp32; {summary['machine']}; median (range) of steps {warmup + 1}-{s.steps} × {rounds} round(s); "
        f"GEMM floor {summary['gemm_floor_s']:.3f} s",
        "",
        "| variant | s/step | tokens/s | × GEMM | ÷ TRL tokens/s | peak MiB | step MiB | base MiB | ÷ TRL peak "
        "| step-1 loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        if variant in summary["skipped"]:
            lines.append(f"| {variant} | skipped: {summary['skipped'][variant]} | | | | | | | | |")
            continue
        r = summary["variants"].get(variant)
        if r is None:
            continue
        lo, hi = r["s_per_step_range"]
        tlo, thi = r["tokens_per_s_range"]
        speed = f"{r['tokens_per_s'] / trl_row['tokens_per_s']:.2f}" if trl_row else "–"
        memory = f"{r['peak_mib'] / trl_row['peak_mib']:.2f}" if trl_row else "–"
        loss = f"{r['loss1']:.6f}" + ("" if r["same_work"] else " (not the same work)")
        lines.append(
            f"| {variant} | {r['s_per_step']:.3f} ({lo:.3f}-{hi:.3f}) | {r['tokens_per_s']:.0f} ({tlo:.0f}-{thi:.0f}) "
            f"| {r['x_gemm']:.2f} | {speed} | {r['peak_mib']:.0f} | {r['step_peak_mib']:.0f} | {r['base_mib']:.0f} "
            f"| {memory} | {loss} |"
        )
    return "\n".join(lines)


def prepared(s: Setup, variants: list[str]) -> dict[str, str]:
    """Prepare ``s.work`` (``prepare``); returns the variants that cannot run here, with the reason."""
    Path(s.work).mkdir(parents=True, exist_ok=True)
    prepare(s)
    return {v: reason for v in variants if (reason := skip_reason(v)) is not None}


def bench(s: Setup, variants: list[str], rounds: int, warmup: int, timeout: float) -> dict:
    skipped = prepared(s, variants)
    runs = run_rounds(s, [v for v in variants if v not in skipped], rounds, timeout)
    return summarise(s, runs, warmup, skipped)


def trace(s: Setup, variants: list[str], trace_mib: float, timeout: float) -> dict:
    """Each variant once, its last step traced: its operators allocating at least ``trace_mib`` MiB
    (``memory_trace``)."""
    skipped = prepared(s, variants)
    traced: dict[str, dict] = {v: {"skipped": reason} for v, reason in skipped.items()}
    for variant in variants:
        if variant not in skipped:
            r = run_once(variant, s, Path(s.work) / "runs" / f"{variant}-trace", timeout, trace_mib)
            traced[variant] = {"base_mib": r["base_bytes"] / 2**20, "step_peak_mib": r["step_peak_bytes"] / 2**20,
                               "peak_mib": r["peak_bytes"] / 2**20, "allocations": r["allocations"]}
    return {"setup": asdict(replace(s, work="")), "trace_mib": trace_mib, "traced_step": s.steps,
            "machine": machine(), "variants": {v: traced[v] for v in variants}}


def trace_text(result: dict) -> str:
    """``trace``'s result as text: per variant its memory figures and ``memory_trace.format_allocations``."""
    from memory_trace import format_allocations

    s = Setup(**result["setup"])
    lines = [f"V = {s.vocab}: operators allocating at least {result['trace_mib']:g} MiB in step "
             f"{result['traced_step']} (their own memory, in time order; frees not shown)"]
    for variant, r in result["variants"].items():
        if "skipped" in r:
            lines += ["", f"{variant}: skipped: {r['skipped']}"]
            continue
        lines += ["", f"{variant}: base {r['base_mib']:.0f} MiB, step peak {r['step_peak_mib']:.0f} MiB, "
                      f"peak {r['peak_mib']:.0f} MiB", "", format_allocations(r["allocations"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (prompt + response + EOS)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (K = 2 responses each)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps of each run left out of the timings")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true",
                        help="CI: V = 512, H = 64, 2 layers, 32 tokens per row, 3 steps, 1 round")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--out", help="folder of the results JSON, peers_v<V>.json (--trace: peers_trace_v<V>.json; "
                                      "default: benchmarks/results; --quick: none)")
    parser.add_argument("--results", action="store_true", help="also write the tables into benchmarks/RESULTS.md")
    parser.add_argument("--trace", type=float, metavar="MIB",
                        help="instead of timing: run each variant once (--rounds and --warmup unused) and list the "
                             "operators allocating at least MIB MiB in its last step, with the code that called them "
                             "(writes peers_trace_v<V>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Setup(**json.loads(args.setup)), Path(args.worker_out), args.trace)))
        return 0
    if args.quick:
        args.vocab, args.hidden, args.layers, args.seq, args.steps, args.rounds = [512], 64, 2, 32, 3, 1
    if args.trace is not None and args.results:
        parser.error("--trace lists allocations; --results writes the timing tables: run them apart")
    if args.trace is not None and args.trace <= 0:
        parser.error(f"--trace must be > 0 MiB, got {args.trace:g}")
    if args.trace is not None and args.steps < 2:
        parser.error("--trace traces the last step, which must not be the first (memory_trace.py): --steps 2 or more")
    if args.trace is None and args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    from dora_engine.atomic import atomic_write

    sections = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for vocab in args.vocab:
            s = Setup(str(Path(tmp) / f"v{vocab}"), vocab, args.hidden, args.layers, args.seq, args.prompts,
                      args.steps, args.lr)
            print(f"V = {vocab}", flush=True)
            out_dir = args.out or (None if args.quick else ROOT / "benchmarks" / "results")
            if args.trace is not None:
                result = trace(s, args.variants, args.trace, args.timeout)
                print(trace_text(result), flush=True)
                if out_dir is not None:
                    out = Path(out_dir) / f"peers_trace_v{vocab}.json"
                    with atomic_write(out) as handle:
                        json.dump(result, handle, indent=1)
                    print(f"written to {out}")
                continue
            summary = bench(s, args.variants, args.rounds, args.warmup, args.timeout)
            text = table(summary, args.rounds, args.warmup)
            print(text, flush=True)
            sections.append(text)
            if out_dir is not None:
                out = Path(out_dir) / f"peers_v{vocab}.json"
                summary["setup"] = asdict(replace(s, work=""))
                with atomic_write(out) as handle:
                    json.dump({**summary, "rounds": args.rounds, "warmup": args.warmup}, handle, indent=1)
                print(f"written to {out}")
    if args.results:
        from bench_train import write_results

        title = "End to end against TRL, CPU"
        command = "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = "\n\n".join([f"## {title}", f"    {command}", *sections]) + "\n"
        print(f"written to {write_results(section, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
