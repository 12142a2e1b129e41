"""Cleaning: markup and control characters out, blank space collapsed, paragraphs kept."""

from __future__ import annotations

import html
import re
import unicodedata

TAG = re.compile(r"<[^<>]+>")  # not [^>]: from every '<' of a text that never closes one, a scan to the end
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Strip markup and control characters; collapse runs of blank space, keeping paragraphs."""
    if TAG.search(text):
        text = html.unescape(TAG.sub(" ", text))
    text = unicodedata.normalize("NFKC", CONTROL.sub("", text))
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", text)]
    return "\n\n".join(part for part in paragraphs if part)
