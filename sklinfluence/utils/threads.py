"""How many torch threads the library's own computations use.

torch starts one intra-op thread per core. For the small models this library
is mostly used on, the extra threads only add synchronisation, and on a
machine whose other cores are busy they make every operation wait for a
descheduled thread. Measured by ``benchmarks/bench_threads.py`` (2 cores,
best of 3): the command line's main job took 6.1 s with one thread and
14.4 s with torch's default of two while another process kept the second
core busy (2.35×); on an idle machine the settings were within 10 %
(5.7–6.5 s). A net with 112,810 parameters, on the other hand, trained and
scored in 0.67× the time of one thread with both cores.

:func:`compute_section` wraps every public computing method (``fit``,
``score_samples``, ``transform``, …). With the default setting
(``set_config(n_threads=None)``) it

- leaves torch alone when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set
  (the user has chosen);
- otherwise uses one thread, and all available cores once the model is known
  to have at least :data:`MANY_THREADS_MIN_PARAMS` parameters (code that
  learns the model's size inside a section calls :func:`model_size_known`);

and restores the caller's thread count when the outermost section returns.
``set_config(n_threads=k)`` uses ``k`` threads everywhere instead.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, TypeVar

import torch

from .._config import get_config

__all__ = ["MANY_THREADS_MIN_PARAMS", "THREAD_VARIABLES", "automatic_threads",
           "compute_section", "model_size_known"]

#: Environment variables that mean "the user has chosen the thread count".
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Models with at least this many parameters get all available cores by default.
MANY_THREADS_MIN_PARAMS = 100_000

_state = threading.local()
F = TypeVar("F", bound=Callable[..., Any])


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def automatic_threads(n_params: int | None) -> int | None:
    """The thread count for a model of ``n_params`` parameters, ``None``: leave torch alone.

    Parameters
    ----------
    n_params : int or None
        The model's parameter count, ``None`` while unknown.

    Returns
    -------
    int or None
        ``set_config``'s ``n_threads`` when set; ``None`` when an environment
        variable of :data:`THREAD_VARIABLES` is set; otherwise 1, or the
        available cores for models of at least
        :data:`MANY_THREADS_MIN_PARAMS` parameters.
    """
    chosen = get_config()["n_threads"]
    if chosen is not None:
        return int(chosen)
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return None
    if n_params is not None and n_params >= MANY_THREADS_MIN_PARAMS:
        return _available_cores()
    return 1


def _apply(n_params: int | None) -> None:
    threads = automatic_threads(n_params)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def model_size_known(n_params: int) -> None:
    """Inside a :func:`compute_section`, re-choose the threads for a model of this size.

    Outside a section it does nothing.
    """
    if getattr(_state, "depth", 0):
        _apply(int(n_params))


def compute_section(method: F) -> F:
    """Run ``method`` with the library's thread choice, restoring the caller's after.

    Sections nest: only the outermost one chooses and restores. The size of
    a fitted estimator's model (``self.model_``) is used when there is one.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_state, "depth", 0)
        if depth:
            return method(self, *args, **kwargs)
        previous = torch.get_num_threads()
        model = getattr(self, "model_", None)
        _state.depth = 1
        try:
            _apply(getattr(model, "n_params", None))
            return method(self, *args, **kwargs)
        finally:
            _state.depth = 0
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    return wrapper  # type: ignore[return-value]
