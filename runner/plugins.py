"""Plugin packages: a zip with a manifest at its root, checked before anything is unpacked.

The manifest is Dify's `manifest.yaml` (or `manifest.json`) with at least `name`, `version` and
`author`, read without YAML aliases and at most MAX_DEPTH deep. A package is refused, naming the
entry, when an entry would land outside the plugin's folder (`../`, an absolute path, a drive
letter, a backslash), is a symlink or other special file, repeats a name (also one that differs
only in case or Unicode normalisation: the same file on macOS and Windows), is a file where
another entry needs a folder (`a` beside `a/b`), has a name too long for a file system, is
encrypted or damaged; and when the package or the sum of its unpacked sizes is over the limits.
Every entry is read through once when the package is checked, so a package accepted unpacks; and
unpacking counts the bytes it writes, so an entry lying about its size cannot exceed them either.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import stat
import unicodedata
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: installs are not serialised across processes there
    fcntl = None

import yaml
from packaging.version import InvalidVersion, Version

from runner import safe_files, strict_json, zip_checks
from runner.state import StatePaths

LOCK_NAME = StatePaths.plugins_lock.relative.name
MANIFESTS = ("manifest.yaml", "manifest.yml", "manifest.json")
REQUIRED = ("name", "version", "author")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
MAX_ENTRIES = 2000
MAX_MANIFEST = 64 * 1024  # bytes
MAX_DEPTH = strict_json.MAX_DEPTH  # mappings and lists nested in the manifest
MAX_NAME_PART = 255  # bytes of one file or folder name: what Linux, macOS and Windows file systems take
MAX_ENTRY_NAME = 1024  # bytes of an entry's whole path inside the plugin folder


class PluginPackageError(ValueError):
    """The package is refused; `entry` names the zip entry at fault, `field` the manifest field."""

    def __init__(self, message: str, entry: str | None = None, field: str | None = None, too_large: bool = False):
        super().__init__(message)
        self.entry = entry
        self.field = field
        self.too_large = too_large

    def details(self) -> dict[str, Any]:
        return {key: value for key, value in (("entry", self.entry), ("field", self.field)) if value is not None}


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    manifest: dict[str, Any]
    unpacked_size: int
    entries: int


def is_newer(latest: str | None, installed: str) -> bool:
    """Whether the index's `latest` is a newer version than `installed`."""
    if not latest:
        return False
    try:
        return Version(latest) > Version(installed)
    except InvalidVersion:
        return latest != installed


class _ManifestLoader(yaml.SafeLoader):
    """YAML's safe loader, without aliases and at most MAX_DEPTH deep. An alias stands for its
    anchor's whole node, so a few hundred bytes of aliases of aliases ("billion laughs") are
    billions of values to whoever walks the result (the manifest's JSON copy took 23 GB)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a plugin manifest",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"the manifest nests deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _read_manifest(text: str, entry: str) -> Any:
    if entry.endswith(".json"):
        return strict_json.loads(text)
    loader = _ManifestLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if not name or "\x00" in name or "\\" in name:
        raise PluginPackageError(f"entry {name!r}: a name may not be empty or hold a backslash or NUL", entry=name)
    if len(name.encode("utf-8", "surrogateescape")) > MAX_ENTRY_NAME or \
            any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_PART for part in name.split("/")):
        raise PluginPackageError(f"entry {name[:60]!r}…: names may have at most {MAX_NAME_PART} bytes a part and "
                                 f"{MAX_ENTRY_NAME} in all", entry=name)
    path = PurePosixPath(name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise PluginPackageError(f"entry {name!r} is an absolute path; entries must stay inside the plugin folder",
                                 entry=name)
    if ".." in path.parts:
        raise PluginPackageError(f"entry {name!r} escapes the plugin folder ('..'); entries must stay inside it",
                                 entry=name)
    if str(path) == ".":
        raise PluginPackageError(f"entry {name!r} names the plugin folder itself", entry=name)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if info.create_system == 3 and kind:  # made on Unix, with a file type in the high bits
        if kind == stat.S_IFLNK:
            raise PluginPackageError(f"entry {name!r} is a symlink; a plugin package may not hold links", entry=name)
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise PluginPackageError(f"entry {name!r} is not a regular file or folder", entry=name)


def _check_manifest(manifest: Any, entry: str) -> tuple[str, str]:
    if not isinstance(manifest, dict):
        raise PluginPackageError(f"{entry} must be a mapping of fields", entry=entry)
    for field in REQUIRED:
        if field not in manifest or manifest[field] in (None, ""):
            raise PluginPackageError(f"{entry}: the field {field!r} is required ({', '.join(REQUIRED)})",
                                     entry=entry, field=field)
    name, version = manifest["name"], manifest["version"]
    if not isinstance(name, str) or not NAME.match(name):
        raise PluginPackageError(f"{entry}: 'name' {name!r} must be 1-128 lowercase letters, digits, _ or -, "
                                 "starting with a letter or digit", entry=entry, field="name")
    if not isinstance(version, str):
        raise PluginPackageError(f"{entry}: 'version' must be a string such as \"1.0.0\", got {version!r}",
                                 entry=entry, field="version")
    try:
        Version(version)
    except InvalidVersion:
        raise PluginPackageError(f"{entry}: 'version' {version!r} is not a version such as \"1.0.0\"",
                                 entry=entry, field="version") from None
    if not isinstance(manifest["author"], str):
        raise PluginPackageError(f"{entry}: 'author' must be a string", entry=entry, field="author")
    return name, version


def _check_layout(infos: list[zipfile.ZipInfo]) -> set[str]:
    """The files' paths, once every entry has its own place: no name twice (nor twice once case
    and Unicode normalisation are ignored, as macOS and Windows do), and no file where another
    entry needs a folder."""
    seen: dict[str, str] = {}
    folded: dict[str, str] = {}
    files: set[str] = set()
    for info in infos:
        _check_entry(info)
        normal = str(PurePosixPath(info.filename))
        if normal in seen:
            raise PluginPackageError(f"entry {info.filename!r} appears twice", entry=info.filename)
        seen[normal] = info.filename
        key = unicodedata.normalize("NFC", normal).casefold()
        if key in folded:
            raise PluginPackageError(f"entries {folded[key]!r} and {info.filename!r} differ only in case or Unicode "
                                     "normalisation: they are the same file on macOS and Windows",
                                     entry=info.filename)
        folded[key] = info.filename
        if not info.is_dir():
            files.add(normal)
    for normal, original in seen.items():
        for parent in PurePosixPath(normal).parents:
            if str(parent) in files:
                raise PluginPackageError(f"entry {seen[str(parent)]!r} is a file, but {original!r} needs a folder of "
                                         "that name", entry=seen[str(parent)])
    return files


def _read_through(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Decompress an entry to its end (discarding it), so that a damaged one is found now."""
    with archive.open(info) as source:
        while source.read(256 * 1024):
            pass


def inspect_package(data: bytes, max_package: int, max_unpacked: int) -> Package:
    """Check a package without unpacking it; raise PluginPackageError saying what is wrong."""
    if len(data) > max_package:
        raise PluginPackageError(f"the package is {len(data)} bytes; PLUGIN_MAX_PACKAGE_SIZE allows {max_package}",
                                 too_large=True)
    try:
        archive = zip_checks.open_checked(data, MAX_ENTRIES, max_unpacked,
                                          unpacked_setting="DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE")
    except zip_checks.ZipRefused as error:
        raise PluginPackageError(f"the package is refused: {error}", entry=error.entry,
                                 too_large=error.too_large) from None
    with archive:
        infos = archive.infolist()
        files = _check_layout(infos)
        total = sum(info.file_size for info in infos)
        found = [name for name in MANIFESTS if name in files]
        if not found:
            folders = [info.filename for info in infos if str(PurePosixPath(info.filename)) in MANIFESTS]
            raise PluginPackageError(f"the package has no manifest at its root ({' or '.join(MANIFESTS)})"
                                     + (f"; {folders[0]!r} is a folder" if folders else ""), field="manifest",
                                     entry=folders[0] if folders else None)
        entry = found[0]
        info = next(i for i in infos if str(PurePosixPath(i.filename)) == entry)
        if info.file_size > MAX_MANIFEST:
            raise PluginPackageError(f"{entry} is over {MAX_MANIFEST} bytes", entry=entry, too_large=True)
        try:
            manifest = _read_manifest(archive.read(info).decode("utf-8"), entry)
        except (UnicodeDecodeError, ValueError, yaml.YAMLError, zipfile.BadZipFile, RuntimeError) as error:
            raise PluginPackageError(f"{entry} does not parse: {error}", entry=entry) from None
        name, version = _check_manifest(manifest, entry)
        for info in infos:
            try:
                _read_through(archive, info)
            except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, lzma.LZMAError) as error:
                raise PluginPackageError(f"entry {info.filename!r} is damaged: {error}", entry=info.filename) from None
        return Package(name, version, json.loads(json.dumps(manifest, default=str)), total, len(infos))


def unpack(data: bytes, state_root: Path, destination: Path, max_unpacked: int) -> int:
    """Unpack a checked package into `destination` (a path of the state folder, made here: it must
    not exist); the bytes written. Every folder and file is made through runner.safe_files, so a
    link in the state folder redirects nothing."""
    with safe_files.folder(state_root, destination.parent) as parent:
        os.mkdir(destination.name, 0o700, dir_fd=parent)
    written = 0
    with zip_checks.open_checked(data, MAX_ENTRIES, max_unpacked) as archive:
        for info in archive.infolist():
            _check_entry(info)
            target = destination.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                safe_files.ensure_folders(state_root, [target])
                continue
            with archive.open(info) as source, safe_files.open_file(state_root, target, "xb") as sink:
                while chunk := source.read(64 * 1024):
                    written += len(chunk)
                    if written > max_unpacked:
                        raise PluginPackageError(f"the package unpacks to more than {max_unpacked} bytes",
                                                 entry=info.filename, too_large=True)
                    sink.write(chunk)
    return written


@contextmanager
def folder_lock(state_root: Path, root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the plugins folder `root`: one install or removal at a time, across
    worker threads and processes."""
    with safe_files.open_file(state_root, root / LOCK_NAME, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
