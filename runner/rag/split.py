"""Splitting a cleaned text into segments of a configurable size and overlap."""

from __future__ import annotations


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Windows of at most `size` characters on word boundaries, each repeating the last
    `overlap` characters of the one before."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    if not 0 <= overlap < size:
        raise ValueError("overlap must be at least 0 and less than the chunk size")
    words = text.split()
    chunks: list[str] = []
    current = ""
    for word in words:
        while len(word) > size:  # a word longer than a chunk is cut
            if current:
                chunks.append(current)
                current = ""
            chunks.append(word[:size])
            word = word[size:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) <= size:
            current = candidate
            continue
        chunks.append(current)
        tail = current[-overlap:] if overlap else ""
        if tail and " " in tail:
            tail = tail[tail.index(" ") + 1:]
        current = f"{tail} {word}" if tail and len(tail) + 1 + len(word) <= size else word
    if current:
        chunks.append(current)
    return [chunk for chunk in chunks if chunk.strip()]
