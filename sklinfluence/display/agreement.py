"""The agreement of influence with ground truth against a parameter.

:class:`AgreementCurveDisplay`.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from ..study import QUANTITIES, REFERENCES, STATISTICS
from ._common import (QUANTITY_LABELS, REFERENCE_LABELS, STYLES, axes_or_new, check_choice,
                      display_from_curve, fill_doc, set_x, x_positions)

__all__ = ["AgreementCurveDisplay"]


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
        check_choice("std_display_style", std_display_style, STYLES)
        chosen = list(self.agreement) if references is None else list(references)
        unknown = [r for r in chosen if r not in self.agreement]
        if unknown:
            raise ValueError(f"unknown references {unknown}; the agreement has "
                             f"{list(self.agreement)}.")
        ax = axes_or_new(ax)
        param_range = np.asarray(self.param_range, dtype=object)
        x, numeric = x_positions(param_range)
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
            line, = ax.plot(x, m, **{"marker": "o", "label": REFERENCE_LABELS.get(ref, ref),
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
        set_x(ax, x, numeric, param_range, xscale, self.param_name)
        ax.set_ylabel(f"{str(self.statistic).capitalize()} correlation with influence\n"
                      f"({QUANTITY_LABELS.get(self.quantity, self.quantity)})")
        ax.legend(title=(f"bars: {self.spread_label_}" if std_display_style else None),
                  fontsize="small", title_fontsize="small")
        self.ax_, self.figure_ = ax, ax.figure
        return self

    @classmethod
    @fill_doc
    def from_results(cls, results: Mapping, *, quantity: str = "self",
                     statistic: str = "spearman",
                     references: Sequence[str] = ("pbrf", "warm_start", "loo"),
                     ax: Any = None, **plot_kw: Any) -> "AgreementCurveDisplay":
        """Plot the agreement of a :func:`~sklinfluence.study.decomposition_curve` result.

        Parameters
        ----------
        results : Bunch
            Returned by :func:`~sklinfluence.study.decomposition_curve`.
        {agreement_choice}
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : AgreementCurveDisplay
        """
        check_choice("quantity", quantity, QUANTITIES)
        check_choice("statistic", statistic, STATISTICS)
        unknown = [r for r in references if r not in REFERENCES]
        if unknown:
            raise ValueError(f"unknown references {unknown}; choose from {list(REFERENCES)}.")
        table = results["agreement"][quantity][statistic]
        return cls(param_name=results["param_name"], param_range=results["param_range"],
                   agreement={ref: table[ref] for ref in references}, statistic=statistic,
                   quantity=quantity, n_rows=len(results["rows"])).plot(ax=ax, **plot_kw)

    @classmethod
    @fill_doc
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
        {curve_parameters}
        {agreement_choice}
        ax : matplotlib Axes, default=None
            Axes to draw on; ``None`` makes a new figure.
        **plot_kw
            Passed to :meth:`plot`.

        Returns
        -------
        display : AgreementCurveDisplay
        """
        return display_from_curve(cls.from_results, locals(), quantity=quantity,
                                  statistic=statistic, references=references, ax=ax,
                                  **plot_kw)
