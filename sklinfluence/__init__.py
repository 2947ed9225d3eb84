"""sklinfluence: influence functions, the PBRF and leave-one-out for skorch nets.

Implements Bae et al. (NeurIPS 2022), "If Influence Functions are the Answer,
Then What is the Question?", as scikit-learn estimators:

- :class:`InfluenceEstimator` — the influence-function estimate (rungs 4/5);
- :class:`PBRFEstimator` — the proximal Bregman response function (rung 3);
- :class:`LOOEstimator` — leave-one-out retraining, cold, warm or proximal
  (rungs 0–2);
- :class:`Decomposer` — the five terms between them;
- :class:`RemovalSplit` and :func:`agreement_scorer` — grid search of the
  damping against a ground-truth reference;
- :class:`LinearDatamodelingScore` and :func:`lds_scorer` — the linear
  datamodeling score of any attribution matrix against models retrained on
  random subsets (or their PBRF);
- :class:`PipelineView` — the final estimator of a fitted ``Pipeline`` with
  its inputs transformed (``loss_change``, ``param_change`` through a pipeline);
- :class:`TracInCP` and :func:`training_loss` — baselines in the same sign
  convention (grad-dot is ``InfluenceEstimator(solver="identity")``);
- :func:`decomposition_curve` and :func:`detection_curve`, with
  :class:`TermsCurveDisplay`, :class:`AgreementCurveDisplay` and
  :class:`DetectionCurveDisplay` — the paper's study as validation curves and
  plots; :mod:`sklinfluence.zoo`, the architectures it runs on;
- :func:`set_config`, :func:`get_config`, :func:`config_context` — threads
  and the in-process response cache.
"""

from ._config import config_context, get_config, set_config
from .agreement import RemovalSplit, agreement_scorer
from .baselines import TracInCP, training_loss
from .datamodeling import LinearDatamodelingScore, lds_scorer
from .decomposer import Decomposer
from .ground_truth import LOOEstimator, PBRFEstimator
from .influence import InfluenceEstimator
from .pipeline import PipelineView
from .study import decomposition_curve, detection_curve  # noqa: I001 (after decomposer)
from .display import AgreementCurveDisplay, DetectionCurveDisplay, TermsCurveDisplay

__all__ = ["Decomposer", "InfluenceEstimator", "LOOEstimator", "PBRFEstimator",
           "LinearDatamodelingScore", "lds_scorer", "TracInCP", "training_loss",
           "PipelineView", "RemovalSplit", "agreement_scorer", "config_context", "get_config",
           "set_config", "decomposition_curve", "detection_curve", "TermsCurveDisplay",
           "AgreementCurveDisplay", "DetectionCurveDisplay"]
__version__ = "0.1.0"
