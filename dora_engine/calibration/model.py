"""The phase-1 classifier network: a Hugging Face encoder, a pooling and a linear head (docs/design.md section 4).

    logits = W · dropout(pool(h)) + b

``h`` are the encoder's last hidden states of the (prompt, response) pair; ``pool`` is the mean over the
attended tokens (``"mean"``, the default) or the first token (``"cls"``). Mean pooling is what
sentence-embedding checkpoints such as the default MiniLM were trained for; on the same data it separated
the sources better than a head on the first token (measured in benchmarks/RESULTS.md, "Calibration on
real data").

A trained classifier is saved as the encoder's own ``save_pretrained`` folder (loadable by any Hugging Face
tool) plus ``classifier_head.json`` and ``classifier_head.safetensors``. ``load_trained`` also accepts any
``AutoModelForSequenceClassification`` folder, so outside classifiers can score too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dora_engine.hf_loading import load_pretrained

POOLINGS = ("mean", "cls")
"""Mean over the attended tokens, or the first token."""

HEAD_CONFIG = "classifier_head.json"
HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_DROPOUT = 0.1


class PooledClassifier(nn.Module):
    """Encoder + pooling + linear head; ``forward(**tokenizer_outputs)`` returns logits (batch, num_labels)."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {list(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(HEAD_DROPOUT)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @classmethod
    def from_backbone(cls, path: str, num_labels: int, pooling: str, *,
                      trust_remote_code: bool = False) -> PooledClassifier:
        """The pretrained encoder at ``path`` (any head it has is dropped) with a fresh head;
        ``trust_remote_code``: ``dora_engine.hf_loading``."""
        from transformers import AutoModel

        return cls(load_pretrained(AutoModel, path, trust_remote_code=trust_remote_code), num_labels, pooling)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, trust_remote_code: bool = False) -> PooledClassifier:
        """The classifier ``save`` wrote to ``folder``; ``trust_remote_code``: ``dora_engine.hf_loading``."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        config = json.loads(Path(folder, HEAD_CONFIG).read_text(encoding="utf-8"))
        encoder = load_pretrained(AutoModel, str(folder), trust_remote_code=trust_remote_code)
        model = cls(encoder, config["num_labels"], config["pooling"])
        model.head.load_state_dict(load_file(Path(folder, HEAD_WEIGHTS)))
        return model

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, Path(folder, HEAD_WEIGHTS))
        config = {"pooling": self.pooling, "num_labels": self.num_labels}
        Path(folder, HEAD_CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")

    def forward(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(attention_mask=attention_mask, **inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


class _SequenceClassifierLogits(nn.Module):
    """An ``AutoModelForSequenceClassification`` seen through the PooledClassifier interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_labels = model.config.num_labels

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


def load_trained(folder: str | os.PathLike, *, trust_remote_code: bool = False) -> nn.Module:
    """A saved PooledClassifier, or any Hugging Face sequence classifier, returning logits;
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    if Path(folder, HEAD_CONFIG).is_file():
        return PooledClassifier.load(folder, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForSequenceClassification

    return _SequenceClassifierLogits(
        load_pretrained(AutoModelForSequenceClassification, str(folder), trust_remote_code=trust_remote_code)
    )
