"""An encoder as a frozen feature extractor (``encoder="features"``): logistic regression on its layers' states.

The (prompt, response) pair is tokenised as for fine-tuning (``classifier.cut_pairs``: the prompt keeps its
end, the response its first and last halves) and run once through the pretrained encoder. The features are,
for every layer, the mean of its hidden states over the response's tokens (the prompt's tokens are read as
context only), concatenated: L·H numbers (6 × 384 = 2304 for MiniLM-L6). Lower layers keep more of the
surface form (wording, punctuation, formatting) that tells generators apart than the final, semantic layer
alone. A logistic regression (standardised features, L2 penalty ``C``) is fitted on them; the calibration
calibrates its probabilities on out-of-fold scores (``pipeline``).

Features are computed once per distinct pair in a process and kept in memory (9 KB per response for
MiniLM-L6), so the K folds and all classifiers of a calibration share one forward pass per response.
Saved as ``features.json`` and ``features.npz`` (no pickle); the encoder itself is read from the backbone
at scoring time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

META_FILE = "features.json"
ARRAYS_FILE = "features.npz"
FORMAT = "layer-mean-response/lr-c0.01/2"
C = 0.01

_CACHE: dict[tuple[str, int, str], np.ndarray] = {}


def _key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()


def encode(backbone: str, examples: Sequence[Any], *, max_length: int, batch_size: int, device: str,
           description: str = "features", trust_remote_code: bool = False) -> np.ndarray:
    """(len(examples), L·H) float32 features of (prompt, response) pairs from the encoder at ``backbone``;
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel

    from dora_engine.calibration.pairs import cut_pairs, load_classifier_tokenizer
    from dora_engine.device import resolve_device
    from dora_engine.hf_loading import load_pretrained

    keys = [(backbone, max_length, _key(e.prompt, e.response)) for e in examples]
    missing = [i for i, k in enumerate(keys) if k not in _CACHE]
    if missing:
        device = resolve_device(device)
        tokenizer = load_classifier_tokenizer(backbone, trust_remote_code=trust_remote_code)
        model = load_pretrained(AutoModel, backbone, trust_remote_code=trust_remote_code)
        model.to(device).eval()
        order = sorted(missing, key=lambda i: len(examples[i].prompt) + len(examples[i].response))
        with torch.inference_mode(), tqdm(total=len(order), desc=description, unit="resp") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                prompts, responses = cut_pairs(tokenizer, [examples[i] for i in idx], max_length)
                inputs = tokenizer(prompts, responses, truncation="longest_first", max_length=max_length,
                                   padding=True, return_tensors="pt")
                response_mask = torch.tensor(
                    [[sid == 1 for sid in inputs.sequence_ids(row)] for row in range(len(idx))], dtype=torch.float32
                )
                response_mask = response_mask.unsqueeze(-1).to(device)
                hidden = model(**inputs.to(device), output_hidden_states=True).hidden_states[1:]
                count = response_mask.sum(1).clamp_min(1.0)
                pooled = torch.cat([(h.float() * response_mask).sum(1) / count for h in hidden], dim=1)
                for i, row in zip(idx, pooled.cpu().numpy(), strict=True):
                    _CACHE[keys[i]] = row.astype(np.float32)
                bar.update(len(idx))
    return np.stack([_CACHE[k] for k in keys]) if keys else np.empty((0, 0), dtype=np.float32)


def train(examples: Sequence[Any], num_labels: int, settings: Any, output_dir: str | os.PathLike, *,
          trust_remote_code: bool = False) -> None:
    """Fit the logistic regression on the frozen features of ``examples`` and save it to ``output_dir``;
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    from sklearn.linear_model import LogisticRegression

    from dora_engine.calibration.bow import linear_head
    from dora_engine.calibration.pairs import resolve_backbone

    backbone = resolve_backbone(settings.backbone)
    labels = np.array([e.label for e in examples], dtype=int)
    x = encode(backbone, examples, max_length=settings.max_length, batch_size=settings.batch_size,
               device=settings.device, description="features (train)",
               trust_remote_code=trust_remote_code).astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    x = (x - mean) / scale

    fitted = LogisticRegression(C=C, max_iter=5000, random_state=settings.seed).fit(x, labels)
    coef, intercept = linear_head(fitted, num_labels)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "backbone": settings.backbone, "max_length": settings.max_length,
            "num_labels": num_labels}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    with open(folder / ARRAYS_FILE, "wb") as handle:
        np.savez(handle, mean=mean, scale=scale, coef=coef, intercept=intercept)


def is_saved(folder: str | os.PathLike) -> bool:
    return Path(folder, META_FILE).is_file()


def predict(folder: str | os.PathLike, examples: Sequence[Any], *, batch_size: int, device: str,
            description: str = "score", trust_remote_code: bool = False) -> np.ndarray:
    """Class probabilities (len(examples), num_labels) in float64; ``trust_remote_code``: ``dora_engine.hf_loading``."""
    from dora_engine.calibration.bow import load_saved, softmax
    from dora_engine.calibration.pairs import resolve_backbone

    meta, a = load_saved(folder, "features", (FORMAT,), META_FILE, ARRAYS_FILE)
    if not examples:
        return np.empty((0, meta["num_labels"]))
    x = encode(resolve_backbone(meta["backbone"]), examples, max_length=meta["max_length"], batch_size=batch_size,
               device=device, description=description, trust_remote_code=trust_remote_code).astype(np.float64)
    logits = ((x - a["mean"]) / a["scale"]) @ a["coef"].T + a["intercept"]
    return softmax(logits)
