"""The torch device of a model from the user's ``--device`` option.

torch is imported when a device is resolved, not when this module is: the data and evaluation modules
that import it stay light to import.
"""

from __future__ import annotations

from dora_engine.errors import UserValueError


def resolve_device(device: str | None) -> str:
    """``None`` or ``"auto"``: ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other device as given.

    A CUDA device asked for where CUDA is unavailable is refused here rather than on the first tensor.
    """
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserValueError(f"device {device!r} requested but CUDA is not available")
    return device
