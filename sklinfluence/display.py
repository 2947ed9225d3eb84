"""Display objects for the studies of :mod:`sklinfluence.study`.

Built as scikit-learn's displays are
(:class:`~sklearn.model_selection.ValidationCurveDisplay`,
:class:`~sklearn.metrics.RocCurveDisplay`): ``__init__`` stores the data,
:meth:`plot` draws it on an ``ax`` (a new figure by default) and returns the
display with the matplotlib artists as attributes (``lines_``, ``ax_``,
``figure_``, ...), and class methods build and plot in one call from the
results of a study (``from_results``), from an estimator
(``from_estimator``/``from_estimators``) or from scores (``from_scores``).

- :class:`TermsCurveDisplay`: the five terms of the influence–LOO gap
  against a parameter, on a symmetric-log axis where a term that is exactly
  zero stays visible;
- :class:`AgreementCurveDisplay`: the correlation of the influence
  estimate with the PBRF, warm-start retraining and leave-one-out against
  a parameter;
- :class:`DetectionCurveDisplay`: mislabel detection curves of several
  self-scores at once.
"""

from __future__ import annotations

import warnings
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .study import (QUANTITIES, REFERENCES, STATISTICS, decomposition_curve,
                    detection_curve)

__all__ = ["TermsCurveDisplay", "AgreementCurveDisplay", "DetectionCurveDisplay"]

_STYLES = ("errorbar", "fill_between", None)
_SPREADS = ("seeds_and_rows", "seeds")
_REFERENCE_LABELS = {"pbrf": "PBRF", "proximal": "proximal retraining",
                     "warm_start": "warm-start retraining", "loo": "cold-start LOO"}
_METRIC_LABELS = {"output_l2": "mean ‖Δf‖₂ over the evaluation inputs",
                  "loss": "change of the mean evaluation loss"}
_QUANTITY_LABELS = {"self": "self-influence of the removed rows",
                    "eval": "change of the mean evaluation loss"}


def _axes(ax: Any) -> Any:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    return ax


def _x_positions(param_range: np.ndarray) -> tuple[np.ndarray, bool]:
    """Plotting positions: the values when numeric, else 0, 1, ... (categorical)."""
    try:
        x = np.asarray(param_range, dtype=np.float64)
    except (TypeError, ValueError):
        return np.arange(len(param_range), dtype=np.float64), False
    if x.ndim != 1 or not np.isfinite(x).all():
        return np.arange(len(param_range), dtype=np.float64), False
    return x, True


def _auto_xscale(x: np.ndarray) -> str:
    """scikit-learn's rule (largest over smallest gap above 5: log), and log for a
    range of positive values spanning a factor 10 or more in at most 2 values."""
    distinct = np.unique(x)
    if len(distinct) < 2:
        return "linear"
    gaps = np.diff(distinct)
    spread = gaps.max() / gaps.min() > 5 if len(distinct) > 2 else (
        distinct[0] > 0 and distinct[-1] / distinct[0] >= 10)
    if not spread:
        return "linear"
    return "log" if distinct[0] > 0 else "symlog"


def _set_x(ax: Any, x: np.ndarray, numeric: bool, param_range: np.ndarray, xscale: Any,
           param_name: str) -> None:
    if numeric:
        scale = _auto_xscale(x) if xscale is None else xscale
        ax.set_xscale(scale)
        if scale != "linear" and len(np.unique(x)) <= 8:
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.minorticks_off()
    else:
        ax.set_xticks(x, [str(v) for v in param_range])
    ax.set_xlabel(param_name)


def _check_choice(name: str, value: Any, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}.")


class TermsCurveDisplay:
    """The five terms of the influence–LOO gap against a parameter.

    One line per term: its mean over seeds and removed rows at each value,
    with bars (or a band) of one standard deviation, by default on a
    symmetric-log axis — logarithmic above the smallest non-zero value and
    linear through 0, so that a term that is exactly zero (the exact
    solver's ``solver_error``) is drawn at 0 and labelled so, instead of
    vanishing as on a log axis. Build it with :meth:`from_results` or
    :meth:`from_estimator`.

    Parameters
    ----------
    param_name : str
        Name of the swept parameter (the x label).
    param_range : array-like of shape (n_values,)
        Its values.
    terms : ndarray of shape (n_values, n_seeds, n_rows, n_terms) or (n_values, n_seeds, n_terms)
        The terms of each removed row (``decomposition_curve(...).terms``),
        or only their mean over rows per seed.
    term_names : list of str, default=None
        Names of the terms (default: ``term 0``, ``term 1``, ...).
    metric : {"output_l2", "loss"}, default=None
        The Decomposer's metric, for the y label.

    Attributes
    ----------
    lines_ : list of matplotlib.lines.Line2D
        The mean of each plotted term (in ``terms`` order); ``get_ydata()``
        is the mean over seeds and rows.
    errorbars_ : list of matplotlib.container.ErrorbarContainer or None
        The spread bars (``std_display_style="errorbar"``).
    fill_between_ : list of matplotlib.collections.PolyCollection or None
        The spread bands (``std_display_style="fill_between"``).
    zero_terms_ : list of str
        The plotted terms that are exactly 0 at every value.
    annotations_ : list of matplotlib.text.Annotation
        The "exactly 0" labels of those terms.
    zero_markers_ : list of matplotlib.lines.Line2D
        With ``yscale="log"`` only: markers at the bottom edge for values
        that are 0 (or negative), which a log axis cannot show.
    spread_label_ : str
        What the bars are, e.g. ``"± 1 std over 3 seeds × 10 rows"`` (also
        the legend's title).
    ax_ : matplotlib.axes.Axes
    figure_ : matplotlib.figure.Figure
    results_ : Bunch
        The curve's results, when built by :meth:`from_estimator`.

    See Also
    --------
    sklinfluence.study.decomposition_curve : Computes the terms.
    AgreementCurveDisplay : The agreement of influence with ground truth.

    Examples
    --------
    >>> import numpy as np
    >>> from sklinfluence.display import TermsCurveDisplay
    >>> terms = np.abs(np.random.default_rng(0).normal(size=(3, 2, 4, 2)))
    >>> terms[..., 1] = 0.0
    >>> display = TermsCurveDisplay(param_name="damping", param_range=[1e-3, 1e-2, 1e-1],
    ...                             terms=terms, term_names=["warm_start_gap", "solver_error"])
    >>> display = display.plot()
    >>> display.zero_terms_, display.spread_label_
    (['solver_error'], '± 1 std over 2 seeds × 4 rows')
    """

    def __init__(self, *, param_name: str, param_range: Any, terms: Any,
                 term_names: Sequence[str] | None = None, metric: str | None = None) -> None:
        self.param_name = param_name
        self.param_range = param_range
        self.terms = terms
        self.term_names = term_names
        self.metric = metric

    def _data(self) -> tuple[np.ndarray, list]:
        terms = np.asarray(self.terms, dtype=np.float64)
        if terms.ndim == 3:
            terms = terms[:, :, None, :]
        if terms.ndim != 4:
            raise ValueError("terms must have shape (n_values, n_seeds, n_rows, n_terms) or "
                             f"(n_values, n_seeds, n_terms), got {terms.shape}.")
        if terms.shape[0] != len(self.param_range):
            raise ValueError(f"terms has {terms.shape[0]} values but param_range "
                             f"{len(self.param_range)}.")
        names = (list(self.term_names) if self.term_names is not None
                 else [f"term {k}" for k in range(terms.shape[-1])])
        if len(names) != terms.shape[-1]:
            raise ValueError(f"{len(names)} term_names for {terms.shape[-1]} terms.")
        return terms, names

    def plot(self, ax: Any = None, *, terms: Sequence[str] | None = None,
             spread_over: str = "seeds_and_rows", std_display_style: str | None = "errorbar",
             yscale: str = "symlog", xscale: str | None = None, line_kw: dict | None = None,
             errorbar_kw: dict | None = None,
             fill_between_kw: dict | None = None) -> "TermsCurveDisplay":
        """Plot the terms.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        terms : list of str, default=None
            The terms to plot (default: all).
        spread_over : {"seeds_and_rows", "seeds"}, default="seeds_and_rows"
            What the bars show: the standard deviation of the term over all
            (seed, row) pairs — how much it varies between removals and
            training runs — or over the seeds of the mean over rows — how
            much the plotted mean varies between training runs.
        std_display_style : {"errorbar", "fill_between"} or None, default="errorbar"
            How the spread is drawn, or not at all. For a term that is never
            negative the lower end stops at 0.
        yscale : {"symlog", "log", "linear"}, default="symlog"
            ``"symlog"`` is logarithmic from the smallest non-zero mean up
            and linear through 0 (zero terms drawn at 0). ``"log"`` cannot
            draw 0: such points become markers on the bottom edge, labelled.
        xscale : str, default=None
            ``None``: log for a numeric range spread over orders of
            magnitude, else linear (scikit-learn's rule).
        line_kw, errorbar_kw, fill_between_kw : dict, default=None
            Passed to ``ax.plot``, ``ax.errorbar`` and ``ax.fill_between``.

        Returns
        -------
        display : TermsCurveDisplay
            ``self``, with the artists as attributes.
        """
        from matplotlib.transforms import blended_transform_factory

        _check_choice("spread_over", spread_over, _SPREADS)
        _check_choice("std_display_style", std_display_style, _STYLES)
        _check_choice("yscale", yscale, ("symlog", "log", "linear"))
        data, names = self._data()
        chosen = names if terms is None else list(terms)
        unknown = [t for t in chosen if t not in names]
        if unknown:
            raise ValueError(f"unknown terms {unknown}; the terms are {names}.")
        ax = _axes(ax)
        param_range = np.asarray(self.param_range, dtype=object)
        x, numeric = _x_positions(param_range)
        n_seeds, n_rows = data.shape[1], data.shape[2]
        mean = data.mean(axis=(1, 2))
        if spread_over == "seeds_and_rows":
            std = data.std(axis=(1, 2))
            self.spread_label_ = (f"± 1 std over {n_seeds} seeds × {n_rows} rows" if n_rows > 1
                                  else f"± 1 std over {n_seeds} seeds")
        else:
            std = data.mean(axis=2).std(axis=1)
            self.spread_label_ = f"± 1 std over {n_seeds} seeds of the mean over {n_rows} rows"

        self.lines_, self.zero_terms_, self.annotations_, self.zero_markers_ = [], [], [], []
        self.errorbars_ = [] if std_display_style == "errorbar" else None
        self.fill_between_ = [] if std_display_style == "fill_between" else None
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        for name in chosen:
            k = names.index(name)
            m, s = mean[:, k], std[:, k]
            zero = bool(np.all(data[..., k] == 0))
            label = name.replace("_", " ") + (" (exactly 0)" if zero else "")
            line, = ax.plot(x, m, **{"marker": "o", "label": label, **(line_kw or {})})
            self.lines_.append(line)
            color = line.get_color()
            lower = np.minimum(s, m) if np.all(data[..., k] >= 0) else s
            if std_display_style == "errorbar":
                self.errorbars_.append(ax.errorbar(
                    x, m, yerr=np.vstack([lower, s]),
                    **{"fmt": "none", "ecolor": color, "capsize": 3, **(errorbar_kw or {})}))
            elif std_display_style == "fill_between":
                self.fill_between_.append(ax.fill_between(
                    x, m - lower, m + s, **{"color": color, "alpha": 0.2,
                                            **(fill_between_kw or {})}))
            if zero:
                self.zero_terms_.append(name)
            if yscale == "log" and np.any(m <= 0):
                at = m <= 0
                marker, = ax.plot(x[at], np.full(at.sum(), 0.02), linestyle="none", marker="v",
                                  color=color, transform=edge, clip_on=False)
                self.zero_markers_.append(marker)
                self.annotations_.append(ax.annotate(
                    f"{name.replace('_', ' ')}: 0", xy=(x[at][-1], 0.02), xycoords=edge,
                    xytext=(4, 4), textcoords="offset points", color=color, fontsize=8))
            elif zero:
                self.annotations_.append(ax.annotate(
                    "exactly 0", xy=(x[0], 0.0), xytext=(4, 4), textcoords="offset points",
                    color=color, fontsize=8))
        if yscale == "symlog":
            plotted = np.abs(mean[:, [names.index(t) for t in chosen]])
            positive = plotted[plotted > 0]
            linthresh = 10.0 ** np.floor(np.log10(positive.min())) if positive.size else 1.0
            ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
        else:
            ax.set_yscale(yscale)
        _set_x(ax, x, numeric, param_range, xscale, self.param_name)
        ax.set_ylabel(_METRIC_LABELS.get(self.metric, "term"))
        ax.legend(title=(f"bars: {self.spread_label_}" if std_display_style else None),
                  fontsize="small", title_fontsize="small")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_results(cls, results: Mapping, *, ax: Any = None, **plot_kw: Any
                     ) -> "TermsCurveDisplay":
        """Plot the terms of a :func:`~sklinfluence.study.decomposition_curve` result.

        Parameters
        ----------
        results : Bunch
            Returned by :func:`~sklinfluence.study.decomposition_curve`.
        ax : matplotlib Axes, default=None
            Axes to draw on.
        **plot_kw
            Passed to :meth:`plot` (``terms``, ``spread_over``,
            ``std_display_style``, ``yscale``, ...).

        Returns
        -------
        display : TermsCurveDisplay
        """
        return cls(param_name=results["param_name"], param_range=results["param_range"],
                   terms=results["terms"], term_names=results["term_names"],
                   metric=results.get("metric")).plot(ax=ax, **plot_kw)

    @classmethod
    def from_estimator(cls, estimator: Any, X: Any, y: Any, *, param_name: str,
                       param_range: Sequence, seeds: Any = (0, 1, 2), rows: Any = 10,
                       X_eval: Any = None, y_eval: Any = None, random_state: Any = 0,
                       memory: Any = None, n_jobs: int | None = None, verbose: int = 0,
                       ax: Any = None, **plot_kw: Any) -> "TermsCurveDisplay":
        """Compute a :func:`~sklinfluence.study.decomposition_curve` and plot its terms.

        To plot the agreement too without computing the curve twice, pass
        the display's ``results_`` to :meth:`AgreementCurveDisplay.from_results`.

        Parameters
        ----------
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
            ``> 0``: a progress bar.
        ax : matplotlib Axes, default=None
            Axes to draw on.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : TermsCurveDisplay
        """
        results = decomposition_curve(estimator, X, y, param_name=param_name,
                                      param_range=param_range, seeds=seeds, rows=rows,
                                      X_eval=X_eval, y_eval=y_eval, random_state=random_state,
                                      memory=memory, n_jobs=n_jobs, verbose=verbose)
        display = cls.from_results(results, ax=ax, **plot_kw)
        display.results_ = results
        return display


class AgreementCurveDisplay:
    """How well influence agrees with each ground-truth response, against a parameter.

    One line per reference response (PBRF, warm-start retraining, cold-start
    leave-one-out, ...): the mean over seeds of the correlation, over the
    removed rows, between the influence estimate and the reference, with
    bars of one standard deviation over the seeds. Build it with
    :meth:`from_results` or :meth:`from_estimator`.

    Parameters
    ----------
    param_name : str
        Name of the swept parameter.
    param_range : array-like of shape (n_values,)
        Its values.
    agreement : dict of str to ndarray of shape (n_values, n_seeds)
        Correlation with influence per reference name
        (``decomposition_curve(...).agreement[quantity][statistic]``).
    statistic : str, default="spearman"
        The correlation, for the y label.
    quantity : {"self", "eval"}, default="self"
        What was correlated, for the y label.
    n_rows : int, default=None
        Removed rows per correlation, for the legend.

    Attributes
    ----------
    lines_ : list of matplotlib.lines.Line2D
        Mean over seeds per reference (``nan`` seeds — constant scores —
        left out of the mean).
    errorbars_ : list of matplotlib.container.ErrorbarContainer or None
    fill_between_ : list of matplotlib.collections.PolyCollection or None
    references_ : list of str
        The plotted references, in ``lines_`` order.
    spread_label_ : str
        What the bars are (the legend's title).
    ax_ : matplotlib.axes.Axes
    figure_ : matplotlib.figure.Figure
    results_ : Bunch
        The curve's results, when built by :meth:`from_estimator`.

    See Also
    --------
    sklinfluence.study.decomposition_curve : Computes the agreement.
    TermsCurveDisplay : The five terms.

    Examples
    --------
    >>> import numpy as np
    >>> from sklinfluence.display import AgreementCurveDisplay
    >>> agreement = {"pbrf": np.array([[0.9, 0.95], [0.97, 0.99]]),
    ...              "loo": np.array([[0.2, 0.4], [0.1, 0.3]])}
    >>> display = AgreementCurveDisplay(param_name="damping", param_range=[1e-2, 1e-1],
    ...                                 agreement=agreement, n_rows=10).plot()
    >>> display.lines_[0].get_ydata().round(3).tolist()
    [0.925, 0.98]
    """

    def __init__(self, *, param_name: str, param_range: Any, agreement: Mapping[str, Any],
                 statistic: str = "spearman", quantity: str = "self",
                 n_rows: int | None = None) -> None:
        self.param_name = param_name
        self.param_range = param_range
        self.agreement = agreement
        self.statistic = statistic
        self.quantity = quantity
        self.n_rows = n_rows

    def plot(self, ax: Any = None, *, references: Sequence[str] | None = None,
             std_display_style: str | None = "errorbar", xscale: str | None = None,
             line_kw: dict | None = None, errorbar_kw: dict | None = None,
             fill_between_kw: dict | None = None) -> "AgreementCurveDisplay":
        """Plot the agreement.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        references : list of str, default=None
            Which references to plot (default: all in ``agreement``).
        std_display_style : {"errorbar", "fill_between"} or None, default="errorbar"
            How the spread over seeds is drawn, or not at all.
        xscale : str, default=None
            ``None``: log for a numeric range spread over orders of
            magnitude, else linear.
        line_kw, errorbar_kw, fill_between_kw : dict, default=None
            Passed to ``ax.plot``, ``ax.errorbar`` and ``ax.fill_between``.

        Returns
        -------
        display : AgreementCurveDisplay
            ``self``, with the artists as attributes.
        """
        _check_choice("std_display_style", std_display_style, _STYLES)
        chosen = list(self.agreement) if references is None else list(references)
        unknown = [r for r in chosen if r not in self.agreement]
        if unknown:
            raise ValueError(f"unknown references {unknown}; the agreement has "
                             f"{list(self.agreement)}.")
        ax = _axes(ax)
        param_range = np.asarray(self.param_range, dtype=object)
        x, numeric = _x_positions(param_range)
        self.lines_, self.references_ = [], chosen
        self.errorbars_ = [] if std_display_style == "errorbar" else None
        self.fill_between_ = [] if std_display_style == "fill_between" else None
        n_seeds = None
        for ref in chosen:
            values = np.asarray(self.agreement[ref], dtype=np.float64)
            if values.ndim == 1:
                values = values[:, None]
            if values.shape[0] != len(x):
                raise ValueError(f"agreement[{ref!r}] has {values.shape[0]} values but "
                                 f"param_range {len(x)}.")
            n_seeds = values.shape[1]
            with warnings.catch_warnings():  # a value whose every seed is nan stays nan
                warnings.simplefilter("ignore", RuntimeWarning)
                m, s = np.nanmean(values, axis=1), np.nanstd(values, axis=1)
            line, = ax.plot(x, m, **{"marker": "o", "label": _REFERENCE_LABELS.get(ref, ref),
                                     **(line_kw or {})})
            self.lines_.append(line)
            if std_display_style == "errorbar":
                self.errorbars_.append(ax.errorbar(
                    x, m, yerr=s, **{"fmt": "none", "ecolor": line.get_color(), "capsize": 3,
                                     **(errorbar_kw or {})}))
            elif std_display_style == "fill_between":
                self.fill_between_.append(ax.fill_between(
                    x, m - s, m + s, **{"color": line.get_color(), "alpha": 0.2,
                                        **(fill_between_kw or {})}))
        rows = f", each a correlation over {self.n_rows} rows" if self.n_rows else ""
        self.spread_label_ = f"± 1 std over {n_seeds} seeds{rows}"
        ax.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
        ax.set_ylim(-1.05, 1.05)
        _set_x(ax, x, numeric, param_range, xscale, self.param_name)
        ax.set_ylabel(f"{str(self.statistic).capitalize()} correlation with influence\n"
                      f"({_QUANTITY_LABELS.get(self.quantity, self.quantity)})")
        ax.legend(title=(f"bars: {self.spread_label_}" if std_display_style else None),
                  fontsize="small", title_fontsize="small")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_results(cls, results: Mapping, *, quantity: str = "self",
                     statistic: str = "spearman",
                     references: Sequence[str] = ("pbrf", "warm_start", "loo"),
                     ax: Any = None, **plot_kw: Any) -> "AgreementCurveDisplay":
        """Plot the agreement of a :func:`~sklinfluence.study.decomposition_curve` result.

        Parameters
        ----------
        results : Bunch
            Returned by :func:`~sklinfluence.study.decomposition_curve`.
        quantity : {"self", "eval"}, default="self"
            The rows' self-influence, or the change of the mean evaluation
            loss.
        statistic : {"spearman", "pearson"}, default="spearman"
            The correlation.
        references : list of str, default=("pbrf", "warm_start", "loo")
            Any of ``"pbrf"``, ``"proximal"``, ``"warm_start"``, ``"loo"``.
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : AgreementCurveDisplay
        """
        _check_choice("quantity", quantity, QUANTITIES)
        _check_choice("statistic", statistic, STATISTICS)
        unknown = [r for r in references if r not in REFERENCES]
        if unknown:
            raise ValueError(f"unknown references {unknown}; choose from {list(REFERENCES)}.")
        table = results["agreement"][quantity][statistic]
        return cls(param_name=results["param_name"], param_range=results["param_range"],
                   agreement={ref: table[ref] for ref in references}, statistic=statistic,
                   quantity=quantity, n_rows=len(results["rows"])).plot(ax=ax, **plot_kw)

    @classmethod
    def from_estimator(cls, estimator: Any, X: Any, y: Any, *, param_name: str,
                       param_range: Sequence, seeds: Any = (0, 1, 2), rows: Any = 10,
                       X_eval: Any = None, y_eval: Any = None, random_state: Any = 0,
                       memory: Any = None, n_jobs: int | None = None, verbose: int = 0,
                       quantity: str = "self", statistic: str = "spearman",
                       references: Sequence[str] = ("pbrf", "warm_start", "loo"),
                       ax: Any = None, **plot_kw: Any) -> "AgreementCurveDisplay":
        """Compute a :func:`~sklinfluence.study.decomposition_curve` and plot its agreement.

        Parameters
        ----------
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
            ``> 0``: a progress bar.
        quantity : {"self", "eval"}, default="self"
            The rows' self-influence, or the change of the mean evaluation
            loss.
        statistic : {"spearman", "pearson"}, default="spearman"
            The correlation.
        references : list of str, default=("pbrf", "warm_start", "loo")
            Any of ``"pbrf"``, ``"proximal"``, ``"warm_start"``, ``"loo"``.
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : AgreementCurveDisplay
        """
        results = decomposition_curve(estimator, X, y, param_name=param_name,
                                      param_range=param_range, seeds=seeds, rows=rows,
                                      X_eval=X_eval, y_eval=y_eval, random_state=random_state,
                                      memory=memory, n_jobs=n_jobs, verbose=verbose)
        display = cls.from_results(results, quantity=quantity, statistic=statistic,
                                   references=references, ax=ax, **plot_kw)
        display.results_ = results
        return display


class DetectionCurveDisplay:
    """Mislabel detection curves of several self-scores at once.

    For each score, the fraction of flipped labels found against the
    fraction of the training data inspected, most suspicious rows first
    (:func:`~sklinfluence.study.detection_curve`), with the expected curve
    of a random order (the diagonal) and, when the counts are known, the
    best possible curve. Build it with :meth:`from_scores` or
    :meth:`from_estimators`.

    Parameters
    ----------
    fraction_inspected : dict of str to ndarray
        Each score's fractions of the data inspected, keyed by its name (legend label).
    fraction_found : dict of str to ndarray
        Each score's fractions of the flipped labels found, keyed likewise.
    n_flipped : int, default=None
        Number of flipped labels (for the best possible curve).
    n_samples : int, default=None
        Number of training rows (for the best possible curve).

    Attributes
    ----------
    lines_ : list of matplotlib.lines.Line2D
        One curve per score, in ``fraction_found`` order.
    chance_level_ : matplotlib.lines.Line2D or None
        The random order's expected curve.
    perfect_ : matplotlib.lines.Line2D or None
        The best possible curve (all flipped labels first).
    found_at_budget_ : dict of str to float
        Fraction found after inspecting ``budget`` of the data (linear
        between the curve's points), per score; empty with ``budget=None``.
    ax_ : matplotlib.axes.Axes
    figure_ : matplotlib.figure.Figure

    See Also
    --------
    sklinfluence.study.detection_curve : Computes one curve.

    Examples
    --------
    >>> import numpy as np
    >>> from sklinfluence.display import DetectionCurveDisplay
    >>> is_flipped = np.array([True, False, False, True, False])
    >>> scores = {"loss": np.array([0.9, 0.1, 0.2, 0.8, 0.3]),
    ...           "random": np.array([0.5, 0.4, 0.3, 0.2, 0.1])}
    >>> display = DetectionCurveDisplay.from_scores(is_flipped, scores, budget=0.4)
    >>> display.found_at_budget_
    {'loss': 1.0, 'random': 0.5}
    """

    def __init__(self, *, fraction_inspected: Mapping[str, Any],
                 fraction_found: Mapping[str, Any], n_flipped: int | None = None,
                 n_samples: int | None = None) -> None:
        self.fraction_inspected = fraction_inspected
        self.fraction_found = fraction_found
        self.n_flipped = n_flipped
        self.n_samples = n_samples

    def plot(self, ax: Any = None, *, budget: float | None = 0.1,
             plot_chance_level: bool = True, plot_perfect: bool = True,
             line_kw: dict | None = None, chance_level_kw: dict | None = None
             ) -> "DetectionCurveDisplay":
        """Plot the curves.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        budget : float in (0, 1] or None, default=0.1
            The legend gives each score's fraction found after inspecting
            this fraction of the data; ``None``: names only.
        plot_chance_level : bool, default=True
            Draw the random order's expected curve (the diagonal).
        plot_perfect : bool, default=True
            Draw the best possible curve (needs ``n_flipped`` and
            ``n_samples``).
        line_kw, chance_level_kw : dict, default=None
            Passed to ``ax.plot`` for the curves and for the diagonal.

        Returns
        -------
        display : DetectionCurveDisplay
            ``self``, with the artists as attributes.
        """
        if budget is not None and not (isinstance(budget, Real) and 0 < budget <= 1):
            raise ValueError(f"budget must be a fraction in (0, 1] or None, got {budget!r}.")
        if set(self.fraction_inspected) != set(self.fraction_found):
            raise ValueError("fraction_inspected and fraction_found must have the same names.")
        ax = _axes(ax)
        self.lines_, self.found_at_budget_ = [], {}
        for name, found in self.fraction_found.items():
            inspected = np.asarray(self.fraction_inspected[name], dtype=np.float64)
            found = np.asarray(found, dtype=np.float64)
            label = str(name)
            if budget is not None:
                at = float(np.interp(budget, inspected, found))
                self.found_at_budget_[name] = at
                label += f" ({at:.0%} found in top {budget:.0%})"
            line, = ax.plot(inspected, found, **{"label": label, **(line_kw or {})})
            self.lines_.append(line)
        self.chance_level_ = self.perfect_ = None
        if plot_chance_level:
            self.chance_level_, = ax.plot([0, 1], [0, 1], **{
                "color": "0.5", "linestyle": "--", "label": "random order (expected)",
                **(chance_level_kw or {})})
        if plot_perfect and self.n_flipped and self.n_samples:
            corner = self.n_flipped / self.n_samples
            self.perfect_, = ax.plot([0, corner, 1], [0, 1, 1], color="0.3", linestyle=":",
                                     label="perfect ranking")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction of training data inspected",
               ylabel="fraction of flipped labels found")
        title = (f"{self.n_flipped} flipped labels in {self.n_samples} rows"
                 if self.n_flipped and self.n_samples else None)
        ax.legend(title=title, fontsize="small", title_fontsize="small", loc="lower right")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    def from_scores(cls, is_flipped: Any, scores: Mapping[str, Any], *, ax: Any = None,
                    **plot_kw: Any) -> "DetectionCurveDisplay":
        """Plot the detection curves of precomputed scores.

        Parameters
        ----------
        is_flipped : array-like of bool of shape (n_samples,)
            ``True`` for the rows whose label was flipped.
        scores : dict of str to array-like of shape (n_samples,)
            One score per row for each ranking (larger: inspected earlier),
            e.g. ``{"influence": est.score_samples(X, y), "training loss":
            training_loss(est, X, y)}``.
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : DetectionCurveDisplay
        """
        if not scores:
            raise ValueError("scores is empty: give at least one name → scores entry.")
        inspected, found = {}, {}
        for name, score in scores.items():
            try:
                inspected[name], found[name], _ = detection_curve(is_flipped, score)
            except ValueError as exc:
                raise ValueError(f"scores[{name!r}]: {exc}") from None
        flipped = np.asarray(is_flipped).astype(bool)
        return cls(fraction_inspected=inspected, fraction_found=found,
                   n_flipped=int(flipped.sum()), n_samples=len(flipped)).plot(ax=ax, **plot_kw)

    @classmethod
    def from_estimators(cls, estimators: Mapping[str, Any], X: Any, y: Any, is_flipped: Any,
                        *, ax: Any = None, **plot_kw: Any) -> "DetectionCurveDisplay":
        """Score the training rows with fitted estimators and plot the detection curves.

        Parameters
        ----------
        estimators : dict of str to estimator, callable or array-like
            Per name: a fitted estimator, ranked by ``score_samples(X, y)``
            (:class:`~sklinfluence.InfluenceEstimator`, ``PBRFEstimator``,
            ``LOOEstimator``, :class:`~sklinfluence.TracInCP`; grad-dot is
            ``InfluenceEstimator(solver="identity")``); a callable
            ``f(X, y)`` returning the scores (e.g. ``lambda X, y:
            training_loss(est, X, y)``); or the scores themselves.
        X : array-like of shape (n_samples, ...)
            The training rows the estimators were fitted on (with the noisy
            labels).
        y : array-like of shape (n_samples,)
            Their (noisy) labels.
        is_flipped : array-like of bool of shape (n_samples,)
            ``True`` for the rows whose label was flipped.
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : DetectionCurveDisplay

        Raises
        ------
        sklearn.exceptions.NotFittedError
            An estimator is not fitted.
        """
        scores = {}
        for name, est in estimators.items():
            if hasattr(est, "score_samples"):
                try:
                    check_is_fitted(est)
                except Exception as exc:
                    raise type(exc)(f"estimators[{name!r}] is not fitted: call "
                                    "fit(X, y) with the noisy labels first.") from None
                scores[name] = est.score_samples(X, y)
            elif callable(est):
                scores[name] = est(X, y)
            else:
                scores[name] = est
        return cls.from_scores(is_flipped, scores, ax=ax, **plot_kw)
