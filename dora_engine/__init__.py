"""dora-engine: Distribution-aware optimization for Robust Alignment on DeepSpeed."""

__version__ = "0.1.0"
