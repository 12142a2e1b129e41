"""Metadata of a cleaned text: counts, and the script most of it is written in."""

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


def script(text: str) -> str:
    """'cjk', 'latin' or 'other': which letters most of the text is written in."""
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    if not cjk and not latin:
        return "other"
    return "cjk" if cjk >= latin else "latin"


def document_metadata(text: str, extracted: dict, file_type: str, size: int) -> dict:
    """What is stored with a document: the format's own metadata (title, pages …), then counts."""
    return {**extracted, "file_type": file_type, "bytes": size, "script": script(text), **text_metadata(text)}
