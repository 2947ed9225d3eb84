"""Adapter for skorch nets: fitting with a seed, the functional model, retraining."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from skorch.callbacks import Callback
from torch import Tensor

from .ensemble import ensemble_supported, retrain_ensemble
from .functional import FunctionalModel
from .losses import SUPPORTED_CRITERIA
from .retrain import get_flat_params, initialize_net, module_dtype, retrain
from .threads import model_size_known

__all__ = ["SkorchAdapter"]

_INDEX_CRITERIA = ("CrossEntropyLoss", "NLLLoss")
# Tolerance for the check that the functional loss reproduces net.get_loss.
_LOSS_MATCH_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                    torch.bfloat16: 1e-2}


def _criterion_name(net: Any) -> str:
    criterion = getattr(net, "criterion_", None) or getattr(net, "criterion", None)
    return criterion.__name__ if isinstance(criterion, type) else type(criterion).__name__


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


class _Checkpoints(Callback):
    """skorch callback: appends ``(θ, learning rate)`` to ``sink`` after each epoch."""

    def __init__(self, sink: list) -> None:
        self.sink = sink

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        self.sink.append((get_flat_params(net.module_).clone(),
                          float(net.optimizer_.param_groups[0]["lr"])))


class SkorchAdapter:
    """A skorch ``NeuralNet`` as sklinfluence sees it.

    Parameters
    ----------
    net : skorch.NeuralNet
        The net (unfitted recipe, or the fitted net itself when ``frozen``).
    frozen : bool
        The net was passed as ``FrozenEstimator(net)``: adopt, never train.
    """

    exact_proximal = False  # rung 2 is retrained with the recipe
    needs_initial_params = True  # cold start restores θ⁰

    def __init__(self, net: Any, frozen: bool = False) -> None:
        from skorch import NeuralNetBinaryClassifier

        self.net, self.frozen = net, frozen
        name = _criterion_name(net)
        if name not in SUPPORTED_CRITERIA:
            raise ValueError(
                f"criterion {name} is not supported; supported criteria are "
                f"{', '.join(SUPPORTED_CRITERIA)} (torch.nn, reduction='mean')."
            )
        if name in _INDEX_CRITERIA:
            self.target_kind = "index"
        elif name == "BCEWithLogitsLoss" and isinstance(net, NeuralNetBinaryClassifier):
            self.target_kind = "binary"
        else:
            self.target_kind = "float"
        if frozen and not getattr(net, "initialized_", False):
            raise ValueError(
                "FrozenEstimator(net) needs an already fitted net; call net.fit first or "
                "pass the unfitted net to let the estimator train it."
            )

    def resolve_target_kind(self, classes: np.ndarray | None) -> str:
        """The criterion alone decides the targets of a skorch net."""
        return self.target_kind

    def known_classes(self) -> np.ndarray | None:
        """Classes a frozen classifier was trained on (``None``: infer from ``y``)."""
        known = getattr(self.net, "classes_", None) if self.frozen else None
        return None if known is None else np.asarray(known)

    def fit(self, X: np.ndarray, encoded: np.ndarray, seed: int,
            checkpoints: list | None = None) -> tuple[Any, Tensor | None]:
        """Train a clone on exactly ``X`` (no validation split) under ``seed``.

        Returns the fitted net and ``θ⁰`` (``None`` for a frozen net). With a
        ``checkpoints`` list, ``(θ, learning rate)`` is appended to it at the
        end of every epoch (TracIn-CP).
        """
        if self.frozen:
            if checkpoints is not None:
                raise ValueError(
                    "checkpoints are recorded while the estimator trains the net; a "
                    "FrozenEstimator net was trained elsewhere. Pass the unfitted net.")
            return self.net, None
        fitted = clone(self.net).set_params(train_split=None)
        if checkpoints is not None:
            own = fitted.callbacks
            fitted.set_params(callbacks=[*(own if own not in (None, "disable") else []),
                                         ("sklinfluence_checkpoints", _Checkpoints(checkpoints))])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            initialize_net(fitted, X)
            theta_0 = get_flat_params(fitted.module_).clone()
            model_size_known(theta_0.numel())  # training a large net may use more threads
            np_dtype = numpy_dtype(module_dtype(fitted))
            targets = encoded if encoded.dtype == np.int64 else encoded.astype(np_dtype)
            fitted.partial_fit(X.astype(np_dtype), targets)
        if checkpoints is not None:  # the fitted net keeps the user's callbacks only
            fitted.callbacks = own
            fitted.callbacks_ = [(name, cb) for name, cb in fitted.callbacks_
                                 if name != "sklinfluence_checkpoints"]
        return fitted, theta_0

    @staticmethod
    def functional_model(fitted: Any, weight_decay: Any) -> FunctionalModel:
        return FunctionalModel.from_net(fitted, weight_decay=weight_decay)

    @staticmethod
    def max_epochs(fitted: Any) -> int:
        return int(fitted.max_epochs)

    @staticmethod
    def check(fitted: Any, model: FunctionalModel, X: Tensor, T: Tensor) -> None:
        """Refuse a net whose ``get_loss`` does something the model does not mirror."""
        X, T = X[:16], T[:16]
        module = fitted.module_
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                expected = float(fitted.get_loss(fitted.infer(X), T, X=X, training=False))
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

    def recipe_key(self) -> str:
        """A stable description of the training recipe (for the response cache).

        Parameter values whose ``repr`` is an object address are described by
        their type, sets are sorted (their order changes between processes);
        ``train_split``, ``verbose`` and private attributes do not change
        retraining.
        """
        params = self.net.get_params(deep=False)
        described = {}
        for name, value in sorted(params.items()):
            if name in ("train_split", "verbose") or name.startswith("_"):
                continue
            text = repr(sorted(value, key=repr)) if isinstance(value, (set, frozenset)) \
                else repr(value)
            described[name] = type(value).__qualname__ if " at 0x" in text else text
        if self.frozen:
            described["frozen_module"] = repr(self.net.module_)
        return f"{type(self.net).__qualname__}{described}"

    def can_retrain_batch(self, model: FunctionalModel) -> bool:
        """Whether :meth:`retrain_batch` replays the recipe exactly (see :mod:`.ensemble`)."""
        return ensemble_supported(self.net, model.module)[0]

    def retrain_batch(self, model: FunctionalModel, X: Tensor, T: Tensor, removed: list, *,
                      start: Tensor, seed: int | None, max_epochs: int, anchor: Tensor,
                      proximity: float) -> Tensor:
        """One retrained copy per set of rows in ``removed`` (equal sizes), ``(B, P)``."""
        return retrain_ensemble(self.net, model, X, T, removed, start=start, seed=seed,
                                max_epochs=max_epochs, anchor=anchor, proximity=proximity)

    def retrain(self, X: Tensor, T: Tensor, *, start: Tensor, seed: int | None,
                max_epochs: int, anchor: Tensor, proximity: float) -> Tensor:
        """The net's recipe on ``(X, T)`` from ``start`` (see :func:`~.retrain.retrain`)."""
        X_np = X.cpu().numpy()
        T_np = T.cpu().numpy()
        return retrain(self.net, X_np, T_np, start=start, seed=seed, max_epochs=max_epochs,
                       anchor=anchor, proximity=proximity)
