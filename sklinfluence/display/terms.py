"""The five terms of the influence–LOO gap against a parameter: :class:`TermsCurveDisplay`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ._common import (METRIC_LABELS, SPREADS, STYLES, axes_or_new, check_choice,
                      display_from_curve, fill_doc, set_x, x_positions)

__all__ = ["TermsCurveDisplay"]


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

        check_choice("spread_over", spread_over, SPREADS)
        check_choice("std_display_style", std_display_style, STYLES)
        check_choice("yscale", yscale, ("symlog", "log", "linear"))
        data, names = self._data()
        chosen = names if terms is None else list(terms)
        unknown = [t for t in chosen if t not in names]
        if unknown:
            raise ValueError(f"unknown terms {unknown}; the terms are {names}.")
        ax = axes_or_new(ax)
        param_range = np.asarray(self.param_range, dtype=object)
        x, numeric = x_positions(param_range)
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
        set_x(ax, x, numeric, param_range, xscale, self.param_name)
        ax.set_ylabel(METRIC_LABELS.get(self.metric, "term"))
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
    @fill_doc
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
        {curve_parameters}
        ax : matplotlib Axes, default=None
            Axes to draw on.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : TermsCurveDisplay
        """
        return display_from_curve(cls.from_results, locals(), ax=ax, **plot_kw)
