"""Process-wide settings, in the style of :func:`sklearn.set_config`.

- ``n_threads``: torch threads inside the library's compute sections
  (``None``: chosen by the library, see :mod:`sklinfluence.utils.threads`).
- ``response_cache_bytes``: the size of the in-process response cache
  (see :class:`sklinfluence.response.cache.ResponseCache`); ``0`` turns it off.
- ``memory_limit_bytes``: the most a dense ``P × P`` curvature may take
  (``None``: half the memory the system reports available at the time; see
  :mod:`sklinfluence.utils.memory`).
- ``working_memory_bytes``: the most a streamed computation holds at once
  (chunks of per-sample gradients and layer captures), in the spirit of
  scikit-learn's ``working_memory``.
- ``time_budget_seconds``: the longest computation ``solver="auto"`` starts
  without falling back to an approximation.

:func:`set_config` changes them, :func:`get_config` reads them and
:func:`config_context` changes them for a ``with`` block only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any, Callable, Iterator

__all__ = ["get_config", "set_config", "config_context", "on_change"]

_DEFAULTS = {"n_threads": None, "response_cache_bytes": 256 * 2**20, "memory_limit_bytes": None,
             "working_memory_bytes": 64 * 2**20, "time_budget_seconds": 600.0}
_lock = threading.Lock()
_config = dict(_DEFAULTS)
_listeners: dict = {name: [] for name in _DEFAULTS}


def on_change(name: str, listener: Callable[[], None]) -> None:
    """Call ``listener()`` after each :func:`set_config` that sets ``name``.

    How the modules that follow a setting learn of it without this module
    importing them (the response cache resizes itself to
    ``response_cache_bytes``).
    """
    _listeners[name].append(listener)


def get_config() -> dict:
    """The current settings, a copy.

    Returns
    -------
    dict
        ``{"n_threads": ..., "response_cache_bytes": ..., "memory_limit_bytes": ...,
        "working_memory_bytes": ..., "time_budget_seconds": ...}``.

    Examples
    --------
    >>> from sklinfluence import get_config
    >>> sorted(get_config())
    ['memory_limit_bytes', 'n_threads', 'response_cache_bytes', 'time_budget_seconds', 'working_memory_bytes']
    """
    with _lock:
        return dict(_config)


def _check(name: str, value: Any) -> None:
    if name == "n_threads":
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)
                                  or value < 1):
            raise ValueError(
                f"n_threads must be None (chosen by the library) or an integer >= 1, "
                f"got {value!r}.")
    elif name == "response_cache_bytes":
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(
                "response_cache_bytes must be an integer >= 0 (0 turns the in-process "
                f"response cache off), got {value!r}.")
    elif name == "memory_limit_bytes":
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)
                                  or value < 1):
            raise ValueError(
                "memory_limit_bytes must be None (half the available memory) or an integer "
                f">= 1, got {value!r}.")
    elif name == "working_memory_bytes":
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(
                f"working_memory_bytes must be an integer >= 1, got {value!r}.")
    elif name == "time_budget_seconds":
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
            raise ValueError(
                f"time_budget_seconds must be a number > 0, got {value!r}.")


def set_config(n_threads: Any = "keep", response_cache_bytes: Any = "keep",
               memory_limit_bytes: Any = "keep", working_memory_bytes: Any = "keep",
               time_budget_seconds: Any = "keep") -> None:
    """Change sklinfluence's process-wide settings.

    Parameters
    ----------
    n_threads : int or None, optional
        torch intra-op threads used inside sklinfluence's own computations
        (fitting, scoring, transforming, the command line); the caller's
        setting is restored when each call returns. ``None`` (the default
        setting) lets the library choose: it leaves torch alone when
        ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set, and otherwise
        uses one thread for small models (where more threads only add
        contention) and the available cores for large ones. Joblib workers
        always use one thread each.
    response_cache_bytes : int, optional
        Bytes of computed responses kept in memory (default 256 MiB), so
        that a grid search's candidates share an expensive reference
        (leave-one-out retrainings, PBRF solves) instead of recomputing it.
        Responses are kept on behalf of the estimators that computed or
        reused them and their clones, and released when the last of these
        is garbage collected; a smaller bound evicts the least recently
        used first. ``0`` turns the cache off (and empties it). See
        :class:`~sklinfluence.response.cache.ResponseCache` and the user guide's
        "Caching of responses".
    memory_limit_bytes : int or None, optional
        The most memory a dense ``P × P`` curvature matrix may take: the
        exact solver, rung 4 of the :class:`~sklinfluence.Decomposer` and
        the PBRF's shared factor build one only when ``16 P²`` bytes (the
        matrix and its Cholesky factor, float64) fit. ``None`` (the default
        setting) means half of what the system reports available
        (``MemAvailable``) at the time of the call. Above it, ``"auto"``,
        rung 4 and the PBRF use matrix-free conjugate gradients and an
        explicit ``solver="exact"`` is refused before allocating, with a
        :class:`~sklinfluence.utils.memory.NotEnoughMemoryError` that names the
        sizes and the options that fit.
    working_memory_bytes : int, optional
        The most memory a streamed computation holds at once (default
        64 MiB): the chunks in which per-sample gradients, layer captures
        and the training side of influence matrices, self-influence and
        top-k are computed are sized to fit it. Smaller values mean more,
        smaller chunks and the same results.
    time_budget_seconds : float, optional
        The longest computation ``solver="auto"`` starts for an exact answer
        (default 600): it predicts the time of each exact option from the
        sizes and, where none fits, picks an approximation and says so in a
        warning that names the exact alternative and its predicted cost.

    Examples
    --------
    >>> from sklinfluence import get_config, set_config
    >>> before = get_config()["n_threads"]
    >>> set_config(n_threads=1)
    >>> get_config()["n_threads"]
    1
    >>> set_config(n_threads=before)
    """
    changes = {name: value for name, value in
               (("n_threads", n_threads), ("response_cache_bytes", response_cache_bytes),
                ("memory_limit_bytes", memory_limit_bytes),
                ("working_memory_bytes", working_memory_bytes),
                ("time_budget_seconds", time_budget_seconds))
               if not (isinstance(value, str) and value == "keep")}
    for name, value in changes.items():
        _check(name, value)
    with _lock:
        _config.update(changes)
    for name in changes:
        for listener in _listeners[name]:
            listener()


@contextmanager
def config_context(**changes: Any) -> Iterator[None]:
    """Change settings for the duration of a ``with`` block.

    Parameters
    ----------
    **changes
        The keywords of :func:`set_config`.

    Examples
    --------
    >>> from sklinfluence import config_context, get_config
    >>> with config_context(response_cache_bytes=0):
    ...     get_config()["response_cache_bytes"]
    0
    """
    unknown = sorted(set(changes) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}; known: {sorted(_DEFAULTS)}.")
    before = get_config()
    set_config(**changes)
    try:
        yield
    finally:
        set_config(**{name: before[name] for name in changes})
