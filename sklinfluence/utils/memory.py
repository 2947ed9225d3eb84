"""How much memory a dense curvature may take, checked before it is allocated.

A dense damped curvature ``C + λI`` of ``P`` parameters takes ``8 P²`` bytes in
float64 and as much again for its Cholesky factor: 0.4 GB at ``P = 5,000``,
82 GB at 71,754 (a small CNN), 204 GB at 112,810. :func:`dense_fits_memory`
says whether those ``16 P²`` bytes fit in the limit — ``memory_limit_bytes``
of :func:`sklinfluence.set_config`, by default half of what the system
reports available (``MemAvailable`` of ``/proc/meminfo``) at the time of the
call — and :func:`check_dense` raises :class:`NotEnoughMemoryError`, naming
the sizes and what fits instead, where they do not. The library calls it
before every dense ``P × P`` allocation
(:meth:`~sklinfluence.curvature.operator.Curvature.dense`), so a request that cannot
fit fails with that message instead of an allocator error minutes later.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from .._config import get_config
from ..exceptions import NotEnoughMemoryError

__all__ = ["available_bytes", "memory_limit", "dense_bytes",
           "dense_fits_memory", "check_dense", "format_bytes", "working_memory", "chunk_rows", "holding"]


def available_bytes() -> int | None:
    """Memory the system reports available to new allocations, or None if unknown.

    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical
    pages (``os.sysconf``).
    """
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit() -> int | None:
    """The bytes a dense curvature may take now (None: no limit known)."""
    limit = get_config()["memory_limit_bytes"]
    if limit is not None:
        return int(limit)
    available = available_bytes()
    return None if available is None else available // 2


_HELD: contextvars.ContextVar[int] = contextvars.ContextVar("sklinfluence_held", default=0)


def working_memory() -> int:
    """The bytes a streamed computation may hold at once: ``working_memory_bytes``
    of :func:`sklinfluence.set_config`, read now, less what the enclosing
    :func:`holding` blocks hold (a quarter of the setting at least)."""
    setting = int(get_config()["working_memory_bytes"])
    return max(setting - _HELD.get(), setting // 4)


@contextlib.contextmanager
def holding(n_bytes: int) -> Iterator[None]:
    """Within the block, ``n_bytes`` held by the caller (e.g. the solutions a
    stream of products is taken with) count against :func:`working_memory`."""
    token = _HELD.set(_HELD.get() + max(int(n_bytes), 0))
    try:
        yield
    finally:
        _HELD.reset(token)


def chunk_rows(bytes_per_row: float, n_rows: int | None = None) -> int:
    """Rows per chunk of a computation holding ``bytes_per_row`` bytes per row:
    as many as fit in :func:`working_memory` (one at least, ``n_rows`` at most)."""
    rows = max(1, int(working_memory() // max(float(bytes_per_row), 1.0)))
    return rows if n_rows is None else max(1, min(rows, int(n_rows)))


def dense_bytes(n_params: int) -> int:
    """Bytes to build and factorise a dense ``P × P`` float64 matrix: ``16 P²``."""
    return 16 * int(n_params) ** 2


def dense_fits_memory(n_params: int, limit: int | None = None) -> bool:
    """Whether a dense ``P × P`` curvature and its factor fit in ``limit``
    (default: :func:`memory_limit`, read now)."""
    limit = memory_limit() if limit is None else limit
    return limit is None or dense_bytes(n_params) <= limit


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps the number at least 1 (KB = 1000 B)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def check_dense(n_params: int) -> None:
    """Raise :class:`NotEnoughMemoryError` unless ``16 P²`` bytes fit in the limit.

    Parameters
    ----------
    n_params : int
        ``P``, the number of parameters.
    """
    limit = memory_limit()
    if dense_fits_memory(n_params, limit):
        return
    setting = get_config()["memory_limit_bytes"]
    source = ("set_config(memory_limit_bytes=...)" if setting is not None else
              "half the memory this system reports available; "
              "set_config(memory_limit_bytes=...) changes it")
    raise NotEnoughMemoryError(
        f"the damped curvature of this net is a dense {n_params:,} × {n_params:,} matrix: "
        f"{format_bytes(dense_bytes(n_params))} to build and factorise (16·P² bytes, float64), "
        f"more than the limit of {format_bytes(limit)} ({source}). Nothing was allocated. "
        "What fits: solver='cg' (matrix-free block conjugate gradients, the exact answer to "
        "its tol, about 40·k·P bytes for k right-hand sides) or solver='auto' (which picks "
        "it), or an approximation such as solver='ekfac'.")
