"""Text handling for the knowledge-base pipeline: cleaning, chunking, a local hashing embedder.

The embedder needs no model download: it hashes words into a fixed number of signed buckets
(feature hashing) and normalises the vector, so texts that share words are near each other.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import unicodedata
from array import array

EMBEDDING_DIMENSIONS = 256
WORD = re.compile(r"\w+", re.UNICODE)
TAG = re.compile(r"<[^>]+>")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Strip markup and control characters; collapse runs of blank space, keeping paragraphs."""
    if TAG.search(text):
        text = html.unescape(TAG.sub(" ", text))
    text = unicodedata.normalize("NFKC", CONTROL.sub("", text))
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", text)]
    return "\n\n".join(part for part in paragraphs if part)


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


def text_metadata(text: str) -> dict[str, int]:
    return {
        "characters": len(text),
        "words": len(WORD.findall(text)),
        "paragraphs": len([part for part in text.split("\n\n") if part.strip()]),
    }


def embed(text: str) -> list[float]:
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in WORD.findall(text.lower()):
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vector[digest % EMBEDDING_DIMENSIONS] += 1.0 if digest >> 63 else -1.0
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm else vector


def pack(vector: list[float]) -> bytes:
    return array("f", vector).tobytes()


def unpack(blob: bytes) -> list[float]:
    values = array("f")
    values.frombytes(blob)
    return values.tolist()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
