"""What every sklinfluence estimator shares: fitting the net, targets, row look-up.

:class:`BaseResponseEstimator` turns ``fit(X, y)`` into a trained model
(``net_``: a skorch net or a scikit-learn linear model, through
:mod:`sklinfluence.model.adapters`), its :class:`~sklinfluence.model.functional.FunctionalModel`
(``model_``) and the training tensors, and maps samples given to the scoring
methods to network targets — looking them up among the training rows when no
``y`` is given (what a :class:`~sklearn.pipeline.Pipeline` needs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from scipy.sparse import issparse
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .utils._sklearn import Interval, StrOptions
from .model.adapters import make_adapter
from .utils.execution import resolve_memory
from .response.cache import CacheOwner
from .response.measure import linear_change, loss_change, own_change, to_numpy
from .pipeline import refuse_dropped_arguments
from .model.removal import Removal, group_removals, single_removals
from .response.context import ResponseContext
from .response.responder import Rung, rung
from .utils.threads import compute_section

__all__ = ["BaseResponseEstimator", "RungViewMixin"]


def _check_numeric_features(X: Any) -> None:
    """Refuse text features with the fix, instead of numpy's conversion error."""
    if issparse(X) or hasattr(X, "dtypes"):  # validate_data has the right words for these
        return
    array = np.asarray(X)
    if array.dtype.kind == "c":
        raise ValueError("Complex data not supported: X must be real numbers. Split complex "
                         "values into real columns first, e.g. np.hstack([X.real, X.imag]).")
    if array.dtype.kind in "OUS":
        try:
            array.astype(np.float64)
        except ValueError:  # text; a TypeError (e.g. a dict in X) keeps numpy's message
            raise ValueError(
                "X must be numeric: could not convert values like "
                f"{str(array.flat[0])!r} to numbers. Encode text or categorical columns "
                "first, e.g. with sklearn.preprocessing.OneHotEncoder in a Pipeline."
            ) from None


def _check_class_labels(y: np.ndarray, adapter: Any) -> None:
    """scikit-learn's refusal of continuous targets for a classifier, with the fix."""
    try:
        check_classification_targets(y)
    except ValueError as exc:
        model = getattr(adapter, "net", getattr(adapter, "est", None))
        raise ValueError(
            f"{exc} {type(model).__name__} is a classifier; for continuous targets use a "
            "regressor (NeuralNetRegressor with MSELoss, LinearRegression or Ridge)."
        ) from None


def _row_digest(row: np.ndarray) -> bytes:
    """128-bit digest of a validated (float64) row: how :meth:`_targets_for` finds
    training rows (a collision between two rows: about 2⁻¹⁰⁰ at 10⁶ rows)."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()

class BaseResponseEstimator(BaseEstimator):
    """Base class: fits (or adopts) the model and prepares its functional model.

    Subclasses build ``responder_`` (:mod:`sklinfluence.response.responder`) in
    ``fit``; the estimators that are views of one rung also mix in
    :class:`RungViewMixin`. Not meant to be used directly.
    """

    _parameter_constraints: dict = {
        "net": "no_validation",
        "damping": [Interval(Real, 0, None, closed="left")],
        "epsilon": [None, Interval(Real, -1, 1, closed="neither")],
        "weight_decay": [StrOptions({"auto"}), Interval(Real, 0, None, closed="left")],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "measure": [StrOptions({"linear", "loss"})],
    }
    #: Constraints of the ground-truth estimators' execution parameters.
    _execution_constraints: dict = {
        "n_jobs": [None, Integral],
        "memory": "no_validation",  # checked by resolve_memory
        "verbose": ["verbose"],
    }

    # ------------------------------------------------------------------ fit
    def _fit_net(self, X: Any, y: Any, checkpoints: list | None = None,
                 epsilon: float | None = None) -> None:
        """Validate, train the net and set the fitted state; ``epsilon`` is the
        estimator's ``epsilon`` parameter where it has one (``None``: ``1/N``)."""
        if epsilon is not None and epsilon == 0:
            raise ValueError(
                "epsilon must be non-zero: 1/N removes one sample's share, -1/N adds "
                "one; got 0. Leave epsilon=None for 1/N."
            )
        adapter = make_adapter(self.net)
        y_array = np.asarray(y) if adapter.target_kind == "float" and y is not None else None
        if y_array is not None and y_array.dtype.kind in "OUS":  # text: numbers or labels?
            try:
                y_array.astype(np.float64)
            except (TypeError, ValueError):
                model = getattr(adapter, "net", getattr(adapter, "est", None))
                raise ValueError(
                    f"{type(model).__name__} is a regressor (squared loss) and needs numeric "
                    f"targets; got values like {str(y_array.flat[0])!r}. For class labels "
                    "use a classifier (NeuralNetClassifier with CrossEntropyLoss, or "
                    "LogisticRegression)."
                ) from None
        _check_numeric_features(X)
        X, y = validate_data(self, X, y, dtype=np.float64, allow_nd=adapter.accepts_nd,
                             y_numeric=adapter.target_kind == "float",
                             multi_output=adapter.target_kind == "float")
        if X.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 samples, got n_samples={X.shape[0]}.")
        if adapter.target_kind != "float":
            if y.ndim != 1:
                raise ValueError(f"class labels must be 1-D, got y with shape {y.shape}.")
            _check_class_labels(y, adapter)
            known = adapter.known_classes()
            self.classes_ = known if known is not None else np.unique(y)
            adapter.resolve_target_kind(self.classes_)
            if adapter.target_kind == "binary":
                self.classes_ = self._binary_classes(self.classes_)
        self._target_kind = adapter.target_kind
        encoded = self._encode(y)

        # The seed of the model's own fit; retraining (cold-start LOO) reuses it.
        if self.random_state is None:
            self.seed_ = int(torch.randint(np.iinfo(np.int32).max, (1,)))
        else:
            self.seed_ = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self.net_, self.initial_params_ = adapter.fit(X, encoded, self.seed_,
                                                      **({} if checkpoints is None
                                                         else {"checkpoints": checkpoints}))
        self._adapter = adapter
        self.input_shape_ = tuple(int(d) for d in X.shape[1:])
        self.model_ = adapter.functional_model(self.net_, self.weight_decay)
        self.X_train_, self.T_train_ = self._tensors(X, encoded)
        adapter.check(self.net_, self.model_, self.X_train_, self.T_train_)
        self._row_index = {}  # a row's digest -> its first position (not the row: 13 MB
        for i, row in enumerate(X):  # at 20,000 rows of 64 features)
            self._row_index.setdefault(_row_digest(row), i)
        self.n_train_ = int(X.shape[0])
        self.epsilon_ = 1.0 / self.n_train_ if epsilon is None else float(epsilon)

    def _context(self, **options: Any) -> ResponseContext:
        """The response context of the fitted net, from the parameters every
        estimator with responses has (``damping``, ``batch_size``, ``verbose``)
        and :meth:`_execution_options`; ``options`` set solver details."""
        return ResponseContext(
            model=self.model_, X=self.X_train_, T=self.T_train_, epsilon=self.epsilon_,
            damping=float(self.damping), batch_size=self.batch_size, recipe=self._adapter,
            theta_0=self.initial_params_, seed=self.seed_,
            max_epochs=self._adapter.max_epochs(self.net_), verbose=int(self.verbose),
            cache_owner=self._cache_owner_token(), **self._execution_options(), **options,
        )

    def _execution_options(self) -> dict:
        """The context's execution options from the parameters ``n_jobs``, ``memory``
        and ``removal_batch_size``; an estimator without them overrides this."""
        return {"n_jobs": self.n_jobs, "store": resolve_memory(self.memory),
                "removal_batch_size": int(self.removal_batch_size)}

    # --------------------------------------------------------------- cloning
    def _cache_owner_token(self) -> CacheOwner:
        """This estimator family's :class:`~sklinfluence.response.cache.CacheOwner`, made on first use.

        Stored as ``_cache_owner``: private and without a trailing underscore,
        so it is neither a parameter nor fitted state.
        """
        return self.__dict__.setdefault("_cache_owner", CacheOwner())

    def __sklearn_clone__(self) -> BaseResponseEstimator:
        """scikit-learn's clone, sharing this estimator's response-cache owner.

        The clone's parameters are those of :func:`sklearn.base.clone`; it
        also gets the token that owns this estimator's cached responses, so
        that clones — a grid search's candidates, fitted and scored one after
        another — reuse each other's responses for as long as any of them (or
        the original) is alive.
        """
        twin = super().__sklearn_clone__()
        twin._cache_owner = self._cache_owner_token()
        return twin

    @staticmethod
    def _binary_classes(classes: np.ndarray) -> np.ndarray:
        if len(classes) > 2:
            raise ValueError(
                f"a binary classifier needs at most 2 classes, got {len(classes)}: "
                f"{classes[:5]}. Use NeuralNetClassifier with CrossEntropyLoss."
            )
        if np.issubdtype(classes.dtype, np.number) and set(classes.tolist()) <= {0, 1}:
            return np.array([0, 1], dtype=classes.dtype)
        return classes

    def _encode(self, y: np.ndarray) -> np.ndarray:
        """Targets as the net consumes them (class ids, 0/1 floats, or values)."""
        if self._target_kind == "float":
            y = np.asarray(y, dtype=np.float64)
            return y.reshape(-1, 1) if y.ndim == 1 else y
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"class labels must be 1-D, got y with shape {y.shape}.")
        index = np.searchsorted(self.classes_, y)
        index = np.clip(index, 0, len(self.classes_) - 1)
        unknown = self.classes_[index] != y
        if unknown.any():
            raise ValueError(
                f"y contains labels not seen in fit: {np.unique(y[unknown])[:5]}; known "
                f"classes are {self.classes_}."
            )
        return index.astype(np.float64 if self._target_kind == "binary" else np.int64)

    def _tensors(self, X: np.ndarray, encoded: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies (never views of the caller's arrays) in the model's dtype/device."""
        model = self.model_
        Xt = torch.tensor(X, dtype=model.dtype, device=model.device)
        t_dtype = torch.int64 if encoded.dtype == np.int64 else model.dtype
        return Xt, torch.tensor(encoded, dtype=t_dtype, device=model.device)

    # -------------------------------------------------------------- samples
    def _targets_for(self, X: Any, y: Any, *, what: str = "X") -> tuple:
        """Validate samples; return ``(X, T, index)``, ``y=None`` looking rows up.

        ``index`` is each row's position among the training rows (with the
        same target), −1 where it is not a training row.
        """
        check_is_fitted(self, "model_")
        X = self._validate_rows(X, what)
        index = np.array([self._row_index.get(_row_digest(row), -1) for row in X], dtype=int)
        if y is None:
            missing = np.flatnonzero(index < 0)
            if missing.size:
                raise ValueError(
                    f"{missing.size} of the {X.shape[0]} rows of {what} are not training "
                    f"rows (first: row {missing[0]}), so their targets are unknown. Pass "
                    "the targets explicitly (y=...) for samples that were not in fit's X."
                )
            return self.X_train_[index], self.T_train_[index], index
        y = np.asarray(y)
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"{what} and its targets have different lengths: {X.shape[0]} rows but "
                f"{y.shape[0]} targets."
            )
        if self._target_kind == "float":
            y = validate_data(self, X, y, dtype=np.float64, reset=False, y_numeric=True,
                              multi_output=True, allow_nd=True)[1]
        encoded = self._encode(y)
        expected_width = self.T_train_.shape[1:] if self.T_train_.dim() > 1 else ()
        if tuple(encoded.shape[1:]) != tuple(expected_width):
            raise ValueError(
                f"targets for {what} have shape {y.shape}, but the net was fitted on "
                f"targets of shape (n, {', '.join(map(str, expected_width))})."
            )
        Xt, Tt = self._tensors(X, encoded)
        known = index >= 0
        same = torch.zeros(len(index), dtype=torch.bool)
        if known.any():
            diff = (Tt[known] != self.T_train_[index[known]]).reshape(int(known.sum()), -1)
            same[torch.as_tensor(known)] = ~diff.any(dim=1).cpu()
        return Xt, Tt, np.where(same.numpy(), index, -1)

    def _validate_rows(self, X: Any, what: str = "X") -> np.ndarray:
        """``X`` as float64 rows shaped like fit's (images stay images)."""
        _check_numeric_features(X)
        shape = tuple(X.shape) if hasattr(X, "shape") else np.asarray(X).shape
        if (len(shape) > 2 or len(self.input_shape_) > 1) and \
                tuple(shape[1:]) != self.input_shape_:
            raise ValueError(
                f"{what} has rows of shape {tuple(shape[1:])}, but the net was fitted on "
                f"rows of shape {self.input_shape_} (X of shape (n, "
                f"{', '.join(map(str, self.input_shape_))})). Reshape {what} like fit's X.")
        return validate_data(self, X, dtype=np.float64, reset=False,
                             allow_nd=len(self.input_shape_) > 1)

    def _removals(self, X: Any, y: Any, groups: Any = None) -> tuple[Sequence[Removal], Any]:
        """The removals the rows of ``X`` describe: one per row (a
        :class:`~sklinfluence.model.removal.RowRemovals`), or one per group label.

        Returns the removals and the sorted group labels (``None`` without
        ``groups``).
        """
        Xt, Tt, index = self._targets_for(X, y)
        if groups is None:
            return single_removals(Xt, Tt, index), None
        return group_removals(Xt, Tt, index, groups)

    def _own_change(self, removals: list[Removal], deltas: torch.Tensor) -> np.ndarray:
        """Each removal's own loss change under its response (``measure``)."""
        return to_numpy(own_change(self.model_, removals, deltas, self.measure,
                                   self.batch_size))

    def _eval_targets(self, X_eval: Any, y_eval: Any) -> tuple:
        if X_eval is None:
            raise ValueError("loss_change needs X_eval, the evaluation inputs.")
        return self._targets_for(X_eval, y_eval, what="X_eval")[:2]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags


class RungViewMixin:
    """The outputs of an estimator that is a view of one rung of the ladder.

    The estimator names its rung in ``_rung()`` and builds ``responder_`` in
    ``fit``; ``param_change``, ``score_samples``, ``loss_change`` and
    ``score`` follow. Mixed in left of :class:`BaseResponseEstimator`.
    """

    # with metadata routing on, a Pipeline passes score's choices on by default
    __metadata_request__score = {"reference": True, "metric": True, "sample_weight": True}

    def _rung(self) -> Rung:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _responses(self, X: Any, y: Any, groups: Any = None) -> tuple:
        removals, _ = self._removals(X, y, groups)
        return removals, self.responder_.param_change(self._rung(), removals)

    @compute_section
    def param_change(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Parameter response ``θ_after − θˢ`` to removing each sample (or group).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to remove.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.
        groups : array-like of shape (n_samples,), default=None
            A label per row: the rows sharing a label are removed together,
            one removal per distinct label, in sorted label order
            (``numpy.unique``). ``None``: each row is removed on its own.

        Returns
        -------
        ndarray of shape (n_samples or n_groups, n_params)
            One row per removal, flattened in the order of
            ``net_.module_.parameters()`` (trainable parameters only).
        """
        return to_numpy(self._responses(X, y, groups)[1])

    @compute_section
    def score_samples(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Change of each sample's (or group's) own loss when it is removed.

        ``L_m(θˢ + Δθ_m) − L_m(θˢ)`` (``measure="loss"``) or ``∇L_m(θˢ)ᵀ Δθ_m``
        (``measure="linear"``); for a group, the change of its rows' summed
        loss. Large values flag samples the model had to bend to fit (often
        mislabeled ones).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together (see
            ``param_change``).

        Returns
        -------
        ndarray of shape (n_samples,) or (n_groups,)
            Positive = removing the sample increases its own loss (it helped
            itself).
        """
        return self._own_change(*self._responses(X, y, groups))

    @compute_section
    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None,
                    y_eval: Any = None, groups: Any = None) -> np.ndarray:
        """Change of each evaluation loss when each sample (or group) is removed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to remove.
        y : array-like, default=None
            Their targets; ``None`` looks the rows up among the training rows.
        X_eval : array-like of shape (n_eval, n_features)
            Evaluation inputs (e.g. test points).
        y_eval : array-like, default=None
            Their targets; ``None`` looks them up among the training rows.
        groups : array-like of shape (n_samples,), default=None
            A label per row of ``X``; rows sharing a label are removed
            together (see ``param_change``).

        Returns
        -------
        ndarray of shape (n_samples or n_groups, n_eval)
            Entry ``[m, e]`` is ``L_e(θˢ + Δθ_m) − L_e(θˢ)`` (``measure="loss"``)
            or ``∇L_e(θˢ)ᵀ Δθ_m`` (``"linear"``); positive = removing sample
            ``m`` increases the loss on point ``e`` (``m`` helped ``e``).
        """
        Xe, Te = self._eval_targets(X_eval, y_eval)
        _, delta = self._responses(X, y, groups)
        if self.measure == "linear":
            return to_numpy(linear_change(self.model_, delta, Xe, Te, self.batch_size))
        return to_numpy(loss_change(self.model_, delta, Xe, Te))

    @compute_section
    def score(self, X: Any, y: Any = None, *, reference: str = "loo",
              metric: str = "spearman", sample_weight: Any = None) -> float:
        """Agreement of ``score_samples`` with a ground-truth response.

        Rates how well this estimator's scores on the given training samples
        rank like a reference response on the same samples — what
        ``GridSearchCV`` maximises (use :class:`~sklinfluence.RemovalSplit`
        as ``cv``). The reference is computed on this estimator's own fitted
        net, and measured by the actual change of each sample's own loss.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training samples to remove (at least 2).
        y : array-like, default=None
            Their targets; ``None`` looks them up.
        reference : {"loo", "warm_start", "proximal", "pbrf"}, default="loo"
            Cold-start leave-one-out, warm start, proximal warm start, or the
            PBRF (the last two at this estimator's damping).
        metric : {"spearman", "pearson", "kendall"}, default="spearman"
            Agreement measure.
        sample_weight : None
            Not supported (the agreement weighs every removed sample alike);
            accepted as ``None`` only, which is what ``Pipeline.score`` passes
            when metadata routing is on.

        Returns
        -------
        float
            Higher is better; ``nan`` when either set of scores is constant.

        Raises
        ------
        TypeError
            When called by ``Pipeline.score`` after it dropped keyword
            arguments (``reference=``, ``metric=``): scikit-learn forwards them
            only with metadata routing on. Use
            :class:`~sklinfluence.PipelineView` or
            :func:`~sklinfluence.agreement_scorer` instead, or turn routing on
            (``reference`` and ``metric`` are requested by default).
        """
        from .agreement import REFERENCES, agreement

        refuse_dropped_arguments()
        if sample_weight is not None:
            raise ValueError("score does not take sample weights: the agreement weighs "
                             "every removed sample alike. Leave sample_weight=None.")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {sorted(REFERENCES)}, got {reference!r}")
        removals, _ = self._removals(X, y)
        estimate = self.score_samples(X, y)
        delta = self.responder_.param_change(rung(REFERENCES[reference]), removals)
        return agreement(estimate, to_numpy(own_change(self.model_, removals, delta)), metric)
