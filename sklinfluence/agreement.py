"""Rating influence estimates against ground truth: scores, scorers, a splitter.

Grid-searching the damping (or any parameter) of an estimator needs a score:
how well do its scores on some training samples agree with a reference
response — leave-one-out retraining or the PBRF — on the same samples?

- ``estimator.score(X, y)`` (on every rung estimator) rates that agreement
  with the default reference and metric;
- :func:`agreement_scorer` makes a ``scoring=`` callable with another
  reference or metric;
- :class:`RemovalSplit` is a cross-validation splitter that yields (all
  training rows, a subset to remove), so that ``GridSearchCV`` fits on the
  whole data and scores on the removed subset.

References are computed with the ground-truth machinery on the estimator's
own fitted net and kept in :data:`~sklinfluence.response.cache.RESPONSE_CACHE`, so
the candidates of a grid search that share a net retrain it only once.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable

import numpy as np
from scipy.stats import kendalltau, pearsonr, spearmanr
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils import check_random_state

from .pipeline import PipelineView

__all__ = ["AGREEMENTS", "REFERENCES", "RemovalSplit", "agreement", "agreement_scorer"]

#: Agreement metrics: name → function of (estimate, reference) returning a float.
AGREEMENTS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": lambda a, b: float(spearmanr(a, b)[0]),
    "pearson": lambda a, b: float(pearsonr(a, b)[0]),
    "kendall": lambda a, b: float(kendalltau(a, b)[0]),
}
#: Reference names → rung of the ladder.
REFERENCES = {"loo": "cold_start_loo", "warm_start": "warm_start", "proximal": "proximal",
              "pbrf": "pbrf"}


def agreement(estimate: np.ndarray, reference: np.ndarray, metric: str = "spearman") -> float:
    """Agreement between two score vectors (``nan`` when either is constant)."""
    if metric not in AGREEMENTS:
        raise ValueError(f"metric must be one of {sorted(AGREEMENTS)}, got {metric!r}")
    if len(estimate) < 2:
        raise ValueError("agreement needs at least 2 samples")
    if np.ptp(estimate) == 0 or np.ptp(reference) == 0:
        return float("nan")
    return AGREEMENTS[metric](estimate, reference)


def agreement_scorer(reference: str = "loo", metric: str = "spearman") -> Callable:
    """A ``scoring=`` callable: agreement of ``score_samples`` with a reference.

    Parameters
    ----------
    reference : {"loo", "warm_start", "proximal", "pbrf"}, default="loo"
        The rung to agree with (``"loo"``: cold-start leave-one-out; the
        proximal and PBRF rungs use the estimator's own damping).
    metric : {"spearman", "pearson", "kendall"}, default="spearman"
        How agreement is measured.

    Returns
    -------
    callable
        ``scorer(estimator, X, y)`` → float; higher is better. ``estimator``
        may be a fitted :class:`~sklearn.pipeline.Pipeline` ending in an
        sklinfluence estimator: ``X`` goes through its earlier steps and the
        final step is scored with ``reference`` and ``metric``
        (:class:`~sklinfluence.PipelineView`), the same number as the bare
        estimator on transformed data, whether metadata routing is on or off.

    Examples
    --------
    >>> from sklinfluence import agreement_scorer
    >>> scorer = agreement_scorer(reference="pbrf", metric="pearson")
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {sorted(REFERENCES)}, got {reference!r}")
    if metric not in AGREEMENTS:
        raise ValueError(f"metric must be one of {sorted(AGREEMENTS)}, got {metric!r}")

    def scorer(estimator: Any, X: Any, y: Any = None) -> float:
        # a Pipeline's score would drop the keywords unless routing is on: unwrap it
        return PipelineView(estimator).score(X, y, reference=reference, metric=metric)

    scorer.__name__ = f"agreement_{reference}_{metric}"
    return scorer


class RemovalSplit(BaseCrossValidator):
    """Yield (all rows, a random subset of rows to remove), ``n_splits`` times.

    With it, ``GridSearchCV`` fits each candidate on the whole training set
    and scores it — ``score(X[subset], y[subset])`` — on the samples whose
    removal it estimates.

    Parameters
    ----------
    n_splits : int, default=1
        Number of subsets.
    n_remove : int or float, default=20
        Size of each subset: a count, or a fraction of the rows.
    random_state : int, RandomState instance or None, default=None
        Draws the subsets.

    Examples
    --------
    >>> import numpy as np
    >>> from sklinfluence import RemovalSplit
    >>> train, remove = next(RemovalSplit(n_remove=3, random_state=0).split(np.zeros((10, 2))))
    >>> len(train), len(remove)
    (10, 3)
    """

    def __init__(self, n_splits: int = 1, n_remove: int | float = 20,
                 random_state: Any = None) -> None:
        self.n_splits = n_splits
        self.n_remove = n_remove
        self.random_state = random_state

    def get_n_splits(self, X: Any = None, y: Any = None, groups: Any = None) -> int:
        return int(self.n_splits)

    def split(self, X: Any, y: Any = None, groups: Any = None):
        n = len(X)
        size = (int(self.n_remove) if isinstance(self.n_remove, Integral)
                else int(round(float(self.n_remove) * n)))
        if not 2 <= size <= n:
            raise ValueError(f"n_remove must select between 2 and {n} rows, got {self.n_remove}.")
        rng = check_random_state(self.random_state)
        everything = np.arange(n)
        for _ in range(self.n_splits):
            yield everything, np.sort(rng.choice(n, size, replace=False))

    def _iter_test_indices(self, X: Any = None, y: Any = None, groups: Any = None):
        for _, test in self.split(X, y, groups):
            yield test
