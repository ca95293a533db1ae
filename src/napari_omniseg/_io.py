"""Crash-safe file writing shared by every module that saves user data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(d: "str | Path") -> None:
    """Make a rename in ``d`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(base: int = 0o666) -> int:
    """The mode a plain ``open()`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def apply_umask(fd_or_path: "int | str | Path") -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the user's usual mode, so a
    colleague's QuPath or another account can read what the project writes."""
    mode = umask_mode()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


class InUseError(RuntimeError):
    """Another process holds the lock of a file the project writes."""


def process_lock(path: "str | Path", timeout: float = 60.0):
    """An inter-process lock beside ``path`` (``<path>.lock``): a second writer waits up to
    ``timeout`` seconds, then gets :class:`InUseError` naming the file (never a lost write)."""
    from contextlib import contextmanager

    import filelock

    lock_path = str(path) + ".lock"

    @contextmanager
    def held():
        lock = filelock.FileLock(lock_path, timeout=timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise InUseError(f"{path} is in use by another process (lock {lock_path} held for over {timeout:.0f} s); "
                             "try again when it has finished") from None
        try:
            yield
        finally:
            lock.release()

    return held()


def atomic_write_bytes(path: "str | Path", data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename.

    A crash leaves either the old file or the new one, never a mix.  With
    ``overwrite=False`` an existing file is never replaced (FileExistsError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        apply_umask(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the target appeared meanwhile
            os.unlink(tmp)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
