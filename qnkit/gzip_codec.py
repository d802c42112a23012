"""gzip streams for ``.nii.gz`` files: ISA-L (the ``isal`` package) when installed, the standard library otherwise.

Decoding and encoding gzip with the standard library's zlib is single-threaded and often takes longer
than the network on a whole CT. ISA-L inflates about 2-3x faster, and its threaded writer compresses
1 MiB blocks on several threads while the caller keeps producing data. Its output is one ordinary
gzip member (each block continues the previous one's dictionary), so any gzip reader opens it.

Without ``isal`` the same functions return :class:`gzip.GzipFile` streams, so callers need no
second code path; :func:`codec` names the one in use.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib

try:  # ISA-L is optional: the standard library is the fallback.
    from isal import igzip, igzip_threaded, isal_zlib
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    igzip = igzip_threaded = isal_zlib = None

__all__ = ["READ_ERRORS", "codec", "open_read", "open_write"]

#: Compression level: 1 is the fastest of both codecs; nibabel writes .nii.gz at level 1 too.
LEVEL = 1

#: Exceptions a damaged or truncated gzip stream raises while being read (either codec).
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error) + (
    (isal_zlib.error,) if isal_zlib is not None else ())


def codec() -> str:
    """The codec the next stream will use: ``"isal"`` or ``"zlib"``."""
    return "isal" if igzip is not None else "zlib"


def open_read(path: str | os.PathLike) -> io.BufferedIOBase:
    """A seekable binary stream of the decompressed contents of gzip file ``path``."""
    if igzip is not None:
        return igzip.IGzipFile(os.fspath(path), "rb")
    return gzip.GzipFile(os.fspath(path), "rb")


def open_write(path: str | os.PathLike, *, threads: int | None = None) -> io.RawIOBase:
    """A binary stream that writes gzip to ``path`` (closing it finishes the file).

    With ISA-L, ``threads`` worker threads compress blocks in parallel (default: the CPUs
    qnkit may use, at most 4). The stream's ``tell`` counts uncompressed bytes and ``seek``
    accepts only the current position, which is all that nibabel's writers ask of it.
    """
    if igzip_threaded is None:
        return gzip.GzipFile(os.fspath(path), "wb", compresslevel=LEVEL, mtime=0)
    if threads is None:
        from qnkit.cpus import default_threads

        threads = min(4, default_threads())
    return _Appender(igzip_threaded.open(os.fspath(path), "wb", compresslevel=LEVEL, threads=max(1, threads)))


class _Appender(io.RawIOBase):
    """A write-only stream over an unseekable one that keeps count of its position.

    nibabel "seeks" to the position it is already at before writing the header and the data; the
    threaded gzip writer cannot seek at all, so this wrapper answers those calls itself.
    """

    def __init__(self, stream) -> None:
        super().__init__()
        self._stream = stream
        self._position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self._stream.write(data)
        self._position += written
        return written

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if target != self._position:
            raise io.UnsupportedOperation(f"gzip writer can only append (at {self._position}, asked {target})")
        return self._position

    def flush(self) -> None:
        if not self._stream.closed:  # IOBase.close() flushes once more after the stream closed
            self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                super().close()
