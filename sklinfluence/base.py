"""What every sklinfluence estimator shares: fitting the net, targets, row look-up.

:class:`BaseResponseEstimator` turns ``fit(X, y)`` into a trained skorch net
(``net_``), its :class:`~sklinfluence.functional.FunctionalModel`
(``model_``) and the training tensors, and maps samples given to the scoring
methods to network targets — looking them up among the training rows when no
``y`` is given (what a :class:`~sklearn.pipeline.Pipeline` needs).
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.frozen import FrozenEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from .functional import FunctionalModel
from .losses import SUPPORTED_CRITERIA
from .response import ResponseContext, Rung
from .retrain import get_flat_params, initialize_net, module_dtype

__all__ = ["BaseResponseEstimator", "RungViewMixin"]

_INDEX_CRITERIA = ("CrossEntropyLoss", "NLLLoss")
# Tolerance for the check that the functional loss reproduces net.get_loss.
_LOSS_MATCH_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                    torch.bfloat16: 1e-2}


def _criterion_name(net: Any) -> str:
    criterion = getattr(net, "criterion_", None) or getattr(net, "criterion", None)
    if criterion is None:
        raise TypeError(
            f"net must be a skorch NeuralNet (NeuralNetRegressor, NeuralNetClassifier, "
            f"NeuralNetBinaryClassifier), got {type(net).__name__}."
        )
    return criterion.__name__ if isinstance(criterion, type) else type(criterion).__name__


def _target_kind(net: Any) -> str:
    """``"index"`` (class ids), ``"binary"`` (0/1 floats) or ``"float"``."""
    from skorch import NeuralNet, NeuralNetBinaryClassifier

    if not isinstance(net, NeuralNet):
        raise TypeError(
            "net must be a skorch NeuralNet (NeuralNetRegressor, NeuralNetClassifier, "
            f"NeuralNetBinaryClassifier) or FrozenEstimator(fitted_net), got "
            f"{type(net).__name__}."
        )
    name = _criterion_name(net)
    if name not in SUPPORTED_CRITERIA:
        raise ValueError(
            f"criterion {name} is not supported; supported criteria are "
            f"{', '.join(SUPPORTED_CRITERIA)} (torch.nn, reduction='mean')."
        )
    if name in _INDEX_CRITERIA:
        return "index"
    if name == "BCEWithLogitsLoss" and isinstance(net, NeuralNetBinaryClassifier):
        return "binary"
    return "float"


class BaseResponseEstimator(BaseEstimator):
    """Base class: fits (or adopts) a skorch net and prepares its functional model.

    Subclasses build ``responder_`` (:mod:`sklinfluence.response`) in
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
    }

    # ------------------------------------------------------------------ fit
    def _fit_net(self, X: Any, y: Any) -> None:
        epsilon = getattr(self, "epsilon", None)
        if epsilon is not None and epsilon == 0:
            raise ValueError(
                "epsilon must be non-zero: 1/N removes one sample's share, -1/N adds "
                "one; got 0. Leave epsilon=None for 1/N."
            )
        frozen = isinstance(self.net, FrozenEstimator)
        net = self.net.estimator if frozen else self.net
        kind = _target_kind(net)
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=kind == "float",
                             multi_output=kind == "float")
        if X.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 samples, got n_samples={X.shape[0]}.")
        self._target_kind = kind
        if kind == "index":
            self.classes_ = self._classes_for(net if frozen else None, y)
        elif kind == "binary":
            self.classes_ = self._binary_classes(y)
        encoded = self._encode(y)

        # The seed of the net's own fit; retraining (cold-start LOO) reuses it.
        if self.random_state is None:
            self.seed_ = int(torch.randint(np.iinfo(np.int32).max, (1,)))
        else:
            self.seed_ = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        if frozen:
            if not getattr(net, "initialized_", False):
                raise ValueError(
                    "FrozenEstimator(net) needs an already fitted net; call net.fit "
                    "first or pass the unfitted net to let the estimator train it."
                )
            fitted = net
            self.initial_params_ = None
        else:
            fitted = clone(net).set_params(train_split=None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed_)
                initialize_net(fitted, X)
                self.initial_params_ = get_flat_params(fitted.module_).clone()
                fitted.partial_fit(*self._net_data(X, encoded, module_dtype(fitted)))
        self._recipe = net
        self.net_ = fitted
        self.model_ = FunctionalModel.from_net(fitted, weight_decay=self.weight_decay)
        self.X_train_, self.T_train_ = self._tensors(X, encoded)
        self._check_loss_matches_net()
        self._row_index = {}
        for i, row in enumerate(X):
            self._row_index.setdefault(row.tobytes(), i)
        self.n_train_ = int(X.shape[0])
        self.epsilon_ = 1.0 / self.n_train_ if epsilon is None else float(epsilon)

    def _context(self, **options: Any) -> ResponseContext:
        """The response context of the fitted net; ``options`` set solver details."""
        dtype = self.model_.dtype
        return ResponseContext(
            model=self.model_, X=self.X_train_, T=self.T_train_, epsilon=self.epsilon_,
            damping=float(getattr(self, "damping", 0.0)),
            batch_size=self.batch_size, recipe=self._recipe,
            recipe_data=self._net_data(self.X_train_.cpu().numpy(),
                                       self.T_train_.cpu().numpy(), dtype),
            theta_0=self.initial_params_, seed=self.seed_,
            max_epochs=int(self.net_.max_epochs), **options,
        )

    @staticmethod
    def _classes_for(net: Any, y: np.ndarray) -> np.ndarray:
        if y.ndim != 1:
            raise ValueError(f"class labels must be 1-D, got y with shape {y.shape}.")
        known = getattr(net, "classes_", None) if net is not None else None
        return np.asarray(known) if known is not None else np.unique(y)

    @staticmethod
    def _binary_classes(y: np.ndarray) -> np.ndarray:
        if y.ndim != 1:
            raise ValueError(f"binary labels must be 1-D, got y with shape {y.shape}.")
        classes = np.unique(y)
        if len(classes) > 2:
            raise ValueError(
                f"NeuralNetBinaryClassifier needs at most 2 classes, got {len(classes)}: "
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

    @staticmethod
    def _net_data(X: np.ndarray, encoded: np.ndarray, dtype: torch.dtype) -> tuple:
        """Inputs and targets as numpy arrays in the module's dtype, for ``net.fit``."""
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        targets = encoded if encoded.dtype == np.int64 else encoded.astype(np_dtype)
        return X.astype(np_dtype), targets

    def _tensors(self, X: np.ndarray, encoded: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies (never views of the caller's arrays) in the model's dtype/device."""
        model = self.model_
        Xt = torch.tensor(X, dtype=model.dtype, device=model.device)
        t_dtype = torch.int64 if encoded.dtype == np.int64 else model.dtype
        return Xt, torch.tensor(encoded, dtype=t_dtype, device=model.device)

    def _check_loss_matches_net(self) -> None:
        """Refuse a net whose ``get_loss`` does something the model does not mirror."""
        net, model = self.net_, self.model_
        X, T = self.X_train_[:16], self.T_train_[:16]
        module = net.module_
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                y_pred = net.infer(X)
                expected = float(net.get_loss(y_pred, T, X=X, training=False))
                ours = float(model.losses(model.params, X, T).mean())
        finally:
            module.train(was_training)
        if not np.isfinite(expected):
            hint = (" NeuralNetClassifier's default NLLLoss expects the module to output "
                    "probabilities (end it with Softmax) — or pass "
                    "criterion=torch.nn.CrossEntropyLoss for logits."
                    if model.loss.name == "NLLLoss" else "")
            raise ValueError(
                f"the trained net's {model.loss.name} on the training rows is "
                f"{expected!r}, not a finite number; influence needs a finite loss.{hint}"
            )
        rtol = _LOSS_MATCH_RTOL.get(model.dtype, 1e-4)
        if not np.isclose(ours, expected, rtol=rtol, atol=rtol):
            raise ValueError(
                f"the net's get_loss gives {expected!r} on the first training rows but "
                f"the {model.loss.name} per-sample losses average to {ours!r}: the net "
                "computes its loss in a way sklinfluence does not model (an overridden "
                "get_loss?). Use a stock skorch net with one of the criteria "
                f"{', '.join(SUPPORTED_CRITERIA)}."
            )

    # -------------------------------------------------------------- samples
    def _targets_for(self, X: Any, y: Any, *, what: str = "X") -> tuple:
        """Validate samples; return ``(X, T, index)``, ``y=None`` looking rows up.

        ``index`` is each row's position among the training rows (with the
        same target), −1 where it is not a training row.
        """
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        index = np.array([self._row_index.get(row.tobytes(), -1) for row in X], dtype=int)
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
                              multi_output=True)[1]
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
    ``fit``; ``param_change``, ``score_samples`` and ``loss_change`` follow.
    Mixed in left of :class:`BaseResponseEstimator`.
    """

    def _rung(self) -> Rung:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _responses(self, X: Any, y: Any) -> tuple:
        Xt, Tt, index = self._targets_for(X, y)
        return Xt, Tt, self.responder_.param_change(self._rung(), Xt, Tt, index)

    def param_change(self, X: Any, y: Any = None) -> np.ndarray:
        """Parameter response ``θ_after − θˢ`` to removing each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to remove.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.

        Returns
        -------
        ndarray of shape (n_samples, n_params)
            One row per sample, flattened in the order of
            ``net_.module_.parameters()`` (trainable parameters only).
        """
        return self._responses(X, y)[2].to(torch.float64).cpu().numpy()

    def score_samples(self, X: Any, y: Any = None) -> np.ndarray:
        """Change of each sample's own loss when it is removed.

        ``L_m(θˢ + Δθ_m) − L_m(θˢ)``: large values flag samples the model had
        to bend to fit (often mislabeled ones).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.

        Returns
        -------
        ndarray of shape (n_samples,)
            Positive = removing the sample increases its own loss (it helped
            itself).
        """
        Xt, Tt, delta = self._responses(X, y)
        model, theta = self.model_, self.model_.params
        with torch.no_grad():
            after = torch.stack([model.losses(theta + d, Xt[i:i + 1], Tt[i:i + 1])[0]
                                 for i, d in enumerate(delta)]) if len(delta) else delta[:, 0]
            before = model.losses(theta, Xt, Tt)
        return (after - before).to(torch.float64).cpu().numpy()

    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None,
                    y_eval: Any = None) -> np.ndarray:
        """Change of each evaluation loss when each sample is removed.

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

        Returns
        -------
        ndarray of shape (n_samples, n_eval)
            Entry ``[m, e]`` is ``L_e(θˢ + Δθ_m) − L_e(θˢ)``; positive = removing
            sample ``m`` increases the loss on point ``e`` (``m`` helped ``e``).
        """
        Xe, Te = self._eval_targets(X_eval, y_eval)
        _, _, delta = self._responses(X, y)
        model, theta = self.model_, self.model_.params
        with torch.no_grad():
            before = model.losses(theta, Xe, Te)
            rows = [model.losses(theta + d, Xe, Te) - before for d in delta]
        result = torch.stack(rows) if rows else before.new_zeros((0, len(before)))
        return result.to(torch.float64).cpu().numpy()

