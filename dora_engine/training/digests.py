"""Size and SHA-256 digest of a file, read in blocks: the entries of the checkpoint manifest
(docs/design.md section 7.5) and of the tokenised cache's ``dora_tokens.json`` (section 3.2)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 8 << 20


def file_entry(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}
