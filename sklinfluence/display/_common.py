"""What the displays share: choices, labels, axes and the curve they compute.

The parameters of :func:`~sklinfluence.study.decomposition_curve` that both
curve displays' ``from_estimator`` pass on are documented once here
(``fill_doc``) and computed once (``display_from_curve``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..study import decomposition_curve

STYLES = ("errorbar", "fill_between", None)
SPREADS = ("seeds_and_rows", "seeds")
REFERENCE_LABELS = {"pbrf": "PBRF", "proximal": "proximal retraining",
                     "warm_start": "warm-start retraining", "loo": "cold-start LOO"}
METRIC_LABELS = {"output_l2": "mean ‖Δf‖₂ over the evaluation inputs",
                  "loss": "change of the mean evaluation loss"}
QUANTITY_LABELS = {"self": "self-influence of the removed rows",
                    "eval": "change of the mean evaluation loss"}


def axes_or_new(ax: Any) -> Any:
    """``ax``, or the axes of a new pyplot figure when it is None."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    return ax


def x_positions(param_range: np.ndarray) -> tuple[np.ndarray, bool]:
    """Plotting positions: the values when numeric, else 0, 1, ... (categorical)."""
    try:
        x = np.asarray(param_range, dtype=np.float64)
    except (TypeError, ValueError):
        return np.arange(len(param_range), dtype=np.float64), False
    if x.ndim != 1 or not np.isfinite(x).all():
        return np.arange(len(param_range), dtype=np.float64), False
    return x, True


def auto_xscale(x: np.ndarray) -> str:
    """The x scale for parameter values.

    scikit-learn's rule (largest over smallest gap above 5: log), and log for
    a range of positive values spanning a factor 10 or more in at most 2
    values; symlog where the values reach 0 or below.
    """
    distinct = np.unique(x)
    if len(distinct) < 2:
        return "linear"
    gaps = np.diff(distinct)
    spread = gaps.max() / gaps.min() > 5 if len(distinct) > 2 else (
        distinct[0] > 0 and distinct[-1] / distinct[0] >= 10)
    if not spread:
        return "linear"
    return "log" if distinct[0] > 0 else "symlog"


def set_x(ax: Any, x: np.ndarray, numeric: bool, param_range: np.ndarray, xscale: Any,
           param_name: str) -> None:
    """Scale, ticks and label of the x axis: the values, or categories at 0, 1, ..."""
    if numeric:
        scale = auto_xscale(x) if xscale is None else xscale
        ax.set_xscale(scale)
        if scale != "linear" and len(np.unique(x)) <= 8:
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.minorticks_off()
    else:
        ax.set_xticks(x, [str(v) for v in param_range])
    ax.set_xlabel(param_name)


def check_choice(name: str, value: Any, options: Sequence) -> None:
    """Raise a ValueError naming the options unless ``value`` is one of them."""
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}.")




# ------------------------------------------------------------------ from an estimator
#: Docstring fragments, each put in place of a line ``{name}`` by :func:`fill_doc`.
_FRAGMENTS = {
    "curve_parameters": """\
estimator : Decomposer
    Cloned, configured and fitted for each value and seed.
X, y : array-like
    Training data.
param_name : str
    The swept parameter (see
    :func:`~sklinfluence.study.decomposition_curve`).
param_range : sequence
    Its values.
seeds : sequence of int or int, default=(0, 1, 2)
    One training run per seed.
rows : int or array-like of int, default=10
    The removed training rows, or how many to draw.
X_eval, y_eval : array-like, default=None
    The evaluation set (default: the training rows).
random_state : int, RandomState instance or None, default=0
    Draws ``rows`` when it is an int.
memory : str, path, joblib.Memory or None, default=None
    Caches each (value, seed) cell.
n_jobs : int, default=None
    Cells computed in parallel by joblib.
verbose : int, default=0
    ``> 0``: a progress bar.""",
    "agreement_choice": """\
quantity : {"self", "eval"}, default="self"
    The rows' self-influence, or the change of the mean evaluation
    loss.
statistic : {"spearman", "pearson"}, default="spearman"
    The correlation.
references : list of str, default=("pbrf", "warm_start", "loo")
    Any of ``"pbrf"``, ``"proximal"``, ``"warm_start"``, ``"loo"``.""",
}


def fill_doc(function: Callable) -> Callable:
    """Replace each line ``{name}`` of a docstring by the fragment ``name``.

    Parameters
    ----------
    function : callable
        Its docstring names fragments on lines of their own, at the
        parameters' indentation.

    Returns
    -------
    function : callable
        The same, its docstring filled in.
    """
    lines = []
    for line in function.__doc__.splitlines():
        name = line.strip()[1:-1] if line.strip().startswith("{") else None
        if name in _FRAGMENTS:
            indent = line[:len(line) - len(line.lstrip())]
            lines += [indent + row for row in _FRAGMENTS[name].splitlines()]
        else:
            lines.append(line)
    function.__doc__ = "\n".join(lines)
    return function


#: The arguments of :func:`~sklinfluence.study.decomposition_curve` that the curve
#: displays' ``from_estimator`` take under the same names.
CURVE_ARGUMENTS = ("estimator", "X", "y", "param_name", "param_range", "seeds", "rows",
                   "X_eval", "y_eval", "random_state", "memory", "n_jobs", "verbose")


def display_from_curve(from_results: Callable, arguments: Mapping[str, Any],
                       **plot_kw: Any) -> Any:
    """The body of both curve displays' ``from_estimator``.

    Parameters
    ----------
    from_results : callable
        The display's ``from_results``.
    arguments : mapping
        ``from_estimator``'s own arguments by name; those of
        :data:`CURVE_ARGUMENTS` go to
        :func:`~sklinfluence.study.decomposition_curve`.
    **plot_kw
        Passed to ``from_results``.

    Returns
    -------
    display : object
        The display, with the curve's results as ``results_``.
    """
    results = decomposition_curve(**{name: arguments[name] for name in CURVE_ARGUMENTS})
    display = from_results(results, **plot_kw)
    display.results_ = results
    return display
