"""File-system helpers: atomic writes (nothing is ever half-written under its final name)
and the one-line explanations of a storage location that cannot be written."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"  # the last file a build_once directory gets


def is_built(target: Path) -> bool:
    """Whether `build_once` has finished `target` (a directory being built is not)."""
    return (target / COMPLETE).is_file()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build directory `target` via `build(tmp_dir)` unless it exists; atomic, race-safe."""
    if is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same build first; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_built(target):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same directory, fsync, then rename over `path`:
    readers (the driver, a user tailing a run dir) never see a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports and configs are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text version of atomic_write_bytes (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# Errors that say where a run writes is unusable, not that the code is wrong: each gets one
# line naming the place and the fix instead of a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
STORAGE_ERRNOS = (*DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                  errno.EEXIST)


def dir_problem(path: str | Path) -> str | None:
    """Why directory `path` (existing or to be created) cannot be written into: it or a
    parent is a file, or the nearest existing one is read-only; None when it can."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        if probe.is_symlink():
            return f"{probe} is a broken symlink"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable (read-only file system or permissions)"
    return None


def storage_error_line(exc: OSError, where: str | Path, then: str) -> str | None:
    """One line for an OSError that means the storage under `where` is unusable (disk
    full, read-only, permissions, a file in the way); `then` is what to do after the fix.
    None for any other OSError (a bug: let it raise)."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    file = f" (writing {exc.filename})" if exc.filename else ""
    if exc.errno in DISK_FULL:
        return f"{where}: the disk is full{file}; free space there, then {then}"
    return f"{where}: cannot write{file}: {exc.strerror or exc}; fix the location, then {then}"


def fsync_dir(path: str | Path) -> None:
    """Make a create or rename inside directory `path` durable; harmless where directories
    cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
