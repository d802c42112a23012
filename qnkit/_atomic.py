"""Crash-safe writes: a file or a folder is written under a temporary name beside its target, made
durable, then renamed into place, so that whatever moment the process dies (SIGKILL, power loss,
a full disk), the target is either its previous whole content or the new whole content.

The protocol (files: :func:`atomic_path`; folders: :func:`temp_dir` + :func:`swap_in_dir`):
- the temporary is created with ``O_EXCL`` (mode 0o666 / 0o777, so the kernel applies the umask:
  the umask is never read by setting it process-wide, which would race other threads creating files);
- it is fsync'ed (every file of a folder, then the folder) before the rename, and the parent folder
  is fsync'ed after the rename, so the rename cannot reach the disk before the data it names;
- without overwrite, a file is published with ``link`` (fails if the target exists: no
  check-then-replace race between writers);
- a folder is swapped with one ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it; else the
  old folder is first renamed to :func:`previous_path` (readers fall back to it) and removed last.
Temporaries carry the writer's host and pid; the next write beside the same target removes those
of writers that are dead, so a killed writer leaves nothing behind for long.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
import socket
from pathlib import Path

_TMP_MARK = ".tmp"


def _suffixes(path: Path) -> str:
    # Keep compound suffixes (".nii.gz") so that writers that choose a format by name still work.
    name = path.name
    for compound in (".nii.gz", ".tar.gz"):
        if name.endswith(compound):
            return compound
    return path.suffix


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def _temp_name(target: Path, suffix: str = "") -> Path:
    """``.NAME.HOST-PID-RANDOM.tmpSUFFIX`` beside the target."""
    return target.with_name(f".{target.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}{_TMP_MARK}{suffix}")


def _writer_is_dead(tmp: Path, target: Path) -> bool:
    """True for a temporary of ``target`` whose writer ran on this host and no longer runs."""
    stem = tmp.name[len(f".{target.name}."):].split(_TMP_MARK, 1)[0]
    parts = stem.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, or not ours to signal: keep it
    return False


def sweep_stale(target: str | os.PathLike) -> None:
    """Remove temporaries of ``target`` left by writers that died (same host, pid gone)."""
    target = Path(target)
    with contextlib.suppress(OSError):
        for tmp in target.parent.glob(f".{glob.escape(target.name)}.*{_TMP_MARK}*"):
            if _writer_is_dead(tmp, target):
                _discard(tmp)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's content and metadata to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a folder tree; nothing if it is not there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(path: Path) -> None:
    """Best-effort removal of a temporary or a superseded copy: a failure here must not fail a write
    that has already succeeded, nor hide the error that made a write fail."""
    with contextlib.suppress(OSError):
        remove_path(path)


def _create_exclusive(target: Path, suffix: str) -> Path:
    while True:
        tmp = _temp_name(target, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue


def _publish_new(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` only if nothing has it (atomically), then drop ``tmp``."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{target} exists", str(target)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        # A file system without hard links: reserve the name with O_EXCL, then replace the placeholder.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, target)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary path next to ``path``; on success make it ``path``, on error remove it.

    With ``overwrite=False`` an existing ``path`` raises FileExistsError (also when another writer
    publishes it while this one is writing).
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsError(errno.EEXIST, f"{target} exists", str(target))
    sweep_stale(target)
    tmp = _create_exclusive(target, _suffixes(target))
    try:
        yield tmp
        fsync_path(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            _publish_new(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


# ------------------------------------------------------------------ folders
def previous_path(target: str | os.PathLike) -> Path:
    """Where :func:`swap_in_dir` keeps the previous folder while it swaps without an atomic exchange."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def temp_dir(target: str | os.PathLike) -> Path:
    """A new empty folder beside ``target`` to fill and then :func:`swap_in_dir` (mode 0o777 less umask);
    on failure, :func:`discard_temp` it."""
    target = Path(target)
    sweep_stale(target)
    while True:
        tmp = _temp_name(target)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    with contextlib.suppress(AttributeError, OSError):
        func = ctypes.CDLL(None, use_errno=True).renameat2
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return func
    return None


def exchange_supported() -> bool:
    """Whether the C library offers renameat2 (the file system may still refuse an exchange)."""
    return _renameat2() is not None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step; False where the kernel or file system cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make the finished folder ``tmp`` the folder ``target``, replacing any previous one.

    At every moment one whole copy exists: ``target``, or (only while swapping without an atomic
    exchange) :func:`previous_path`; :func:`current_or_previous` finds it.
    """
    tmp, target = Path(tmp), Path(target)
    parent, old = target.parent, previous_path(target)
    fsync_tree(tmp)
    if target.exists():
        if exchange(tmp, target):
            fsync_path(parent)
            _discard(tmp)  # now the previous folder
            return target
        _discard(old)  # a leftover of an earlier interrupted swap; `target` is whole
        os.replace(target, old)
        fsync_path(parent)
    os.replace(tmp, target)
    fsync_path(parent)
    _discard(old)
    return target


def discard_temp(tmp: str | os.PathLike) -> None:
    """Remove an unfinished temporary folder (best effort: the error that stopped the write matters more)."""
    _discard(Path(tmp))


def current_or_previous(target: str | os.PathLike, complete=lambda folder: folder.is_dir()) -> Path | None:
    """``target`` if ``complete(target)``, else the previous copy of an interrupted swap, else None."""
    for folder in (Path(target), previous_path(target)):
        if complete(folder):
            return folder
    return None
