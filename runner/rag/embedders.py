"""Embedders: the interface, the hashing default that needs no download, and plugging in another.

An embedder is any object with a `name` (stored with each dataset, so vectors of different
embedders are never compared) and `embed(texts) -> list of vectors`. `DIFY_LOCAL_EMBEDDER` names
it: `hashing` (the default) or `package.module:attribute`, a class or factory called without
arguments, e.g. a wrapper around a local sentence-transformers model.

The hashing embedder hashes tokens into a fixed number of signed buckets (feature hashing) and
normalises the vector, so texts that share words are near each other. Latin-script words are
tokens (the commonest English ones left out); Chinese, Japanese and Korean runs (written without
spaces) give their character pairs, so a Chinese query finds the segments that share its words.
A token repeated counts 1 + log(count).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from array import array
from collections import Counter
from typing import Protocol, Sequence, runtime_checkable

EMBEDDING_DIMENSIONS = 1024
WORD = re.compile(r"\w+", re.UNICODE)
CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
# Words too common to tell texts apart (no corpus statistics here to learn them from): left out, so
# that "where does the okapi live" is near the text about okapis, not the one with most "the".
STOPWORDS = frozenset("""
a an and are as at be been but by can could did do does for from had has have he her his how i if in into is it
its me my no not of on or our she so such than that the their them then there these they this those to too us
was we were what when where which who whom why will with would you your
的 了 和 是 在 也 就 都 而 及 与 或 一个 这 那 有 我 你 他 她 它 们 吗 呢 吧
""".split())
SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@runtime_checkable
class Embedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, all of the same length."""
        ...


class EmbedderError(Exception):
    """The configured embedder cannot be loaded or misbehaved."""


def tokens(text: str) -> list[str]:
    found: list[str] = []
    for word in WORD.findall(text.lower()):
        runs = CJK_RUN.findall(word)
        if not runs:
            if word not in STOPWORDS:
                found.append(word)
            continue
        rest = CJK_RUN.sub(" ", word).split()
        found.extend(rest)
        for run in runs:  # character pairs (a lone character by itself): CJK words are mostly two characters
            found.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
    return found


class HashingEmbedder:
    """Feature hashing of the text's tokens into `dimensions` signed buckets, L2-normalised."""

    def __init__(self, dimensions: int = EMBEDDING_DIMENSIONS):
        self.dimensions = dimensions
        self.name = f"hashing-{dimensions}"

    def embed_one(self, text: str) -> list[float]:
        vector = [0.0] * self.dimensions
        for token, count in Counter(tokens(text)).items():
            digest = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
            weight = 1.0 + math.log(count)  # a word said ten times is not ten times the topic
            vector[digest % self.dimensions] += weight if digest >> 63 else -weight
        norm = math.sqrt(sum(value * value for value in vector))
        return [value / norm for value in vector] if norm else vector

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.embed_one(text) for text in texts]


DEFAULT = HashingEmbedder()


def load_embedder(spec: str) -> Embedder:
    """The embedder `spec` names: 'hashing' or 'package.module:attribute'."""
    if spec in ("", "hashing"):
        return DEFAULT
    if not SPEC.match(spec):
        raise EmbedderError(f"DIFY_LOCAL_EMBEDDER={spec!r}: use 'hashing' or 'package.module:attribute'")
    module_name, attribute = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        embedder = factory()
    except Exception as error:  # an import or constructor failure of user code: say which
        raise EmbedderError(f"DIFY_LOCAL_EMBEDDER={spec!r} cannot be loaded: {type(error).__name__}: {error}") \
            from error
    if not isinstance(embedder, Embedder) or not isinstance(getattr(embedder, "name", None), str):
        raise EmbedderError(f"DIFY_LOCAL_EMBEDDER={spec!r} gave {type(embedder).__name__}, which has no "
                            "'name' (str) and 'embed(texts)' method")
    return embedder


def embed_checked(embedder: Embedder, texts: Sequence[str]) -> list[list[float]]:
    """The embedder's vectors, checked: one per text, finite numbers, all of one length."""
    vectors = embedder.embed(list(texts))
    if len(vectors) != len(texts):
        raise EmbedderError(f"embedder {embedder.name!r} returned {len(vectors)} vectors for {len(texts)} texts")
    lengths = {len(vector) for vector in vectors}
    if len(lengths) > 1:
        raise EmbedderError(f"embedder {embedder.name!r} returned vectors of different lengths {sorted(lengths)}")
    return [[float(value) for value in vector] for vector in vectors]


def embed(text: str) -> list[float]:
    """The default embedder's vector of one text."""
    return DEFAULT.embed_one(text)


def pack(vector: Sequence[float]) -> bytes:
    return array("f", vector).tobytes()


def unpack(blob: bytes) -> array:
    values = array("f")
    values.frombytes(blob)
    return values


def text_hash(text: str, embedder_name: str = "") -> str:
    """The embedding cache's key: the text, and the embedder when it is not the default."""
    key = text if embedder_name in ("", DEFAULT.name) else f"{embedder_name}\n{text}"
    return hashlib.sha256(key.encode()).hexdigest()



_LOADED: dict[str, Embedder] = {}


def configured_embedder(settings) -> Embedder:
    """The embedder DIFY_LOCAL_EMBEDDER names, loaded once per process."""
    spec = settings.DIFY_LOCAL_EMBEDDER
    if spec not in _LOADED:
        _LOADED[spec] = load_embedder(spec)
    return _LOADED[spec]
