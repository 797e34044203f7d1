"""Atomic file writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path, write_fn: Callable[[str], object]) -> Path:
    """Write a file so that it either appears complete or not at all.

    ``write_fn`` writes to a temporary file in the same directory, which is then
    flushed to disk and renamed over ``path`` with :func:`os.replace` (atomic on
    POSIX and Windows within one file system). If ``write_fn`` raises, the
    temporary file is removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory must exist.
    write_fn : callable
        Called with the temporary file's path (a ``str``); must write the whole file there.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from momaestimator._io import atomic_write
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = atomic_write(f"{tmp}/notes.txt", lambda p: Path(p).write_text("done"))
    ...     out.read_text()
    'done'
    """
    path = Path(path)
    # Reserved with O_EXCL like mkstemp, but with the permissions an ordinary open would give
    # (mkstemp's 0600 would otherwise end up on the final file).
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
