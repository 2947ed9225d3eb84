"""Which adapter turns the ``net`` parameter into something sklinfluence can use.

An adapter hides what kind of model an estimator holds. It says what targets
the model takes (``target_kind``: ``"index"`` class ids, ``"binary"`` 0/1 floats
or ``"float"`` values), fits it under a seed (``fit`` → fitted model and
``θ⁰``), builds its :class:`~sklinfluence.model.functional.FunctionalModel`, checks
that the functional model reproduces the fitted one (``check``) and retrains
it without a sample (``retrain``, rungs 0–2 of the ladder). Two exist:

- :class:`~sklinfluence.model.skorch_adapter.SkorchAdapter` for skorch nets;
- :class:`~sklinfluence.model.linear_adapter.LinearAdapter` for scikit-learn's
  ``LinearRegression``, ``Ridge`` and ``LogisticRegression``.
"""

from __future__ import annotations

from typing import Any

from sklearn.frozen import FrozenEstimator

from .linear_adapter import LinearAdapter, is_linear_model
from .skorch_adapter import SkorchAdapter

__all__ = ["make_adapter"]


def make_adapter(net: Any) -> SkorchAdapter | LinearAdapter:
    """The adapter for ``net`` (possibly wrapped in ``FrozenEstimator``)."""
    from skorch import NeuralNet

    frozen = isinstance(net, FrozenEstimator)
    inner = net.estimator if frozen else net
    if isinstance(inner, NeuralNet):
        return SkorchAdapter(inner, frozen)
    if is_linear_model(inner):
        return LinearAdapter(inner, frozen)
    hint = ""
    if isinstance(inner, type):
        example = f"{inner.__name__}(MyModule, ...)" if issubclass(inner, NeuralNet) \
            else f"{inner.__name__}()"
        hint = f" {inner.__name__} is a class: pass an instance, e.g. {example}."
    elif hasattr(inner, "steps"):  # a Pipeline
        hint = (" To use preprocessing, put the estimator at the end of the pipeline "
                "instead: make_pipeline(StandardScaler(), InfluenceEstimator(net)).")
    raise TypeError(
        "net must be a skorch NeuralNet (NeuralNetRegressor, NeuralNetClassifier, "
        "NeuralNetBinaryClassifier), a scikit-learn LinearRegression, Ridge or "
        f"LogisticRegression, or either wrapped in FrozenEstimator; got "
        f"{type(inner).__name__ if not isinstance(inner, type) else 'a class'}.{hint}"
    )
