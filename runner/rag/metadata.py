"""Metadata of a cleaned text: counts, and the letters of each script it is written in."""

from __future__ import annotations

import re
from collections import Counter

from runner.rag.embedders import tokens

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


def keywords(text: str, count: int = 8) -> list[str]:
    """The words (CJK: character pairs) the text repeats most, common English words left out."""
    counted = Counter(token for token in tokens(text) if len(token) > 1 and not token.isdigit())
    return [token for token, _ in counted.most_common(count)]


def document_metadata(text: str, extracted: dict, file_type: str, size: int) -> dict:
    """What is stored with a document: the format's own metadata (title, pages …), then counts."""
    return {**extracted, "file_type": file_type, "bytes": size, "letters": letters(text), "keywords": keywords(text),
            **text_metadata(text)}
