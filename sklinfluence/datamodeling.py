"""The linear datamodeling score (LDS): the field's yardstick for attribution matrices.

Park et al. (2023, TRAK) judge an attribution matrix ``s(i, z)`` — the effect of
training row ``i`` on evaluation point ``z`` — by how well its additive
predictions rank the models trained on random subsets: draw ``M``
subsets ``S_j`` of ``⌊αN⌋`` training rows, train the net's recipe on each
(cold start, same seed: rung 0 of the ladder on the removal of the complement
``C_j``), measure ``Q_z(θ_{S_j})``, and compare with the prediction
``Q_z(θˢ) + Σ_{i∈C_j} s(i, z)`` by Spearman correlation over ``j``, averaged
over ``z``.

:class:`LinearDatamodelingScore` does the expensive part once — the ``M``
retrainings, batched as groups, parallel and resumable like every other
response — and then scores any number of attribution matrices against it:
ours (``loss_change`` of any estimator), a peer's, or a baseline's, as a plain
``(n_train, n_eval)`` array in the library's sign convention (positive:
removing the row increases the loss on the point). With ``reference="pbrf"``
the subsets' models are the PBRF of the complement instead of retraining:
Bae et al. (2022) predict that influence estimates do much better there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .utils._sklearn import Interval, StrOptions, _fit_context
from .utils._docs import fill_doc
from .base import BaseResponseEstimator
from .response.measure import loss_change, to_numpy
from .pipeline import PipelineView
from .model.removal import Removal
from .response.responder import Responder, rung
from .utils.threads import compute_section

__all__ = ["LinearDatamodelingScore", "LDSResult", "lds_scorer"]

#: Reference → the rung whose response to removing a subset's complement is measured.
LDS_REFERENCES = {"retrain": "cold_start_loo", "pbrf": "pbrf"}


@dataclass
class LDSResult:
    """The LDS of one attribution matrix.

    Attributes
    ----------
    mean : float
        Mean over evaluation points of the per-point Spearman correlation
        (points whose prediction or measurement is constant are left out).
    std : float
        Its spread over evaluation points (standard deviation).
    bootstrap_std : float
        Standard deviation of ``mean`` over subsets resampled with
        replacement (the spread due to the finite number of subsets).
    per_point : ndarray of shape (n_eval,)
        The Spearman correlation for each evaluation point (``nan`` where
        undefined).
    predictions : ndarray of shape (n_subsets, n_eval)
        ``Q_z(θˢ) + Σ_{i∈C_j} s(i, z)``.
    """

    mean: float
    std: float
    bootstrap_std: float
    per_point: np.ndarray
    predictions: np.ndarray


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``.

    The Pearson correlation of the columns' average ranks (``scipy.stats.spearmanr``'s
    definition), all columns at once; NaN where a column is constant.
    """
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    norms = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    out = np.full(a.shape[1], np.nan)
    ok = (np.ptp(a, axis=0) > 0) & (np.ptp(b, axis=0) > 0)
    out[ok] = (ra * rb).sum(axis=0)[ok] / norms[ok]
    return np.clip(out, -1.0, 1.0)


@fill_doc
class LinearDatamodelingScore(BaseResponseEstimator):
    """Ground truth for the linear datamodeling score: the net trained on random subsets.

    ``fit`` trains the net on all rows (as every estimator does), draws
    ``n_subsets`` subsets of ``⌊alpha·N⌋`` rows (or takes ``subsets``),
    computes the response of each subset's model — cold-start retraining on
    the subset (``reference="retrain"``) or the PBRF of removing the
    complement (``"pbrf"``) — and measures the evaluation losses there.
    :meth:`score_attributions` then rates any attribution matrix against
    these measurements, as often as needed.

    Parameters
    ----------
    net : skorch.NeuralNet, scikit-learn linear model or FrozenEstimator
        As for :class:`~sklinfluence.LOOEstimator`.
    n_subsets : int, default=50
        ``M``, the number of random subsets (ignored when ``subsets`` is
        given).
    alpha : float, default=0.5
        Fraction of the training rows each subset keeps.
    subsets : array-like of shape (n_subsets, n_train), default=None
        Explicit subsets as a boolean mask (True: the row is kept), so that
        two methods (or two libraries) are compared on the same models.
    reference : {"retrain", "pbrf"}, default="retrain"
        The model of each subset: the recipe retrained on it from ``θ⁰``
        with the original seed, or the PBRF of removing its complement (at
        ``damping``).
    n_seeds : int, default=1
        Trainings per subset (``reference="retrain"`` only): the first under
        the original fit's seed, the others under seeds drawn from it, all
        from the same ``θ⁰`` (so the seeds vary what the recipe's randomness
        does after initialisation, e.g. the mini-batch order). The
        measurements are averaged over the seeds, which takes the recipe's
        own noise out of the ground truth at ``n_seeds`` times the cost.
    damping : float, default=1e-3
        ``λ`` of the PBRF reference.
    weight_decay : "auto" or float, default="auto"
        As for :class:`~sklinfluence.InfluenceEstimator`.
    batch_size : int, default=None
        Samples per batch for gradients and products.
    removal_batch_size : int, default=32
        Subsets retrained (or solved) together: the complements all have the
        same size, so a vectorised ensemble trains that many copies at once
        when the recipe can be replayed (:mod:`sklinfluence.model.ensemble`).
        Fewer, larger ensembles are faster: with ``n_subsets=50`` on the
        digits MLP, 50 at once took 0.84× the time of 32 + 18 and 0.15× the
        time of one at a time, for about 8·B·3P bytes more memory
        (``benchmarks/bench_lds.py``).
    {execution}
    random_state : int, RandomState instance or None, default=None
        Seeds the net's fit and the draw of the subsets.

    Attributes
    ----------
    net_, model_, n_train_ : as for the other estimators
    subsets_ : ndarray of shape (n_subsets, n_train), dtype bool
        The subsets (True: kept).
    measurements_ : ndarray of shape (n_subsets, n_eval)
        ``Q_z`` of each subset's model at each evaluation point (the mean
        over seeds).
    seed_measurements_ : ndarray of shape (n_seeds, n_subsets, n_eval)
        ``Q_z`` under each seed.
    seeds_ : list of int
        The torch seed of each training (``seeds_[0]`` is the original
        fit's).
    base_losses_ : ndarray of shape (n_eval,)
        ``Q_z(θˢ)``.
    param_changes_ : ndarray of shape (n_subsets, n_params)
        Each subset's model minus ``θˢ`` (under the original seed).

    Notes
    -----
    The mathematics is on the Theory page of the documentation, section
    "The linear datamodeling score". The Spearman correlation is over
    subsets, for each evaluation point; its mean over evaluation points is
    the LDS. By default one seed per subset (the original fit's): the
    recipe's own randomness is replayed, not averaged out; ``n_seeds``
    averages it out.

    References
    ----------
    Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing Model Behavior
    at Scale", ICML 2023.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import InfluenceEstimator, LinearDatamodelingScore
    >>> X, y = load_diabetes(return_X_y=True)
    >>> X, y = X[:60], y[:60] / 100
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=20,
    ...                          lr=0.5, batch_size=60, verbose=0)
    >>> lds = LinearDatamodelingScore(net, n_subsets=10, random_state=0).fit(
    ...     X, y, X[:5], y[:5])
    >>> est = InfluenceEstimator(net, random_state=0).fit(X, y)
    >>> result = lds.score_attributions(est.loss_change(X, y, X[:5], y[:5]))
    >>> result.per_point.shape
    (5,)
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in BaseResponseEstimator._parameter_constraints.items()
           if k not in ("epsilon", "measure")},
        **BaseResponseEstimator._execution_constraints,
        "n_subsets": [Interval(Integral, 2, None, closed="left")],
        "alpha": [Interval(Real, 0, 1, closed="neither")],
        "subsets": [None, "array-like"],
        "reference": [StrOptions(set(LDS_REFERENCES))],
        "n_seeds": [Interval(Integral, 1, None, closed="left")],
        "removal_batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, net: Any, *, n_subsets: int = 50, alpha: float = 0.5,
                 subsets: Any = None, reference: str = "retrain", n_seeds: int = 1,
                 damping: float = 1e-3,
                 weight_decay: str | float = "auto", batch_size: int | None = None,
                 removal_batch_size: int = 32, n_jobs: int | None = None, memory: Any = None,
                 verbose: int = 0, random_state: Any = None) -> None:
        self.net = net
        self.n_subsets = n_subsets
        self.alpha = alpha
        self.subsets = subsets
        self.reference = reference
        self.n_seeds = n_seeds
        self.damping = damping
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.removal_batch_size = removal_batch_size
        self.n_jobs = n_jobs
        self.memory = memory
        self.verbose = verbose
        self.random_state = random_state

    def _draw_subsets(self, n: int) -> np.ndarray:
        if self.subsets is not None:
            subsets = np.asarray(self.subsets)
            if subsets.dtype != bool or subsets.ndim != 2 or subsets.shape[1] != n:
                raise ValueError(
                    f"subsets must be a boolean mask of shape (n_subsets, {n}) (True: the "
                    f"row is kept), got dtype {subsets.dtype} and shape {subsets.shape}.")
            kept = subsets.sum(axis=1)
            if subsets.shape[0] < 2 or kept.min() < 1 or kept.max() >= n:
                raise ValueError("subsets needs at least 2 subsets, each keeping at least one "
                                 "row and leaving out at least one.")
            return subsets.copy()
        size = int(np.floor(self.alpha * n))
        if not 1 <= size < n:
            raise ValueError(f"alpha={self.alpha} keeps {size} of {n} rows; a subset must keep "
                             "at least one row and leave out at least one.")
        rng = check_random_state(self.random_state)
        subsets = np.zeros((self.n_subsets, n), dtype=bool)
        for j in range(self.n_subsets):
            subsets[j, rng.choice(n, size, replace=False)] = True
        return subsets

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
    def fit(self, X: Any, y: Any, X_eval: Any = None,
            y_eval: Any = None) -> "LinearDatamodelingScore":
        """Train the net, draw the subsets and measure every subset's model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets.
        X_eval, y_eval : array-like, default=None
            Evaluation points ``z`` (usually held-out points) and their
            targets (``y_eval=None`` looks them up among the training rows);
            ``X_eval=None`` evaluates on the training rows.

        Returns
        -------
        self : LinearDatamodelingScore
        """
        if self.n_seeds > 1 and self.reference != "retrain":
            raise ValueError(f"n_seeds={self.n_seeds} needs reference='retrain': the "
                             f"{self.reference!r} reference is deterministic.")
        self._fit_net(X, y)
        if X_eval is None:
            Xe, Te = self.X_train_, self.T_train_
        else:
            Xe, Te = self._eval_targets(X_eval, y_eval)
        self.subsets_ = self._draw_subsets(self.n_train_)
        context = self._context()
        self.seeds_ = [self.seed_] + [int(seed) for seed in np.random.default_rng(
            self.seed_).integers(np.iinfo(np.int32).max, size=self.n_seeds - 1)]
        removals = [Removal(self.X_train_[torch.as_tensor(rows)],
                            self.T_train_[torch.as_tensor(rows)], tuple(int(i) for i in rows))
                    for rows in (np.flatnonzero(~kept) for kept in self.subsets_)]
        with torch.no_grad():
            base = self.model_.losses(self.model_.params, Xe, Te)
        measurements = []
        for k, seed in enumerate(self.seeds_):
            responder = Responder(context if k == 0 else replace(context, seed=seed))
            delta = responder.param_change(rung(LDS_REFERENCES[self.reference]), removals)
            measurements.append(to_numpy(loss_change(self.model_, delta, Xe, Te) + base))
            if k == 0:
                self.responder_, self.param_changes_ = responder, to_numpy(delta)
        self.base_losses_ = to_numpy(base)
        self.seed_measurements_ = np.stack(measurements)
        self.measurements_ = self.seed_measurements_.mean(axis=0)
        self.X_eval_, self.T_eval_ = Xe, Te
        return self

    def score_attributions(self, attributions: Any, *, n_bootstrap: int = 200) -> LDSResult:
        """The LDS of an attribution matrix against the fitted subsets.

        Parameters
        ----------
        attributions : array-like of shape (n_train, n_eval)
            ``s(i, z)``: the effect of removing training row ``i`` on the loss
            of evaluation point ``z``, positive when removing the row
            increases the loss (e.g. ``loss_change(X_train, y_train, X_eval,
            y_eval)`` of any estimator, with the rows in ``fit``'s order).
        n_bootstrap : int, default=200
            Resamplings of the subsets for ``bootstrap_std`` (0: skip).

        Returns
        -------
        LDSResult
        """
        check_is_fitted(self, "measurements_")
        scores = np.asarray(attributions, dtype=np.float64)
        expected = (self.n_train_, self.measurements_.shape[1])
        if scores.shape != expected:
            raise ValueError(f"attributions must have shape (n_train, n_eval) = {expected}, "
                             f"got {scores.shape}.")
        if not np.all(np.isfinite(scores)):
            raise ValueError("attributions contain NaN or infinite values.")
        removed = (~self.subsets_).astype(np.float64)
        predictions = self.base_losses_ + removed @ scores
        per_point = _spearman_columns(predictions, self.measurements_)
        rng = np.random.default_rng(0)
        means = [np.nanmean(_spearman_columns(predictions[pick], self.measurements_[pick]))
                 for pick in (rng.integers(0, len(predictions), len(predictions))
                              for _ in range(n_bootstrap))]
        return LDSResult(mean=float(np.nanmean(per_point)), std=float(np.nanstd(per_point)),
                         bootstrap_std=float(np.nanstd(means)) if means else float("nan"),
                         per_point=per_point, predictions=predictions)


def lds_scorer(reference: LinearDatamodelingScore) -> Callable:
    """A ``scoring=`` callable: the LDS of an estimator's influence matrix.

    The estimator (e.g. an :class:`~sklinfluence.InfluenceEstimator` in a
    ``GridSearchCV`` over ``damping``, with :class:`~sklinfluence.RemovalSplit`
    as ``cv``) must be fitted on the same training rows as ``reference``; its
    ``loss_change`` on those rows and ``reference``'s evaluation points is
    scored with :meth:`LinearDatamodelingScore.score_attributions`.

    Parameters
    ----------
    reference : LinearDatamodelingScore
        Fitted ground truth.

    Returns
    -------
    callable
        ``scorer(estimator, X, y)`` → the mean LDS; higher is better. A fitted
        :class:`~sklearn.pipeline.Pipeline` is scored by its final step, which
        must have been fitted on the same (transformed) rows as ``reference``:
        fit ``reference`` on ``pipe[:-1].fit_transform(X)``.
    """
    check_is_fitted(reference, "measurements_")

    def scorer(estimator: Any, X: Any = None, y: Any = None) -> float:
        estimator = PipelineView(estimator).estimator  # a Pipeline's final step
        check_is_fitted(estimator, "model_")
        if estimator.n_train_ != reference.n_train_ or not torch.equal(
                estimator.X_train_.to(reference.X_train_.dtype), reference.X_train_):
            raise ValueError("lds_scorer needs an estimator fitted on the same training rows "
                             "as its reference (use RemovalSplit, which fits on all rows).")
        rows, targets = (to_numpy(reference.X_train_), to_numpy(reference.T_train_))
        if reference._target_kind != "float":
            targets = reference.classes_[targets.astype(np.int64).reshape(-1)]
        eval_rows = to_numpy(reference.X_eval_)
        eval_targets = to_numpy(reference.T_eval_)
        if reference._target_kind != "float":
            eval_targets = reference.classes_[eval_targets.astype(np.int64).reshape(-1)]
        matrix = estimator.loss_change(rows, targets, eval_rows, eval_targets)
        return reference.score_attributions(matrix, n_bootstrap=0).mean

    return scorer
