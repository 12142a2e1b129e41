"""Metadata of a cleaned text: counts, and the letters of each script it is written in."""

from __future__ import annotations

import re

WORD = re.compile(r"\w+", re.UNICODE)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def text_metadata(text: str) -> dict[str, int]:
    return {
        "characters": len(text),
        "words": len(WORD.findall(text)),
        "paragraphs": len([part for part in text.split("\n\n") if part.strip()]),
    }


def letters(text: str) -> dict[str, int]:
    """How many letters the text has of each script: CJK (Chinese, Japanese, Korean) and Latin."""
    return {"cjk": len(CJK.findall(text)), "latin": len(LATIN.findall(text))}


def document_metadata(text: str, extracted: dict, file_type: str, size: int) -> dict:
    """What is stored with a document: the format's own metadata (title, pages …), then counts."""
    return {**extracted, "file_type": file_type, "bytes": size, "letters": letters(text), **text_metadata(text)}
