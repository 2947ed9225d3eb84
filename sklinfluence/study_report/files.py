"""Writing result files so that an interrupted run never leaves half a file.

Each file is written under a temporary name in its own directory and
renamed into place (an atomic replace on POSIX and Windows), with the
permissions a plain ``open(path, "w")`` would have given it.
"""

from __future__ import annotations

import csv
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["atomic_write", "write_csv", "write_bytes", "write_text"]


def _plain_write_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the file's own, or ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Parameters
    ----------
    path : str or path
        The file to write; its directory is created if missing.
    write : callable
        Writes the whole file to the name it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _plain_write_mode(path))  # mkstemp's 0o600 would make results private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_csv(path: str | os.PathLike, header: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file with a header row, atomically.

    Parameters
    ----------
    path : str or path
        The file.
    header : sequence of str
        The first row.
    rows : sequence of sequence
        The other rows (numbers are written by ``str``: exactly, for Python
        floats).
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a file, atomically.

    Parameters
    ----------
    path : str or path
        The file.
    data : bytes
        Its whole content.
    """
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a file in UTF-8, atomically.

    Parameters
    ----------
    path : str or path
        The file.
    text : str
        Its whole content.
    """
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
