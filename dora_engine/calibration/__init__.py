"""Phase 1 of DoRA: calibration (DESIGN.md section 4, "Calibration"; the paper's Eq. 5-6).

Public API:

``h_tilde(c, gamma=1.0, beta=None)``
    The pure per-prompt weight h̃ from classifier probabilities ``c`` of shape (n,) or (B, n):
    ``term_k = γ c_k / (γ c_k / n + β_k (1 − c_k))``, ``h̃ = mean_k term_k`` ∈ (0, n).
"""

from dora_engine.calibration.weights import h_tilde

__all__ = ["h_tilde"]
