"""Shard tars written member by member with fixed metadata, byte for byte what tarfile writes, checksummed as written."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
NUL = b"\0"
# A USTAR header's fields after the name, up to the checksum: mode 0644, root, mtime 0 (size goes between).
_MODE_IDS = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
# After the checksum: a regular file, no link, USTAR magic, no user or group names, no device, no prefix.
_TAIL = (b"0" + NUL * 100 + tarfile.POSIX_MAGIC + NUL * 32 * 2 + NUL * 8 * 2 + NUL * 155).ljust(BLOCK - 156, NUL)
_NAME = 100
_CHECKSUM_BLANK = b" " * 8


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file `name` of `size` bytes with the fixed
    metadata (mtime 0, uid/gid 0, no user names, mode 0644); tarfile's own for names it must split."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) >= _NAME or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = encoded.ljust(_NAME, NUL) + _MODE_IDS + b"%011o\0" % size + _MTIME
    checksum = sum(head) + sum(_CHECKSUM_BLANK) + sum(_TAIL)  # the sum tarfile takes, the field as spaces
    return head + b"%06o\0 " % checksum + _TAIL


class TarWriter:
    """A USTAR tar at `path` written member by member (`add`), the same members in the same order always
    giving the same bytes; `sha256` and `size` are those of the file once closed (no second read)."""

    def __init__(self, path: str | Path):
        self._fh = open(path, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._digest.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(member_header(name, len(data)))
        self._write(data)
        self._write(NUL * (-len(data) % BLOCK))

    def close(self) -> None:
        """The two zero blocks that end a tar, then zeros up to a whole record, as tarfile writes."""
        if self._fh.closed:
            return
        try:
            self._write(NUL * (2 * BLOCK))
            self._write(NUL * (-self.size % RECORD))
        finally:
            self._fh.close()

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # the caller's error stands; the partial file is a .tmp it removes or redoes
            self._fh.close()
