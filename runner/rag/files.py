"""What an upload may be, and where the file store keeps it.

A stored file's path is built from ids this project generates (the dataset's and the document's)
and the file type, never from the name a client sent: that name is only recorded. It is still
checked, so that a name like `../x` is refused with a message rather than silently renamed.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath

from runner.state import StatePaths

# extension → file type (the extractor's name)
FILE_TYPES: dict[str, str] = {
    "txt": "txt", "text": "txt", "md": "md", "markdown": "md", "html": "html", "htm": "html",
    "csv": "csv", "json": "json", "pdf": "pdf", "docx": "docx",
}
MAX_NAME_BYTES = 255
DATASETS = StatePaths.datasets.relative.name  # the file store's folder of datasets
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UploadRefused(ValueError):
    """The upload is not allowed: `field` names what is wrong, the message what is allowed."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


def check_file_name(name: str | None) -> tuple[str, str]:
    """(the name, its file type) for a plain file name with a supported extension."""
    allowed = ", ".join(f".{ext}" for ext in FILE_TYPES)
    if not name:
        raise UploadRefused("file", "the upload has no file name; send the file as multipart field 'file' "
                                    "with a file name")
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in name):
        raise UploadRefused("file", "the file name has control characters; use a plain file name like notes.txt")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UploadRefused("file", f"the file name is longer than {MAX_NAME_BYTES} bytes")
    if PurePosixPath(name).name != name or PureWindowsPath(name).name != name or name in (".", "..") \
            or name.startswith("."):
        raise UploadRefused("file", f"the file name {name!r} is not a plain file name: no folders, no '..', "
                                    "no leading dot (e.g. notes.txt)")
    extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    file_type = FILE_TYPES.get(extension)
    if file_type is None:
        raise UploadRefused("file", f"the file type of {name!r} is not supported; allowed: {allowed}", status=415)
    return name, file_type


def check_id(value: str, what: str) -> str:
    if not ID.match(value):
        raise UploadRefused(what, f"{what} {value!r} is not an id: 1 to 64 letters, digits and . _ - "
                                  "(starting with a letter or digit)")
    return value


def document_path(files_root: Path, dataset_id: str, document_id: str, file_type: str) -> Path:
    """Where a document's file is kept: inside the file store, whatever the ids hold. The path is
    lexical (never resolved through a link); runner.safe_files opens it without following one."""
    check_id(dataset_id, "dataset id")
    check_id(document_id, "document id")
    if file_type not in FILE_TYPES.values():
        raise UploadRefused("file", f"unknown file type {file_type!r}")
    return files_root / DATASETS / dataset_id / f"{document_id}.{file_type}"


def dataset_folder(files_root: Path, dataset_id: str) -> Path | None:
    """The folder of a dataset's files, or None for an id that is not one of ours."""
    if not ID.match(dataset_id):
        return None
    return files_root / DATASETS / dataset_id


def relative_to_store(files_root: Path, path: Path) -> str:
    return path.relative_to(files_root).as_posix()


def stored_path(files_root: Path, relative: str) -> Path:
    """A path recorded in the database, back inside the file store (refusing one that would leave it)."""
    recorded = PurePosixPath(relative)
    if recorded.is_absolute() or any(part in ("..", ".") for part in recorded.parts) or not recorded.parts:
        raise ValueError(f"the recorded path {relative!r} leaves the file store")
    return files_root.joinpath(*recorded.parts)
