"""Adapter for skorch nets: fitting with a seed, the functional model, retraining."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from skorch.callbacks import Callback
from torch import Tensor

from .ensemble import ensemble_supported, retrain_ensemble
from .functional import FunctionalModel, _is_skorch_classifier
from .losses import SUPPORTED_CRITERIA, output_loss_from_criterion
from .retrain import get_flat_params, initialize_net, module_dtype, retrain
from ..utils.threads import model_size_known

__all__ = ["SkorchAdapter"]

_INDEX_CRITERIA = ("CrossEntropyLoss", "NLLLoss")
#: Rows of X the untrained module is run on before training (check_before_training).
_CHECK_ROWS = 8
# Tolerance for the check that the functional loss reproduces net.get_loss.
_LOSS_MATCH_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                    torch.bfloat16: 1e-2}


def _criterion_name(net: Any) -> str:
    criterion = getattr(net, "criterion_", None) or getattr(net, "criterion", None)
    return criterion.__name__ if isinstance(criterion, type) else type(criterion).__name__


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


class _Checkpoints(Callback):
    """skorch callback: appends ``(θ_k, η_k)`` to ``sink`` at the end of each epoch ``k``.

    ``η_k`` is the step size of the epoch's own steps (Pruthi et al.'s step size
    between checkpoints ``k − 1`` and ``k``): the learning rate read before each
    training step, averaged over the epoch where a scheduler changes it between
    steps. Read at the epoch's end it would be the next epoch's: a scheduler
    stepping per epoch (skorch's ``LRScheduler``) has already changed it then.
    """

    def __init__(self, sink: list) -> None:
        self.sink = sink
        self._rates: list = []

    def on_batch_begin(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if training:
            self._rates.append(float(net.optimizer_.param_groups[0]["lr"]))

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        rates = self._rates or [float(net.optimizer_.param_groups[0]["lr"])]
        self.sink.append((get_flat_params(net.module_).clone(), float(np.mean(rates))))
        self._rates = []


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
    accepts_nd = True  # X as the module takes it: images (n, C, H, W), sequences, …

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
            self.check_before_training(self.net, X, encoded)
            return self.net, None
        fitted = clone(self.net).set_params(train_split=None)
        if checkpoints is not None:
            own = fitted.callbacks
            fitted.set_params(callbacks=[*(own if own not in (None, "disable") else []),
                                         ("sklinfluence_checkpoints", _Checkpoints(checkpoints))])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            initialize_net(fitted, X)
            self.check_before_training(fitted, X, encoded)
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

    def check_before_training(self, net: Any, X: np.ndarray, encoded: np.ndarray) -> None:
        """Refuse a criterion, module or targets that cannot work, before any epoch.

        ``net`` is initialised (not trained). Resolves the loss from its
        criterion (options such as ``reduction="sum"`` are refused here), runs
        the module once on the first :data:`_CHECK_ROWS` rows of ``X`` (eval
        mode, no grad, the random stream left as it was) and compares its output
        width with the targets: one score per class for
        ``CrossEntropyLoss``/``NLLLoss``, one logit for a binary classifier, one
        output per column of ``y`` otherwise; a skorch classifier's ``NLLLoss``
        needs probabilities (no negative output); then the net's own loss on
        those rows must be finite.
        """
        from skorch import NeuralNet, NeuralNetBinaryClassifier

        name, kind = _criterion_name(net), type(net).__name__
        output_loss_from_criterion(net.criterion_)  # refuses reduction='sum', weights…
        dtype = module_dtype(net)
        rows = np.asarray(X[:_CHECK_ROWS]).astype(numpy_dtype(dtype))
        module = net.module_
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                try:  # a binary classifier's infer refuses wide outputs in its own words
                    out = (NeuralNet.infer(net, rows) if isinstance(net, NeuralNetBinaryClassifier)
                           else net.infer(rows))
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise ValueError(
                        f"the net's module failed on the first rows of X (shape "
                        f"{rows.shape}) before training ({type(exc).__name__}: {exc}); check "
                        f"that the module's input size matches X's rows of shape "
                        f"{rows.shape[1:]}."
                    ) from exc
                self._check_output_width(net, out, encoded, name, kind)
                first = out[0] if isinstance(out, tuple) else out
                if name == "NLLLoss" and _is_skorch_classifier(net) and bool((first < 0).any()):
                    raise ValueError(
                        f"{kind}'s NLLLoss expects the module to output probabilities (it "
                        "takes their log), but the untrained module outputs negative values "
                        f"(e.g. {float(first.min()):.3g}): end the module with Softmax — or "
                        "pass criterion=torch.nn.CrossEntropyLoss for logits.")
                if isinstance(net, NeuralNetBinaryClassifier):
                    out = net.infer(rows)  # its own (n,) logits, as get_loss takes them
                head = encoded[:_CHECK_ROWS]
                targets = torch.as_tensor(head if head.dtype == np.int64
                                          else head.astype(rows.dtype))
                try:
                    loss = float(net.get_loss(out, targets.to(net.device), X=rows,
                                              training=False))
                except (RuntimeError, TypeError, ValueError, IndexError,
                        AttributeError) as exc:
                    hint = (" The module's forward returns a tuple, which the criterion "
                            "cannot take: return only the outputs (or override get_loss "
                            "to use y_pred[0])." if isinstance(out, tuple) else "")
                    raise ValueError(
                        f"{kind}'s {name} could not be computed on the untrained module's "
                        f"outputs for the first rows of X ({type(exc).__name__}: {exc}).{hint} "
                        f"sklinfluence supports {', '.join(SUPPORTED_CRITERIA)} on a module "
                        "whose forward returns one tensor of outputs (n_samples, n_outputs)."
                    ) from exc
        finally:
            module.train(was_training)
        if not np.isfinite(loss):
            hint = (" NeuralNetClassifier's default NLLLoss expects the module to output "
                    "probabilities (end it with Softmax) — or pass "
                    "criterion=torch.nn.CrossEntropyLoss for logits."
                    if name == "NLLLoss" and _is_skorch_classifier(net) else "")
            raise ValueError(
                f"the untrained net's {name} on the first rows of X is {loss!r}, not a "
                f"finite number; influence needs a finite loss.{hint}"
            )

    def _check_output_width(self, net: Any, out: Any, encoded: np.ndarray, name: str,
                            kind: str) -> None:
        """The module's outputs for the first rows against the targets.

        See :meth:`check_before_training`.
        """
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            out = out[0]  # skorch's convention; get_loss must then handle the tuple
        if not isinstance(out, Tensor):
            raise ValueError(
                f"the module's forward returns a {type(out).__name__}, not a tensor; "
                "sklinfluence needs forward to return the outputs as one tensor of shape "
                "(n_samples, n_outputs).")
        n = min(_CHECK_ROWS, int(encoded.shape[0]))
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"the module returned outputs of shape {tuple(out.shape)} for {n} rows; "
                "its forward must return one row of outputs per sample, shape "
                "(n_samples, n_outputs).")
        width = int(out[0].numel())
        if self.target_kind == "index":
            n_classes = int(encoded.max()) + 1 if encoded.size else 0
            if out.dim() != 2 or width < n_classes:
                outputs = f"{width} values" if out.dim() == 2 else \
                    f"outputs of shape {tuple(out.shape[1:])}"
                raise ValueError(
                    f"y has {n_classes} classes but the module gives {outputs} "
                    f"per row; {name} needs one score per "
                    f"class, shape (n_samples, {n_classes}). Make the module's last layer "
                    f"output {n_classes} values (e.g. Linear(..., {n_classes})).")
            if not self.frozen and np.unique(encoded).size < 2:
                raise ValueError(
                    f"y has a single class; {kind} needs at least 2 classes to learn from.")
        elif self.target_kind == "binary":
            if width != 1:
                raise ValueError(
                    f"{kind} needs one logit per row (module outputs of shape (n,) or "
                    f"(n, 1)); the module outputs {width} values per row. Make its last "
                    f"layer output 1 value, or use NeuralNetClassifier with "
                    f"criterion=torch.nn.CrossEntropyLoss for {width} classes.")
        else:
            columns = int(np.prod(encoded.shape[1:], dtype=int))
            if width != columns:
                if _is_skorch_classifier(net):
                    raise ValueError(
                        f"{kind} with criterion {name}: the module outputs {width} values "
                        f"per row but y holds {columns} (class labels?); {name} compares "
                        "each output with a target value of the same shape. For class "
                        "labels pass criterion=torch.nn.CrossEntropyLoss (logits) or "
                        "NLLLoss (probabilities); for regression use NeuralNetRegressor "
                        f"with y of shape (n_samples, {width}).")
                raise ValueError(
                    f"{kind} with {name}: y has {columns} column(s) but the module outputs "
                    f"{width} value(s) per row; {name} needs one output per target column. "
                    f"Make the module output {columns} value(s) (its last layer's size), "
                    f"or pass y with {width} column(s).")

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
