"""The knowledge base's text handling, one job per module:

- `files`      what an upload may be (name, type, size) and where it is kept in the file store
- `extract`    text (and what the format tells about it) from txt, md, html, csv, json, pdf, docx
- `clean`      markup and control characters out, blank space collapsed
- `split`      segments of a configurable size and overlap, on word boundaries
- `metadata`   what is counted and detected about a cleaned text
- `embedders`  the embedder interface, the hashing default (no download) and how another is plugged in
- `index`      datasets, documents and segments in the metadata store, and nearest-segment search
"""

from runner.rag.clean import clean_text
from runner.rag.embedders import EMBEDDING_DIMENSIONS, embed, pack, text_hash, unpack
from runner.rag.metadata import text_metadata
from runner.rag.split import chunk_text

__all__ = ["EMBEDDING_DIMENSIONS", "chunk_text", "clean_text", "embed", "pack", "text_hash", "text_metadata",
           "unpack"]
