"""Mislabel detection curves of several self-scores: :class:`DetectionCurveDisplay`."""

from __future__ import annotations

from numbers import Real
from typing import Any, Mapping

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ..study import detection_curve
from ._common import axes_or_new

__all__ = ["DetectionCurveDisplay"]


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
        ax = axes_or_new(ax)
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
