"""The estimators inside a fitted :class:`~sklearn.pipeline.Pipeline`.

A ``Pipeline`` forwards ``fit``, ``score_samples``, ``transform`` and ``score``
to its last step, but not the methods only this library has (``loss_change``,
``param_change``), and its ``score`` drops keyword arguments such as
``reference=`` unless scikit-learn's metadata routing is on. So that no
choice is ever lost on the way:

- :class:`PipelineView` gives the final estimator's methods with every input
  (``X``, ``X_eval``) passed through the pipeline's earlier steps first — the
  documented way to an influence matrix through a pipeline;
- the scorers (:func:`~sklinfluence.agreement_scorer`,
  :func:`~sklinfluence.lds_scorer`) unwrap a pipeline the same way, so a grid
  search over a pipeline scores exactly as over the bare estimator on
  transformed data, with routing on or off;
- with routing off, an estimator's ``score`` called by ``Pipeline.score`` with
  keyword arguments that the pipeline dropped raises instead of silently using
  its defaults (:func:`refuse_dropped_arguments`); with routing on, ``reference``
  and ``metric`` are requested by default, so the pipeline passes them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import get_config
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

__all__ = ["PipelineView", "final_estimator", "refuse_dropped_arguments"]


def final_estimator(estimator: Any) -> tuple[Any, list]:
    """``(final, steps)``: the last step of a (nested) pipeline and the transformers
    before it, in order; a bare estimator is its own final step."""
    steps: list = []
    while isinstance(estimator, Pipeline):
        check_is_fitted(estimator)
        steps.extend(step for _, step in estimator.steps[:-1] if step not in (None, "passthrough"))
        estimator = estimator.steps[-1][1]
    return estimator, steps


def _through(steps: list, X: Any) -> Any:
    for step in steps:
        X = step.transform(X)
    return X


class PipelineView:
    """A fitted pipeline's final sklinfluence estimator, fed through its earlier steps.

    Every input of the final estimator's methods (``X`` and ``X_eval``) is
    transformed by the pipeline's preceding steps first, exactly as
    ``Pipeline.score_samples`` does for ``X`` — so ``loss_change`` and
    ``param_change``, which a ``Pipeline`` does not forward, give what the
    bare estimator gives on transformed data.

    Parameters
    ----------
    pipeline : Pipeline or estimator
        A fitted pipeline (nested pipelines are unwrapped) whose last step is an
        :class:`~sklinfluence.InfluenceEstimator`,
        :class:`~sklinfluence.PBRFEstimator`, :class:`~sklinfluence.LOOEstimator`
        or :class:`~sklinfluence.Decomposer`; a bare estimator is used as it is.

    Attributes
    ----------
    estimator : estimator
        The final step.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklinfluence import InfluenceEstimator, PipelineView
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(30, 3)) * 10, rng.normal(size=30)
    >>> net = NeuralNetRegressor(torch.nn.Linear(3, 1).double(), max_epochs=3, lr=0.05,
    ...                          verbose=0)
    >>> pipe = make_pipeline(StandardScaler(), InfluenceEstimator(net, random_state=0))
    >>> pipe = pipe.fit(X, y)
    >>> PipelineView(pipe).loss_change(X, y, X[:2], y[:2]).shape
    (30, 2)
    """

    def __init__(self, pipeline: Any) -> None:
        self.estimator, self._steps = final_estimator(pipeline)
        check_is_fitted(self.estimator)

    def transform_inputs(self, X: Any) -> Any:
        """``X`` through the pipeline's steps before the final estimator."""
        return _through(self._steps, X)

    def score_samples(self, X: Any, y: Any = None, **kwargs: Any) -> np.ndarray:
        """The final estimator's ``score_samples`` on transformed ``X``."""
        return self.estimator.score_samples(self.transform_inputs(X), y, **kwargs)

    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None, y_eval: Any = None,
                    **kwargs: Any) -> np.ndarray:
        """The final estimator's ``loss_change``, ``X`` and ``X_eval`` transformed."""
        X_eval = None if X_eval is None else self.transform_inputs(X_eval)
        return self.estimator.loss_change(self.transform_inputs(X), y, X_eval, y_eval, **kwargs)

    def most_influential(self, X_eval: Any, y_eval: Any = None, *, X: Any = None,
                         **kwargs: Any) -> Any:
        """The final :class:`~sklinfluence.InfluenceEstimator`'s ``most_influential``,
        ``X_eval`` and ``X`` (when given) transformed."""
        X = None if X is None else self.transform_inputs(X)
        return self.estimator.most_influential(self.transform_inputs(X_eval), y_eval, X=X,
                                               **kwargs)

    def most_self_influential(self, n_top: int = 10, X: Any = None, y: Any = None,
                              **kwargs: Any) -> Any:
        """The final :class:`~sklinfluence.InfluenceEstimator`'s
        ``most_self_influential``, ``X`` (when given) transformed."""
        X = None if X is None else self.transform_inputs(X)
        return self.estimator.most_self_influential(n_top, X, y, **kwargs)

    def param_change(self, X: Any, y: Any = None, **kwargs: Any) -> np.ndarray:
        """The final estimator's ``param_change`` on transformed ``X``."""
        return self.estimator.param_change(self.transform_inputs(X), y, **kwargs)

    def score(self, X: Any, y: Any = None, **kwargs: Any) -> float:
        """The final estimator's ``score`` on transformed ``X``, keyword arguments
        (``reference``, ``metric``) passed on whatever the routing setting."""
        return self.estimator.score(self.transform_inputs(X), y, **kwargs)

    def transform(self, X: Any, y: Any = None, **kwargs: Any) -> Any:
        """The final step's ``transform`` (a :class:`~sklinfluence.Decomposer`)
        on transformed ``X``, with its targets and keyword arguments."""
        return self.estimator.transform(self.transform_inputs(X), y, **kwargs)


_PIPELINE_FILE = Path(sys.modules[Pipeline.__module__].__file__).resolve()


def refuse_dropped_arguments(depth: int = 2) -> None:
    """Raise if ``Pipeline.score`` just dropped keyword arguments meant for us.

    With metadata routing off, ``Pipeline.score(X, y, reference="pbrf")``
    calls the final step's ``score(Xt, y)`` without them; the estimator would
    then score against its default reference. Looks at the calling frames
    (``depth`` up, within a few frames) for ``Pipeline.score`` and its
    ``params``.
    """
    if get_config().get("enable_metadata_routing", False):
        return
    frame = sys._getframe(depth)
    for _ in range(4):
        if frame is None:
            return
        code = frame.f_code
        if code.co_name == "score" and Path(code.co_filename).resolve() == _PIPELINE_FILE:
            dropped = frame.f_locals.get("params") or {}
            if dropped:
                raise TypeError(
                    f"Pipeline.score dropped the keyword arguments {sorted(dropped)}: "
                    "scikit-learn forwards them only with metadata routing on "
                    "(sklearn.set_config(enable_metadata_routing=True)). Without it, use "
                    "sklinfluence.PipelineView(pipe).score(X, y, ...) or, in a search, "
                    "scoring=sklinfluence.agreement_scorer(reference=..., metric=...).")
            return
        frame = frame.f_back
