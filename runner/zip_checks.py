"""Zip archives from outside (plugin packages, DOCX documents), checked before zipfile reads them.

zipfile parses the whole central directory when it opens an archive, whatever it holds: 15 MB of
empty entries is 200,000 of them, 2 s and 110 MB before anyone could count them. So the count and
the directory's size are read first from the end-of-central-directory record (and its zip64
form), and then what each entry declares: its size, its compression method, encryption. zipfile
itself stops an entry's output at the size it declares (and fails its CRC), so declared sizes
bound what reading can produce.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass

END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks ×2, entries here, entries, size, offset, comment
END_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
ZIP64_END_SIGNATURE = b"PK\x06\x06"
MAX_COMMENT = 0xFFFF
# bytes of central directory an entry may take: its fixed 46 plus a long name, its extra fields
DIRECTORY_BYTES_PER_ENTRY = 1024
METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
           zipfile.ZIP_LZMA: "lzma"}


class ZipRefused(ValueError):
    """The archive is refused; `entry` names the entry at fault, `too_large` a limit passed."""

    def __init__(self, message: str, entry: str | None = None, too_large: bool = False):
        super().__init__(message)
        self.entry = entry
        self.too_large = too_large


@dataclass(frozen=True)
class Directory:
    entries: int
    size: int  # bytes of the central directory


def directory(data: bytes) -> Directory:
    """What the end-of-central-directory record says, without parsing the directory itself."""
    start = data.rfind(END_SIGNATURE, max(0, len(data) - END_RECORD.size - MAX_COMMENT))
    if start < 0 or len(data) - start < END_RECORD.size:
        raise ZipRefused("it is not a zip file (no end of central directory record)")
    _, _, _, _, entries, size, _, _ = END_RECORD.unpack_from(data, start)
    if entries == 0xFFFF or size == 0xFFFFFFFF:
        locator = start - ZIP64_LOCATOR.size
        if locator < 0 or data[locator:locator + 4] != ZIP64_LOCATOR_SIGNATURE:
            raise ZipRefused("it is not a zip file (its zip64 record is missing)")
        _, _, offset, _ = ZIP64_LOCATOR.unpack_from(data, locator)
        if offset + ZIP64_END_RECORD.size > len(data) or data[offset:offset + 4] != ZIP64_END_SIGNATURE:
            raise ZipRefused("it is not a zip file (its zip64 record is damaged)")
        _, _, _, _, _, _, _, entries, size, _ = ZIP64_END_RECORD.unpack_from(data, offset)
    return Directory(entries, size)


def open_checked(data: bytes, max_entries: int, max_unpacked: int, max_ratio: float | None = None,
                 unpacked_setting: str = "the limit") -> zipfile.ZipFile:
    """`data` opened as a zip once its entry count, declared unpacked size (at most `max_unpacked`
    bytes, and `max_ratio` times the archive's size) and every entry's method are acceptable."""
    found = directory(data)
    if found.entries > max_entries or found.size > max_entries * DIRECTORY_BYTES_PER_ENTRY:
        raise ZipRefused(f"it has {found.entries} entries ({found.size} bytes of directory); at most "
                         f"{max_entries} are allowed", too_large=True)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as error:
        raise ZipRefused(f"it is not a zip file ({error})") from None
    try:
        infos = archive.infolist()
        if len(infos) > max_entries:
            raise ZipRefused(f"it has {len(infos)} entries; at most {max_entries} are allowed", too_large=True)
        total = 0
        for info in infos:
            if info.flag_bits & 0x1:
                raise ZipRefused(f"entry {info.filename!r} is encrypted", entry=info.filename)
            if info.compress_type not in METHODS:
                raise ZipRefused(f"entry {info.filename!r} uses compression method {info.compress_type}; "
                                 f"allowed: {', '.join(METHODS.values())}", entry=info.filename)
            total += info.file_size
            if total > max_unpacked:
                raise ZipRefused(f"it unpacks to more than {max_unpacked} bytes ({unpacked_setting})",
                                 entry=info.filename, too_large=True)
        if max_ratio is not None and total > max_ratio * max(len(data), 1):
            raise ZipRefused(f"it unpacks to {total} bytes, {total / max(len(data), 1):.0f} times its size; at "
                             f"most {max_ratio:g} times is allowed (a zip bomb?)", too_large=True)
    except BaseException:
        archive.close()
        raise
    return archive
