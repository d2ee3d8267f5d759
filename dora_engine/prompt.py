"""A prompt as a record carries it and a generator takes it (docs/design.md section 3): a non-empty string,
or a chat as a list of ``{"role", "content"}`` messages."""

from __future__ import annotations

Prompt = str | list[dict[str, str]]
