"""Display objects for the studies of :mod:`sklinfluence.study`.

Built as scikit-learn's displays are
(:class:`~sklearn.model_selection.ValidationCurveDisplay`,
:class:`~sklearn.metrics.RocCurveDisplay`): ``__init__`` stores the data,
:meth:`plot` draws it on an ``ax`` (a new figure by default) and returns the
display with the matplotlib artists as attributes (``lines_``, ``ax_``,
``figure_``, ...), and class methods build and plot in one call from the
results of a study (``from_results``), from an estimator
(``from_estimator``/``from_estimators``) or from scores (``from_scores``).

- :class:`TermsCurveDisplay`: the five terms of the influence–LOO gap
  against a parameter, on a symmetric-log axis where a term that is exactly
  zero stays visible;
- :class:`AgreementCurveDisplay`: the correlation of the influence
  estimate with the PBRF, warm-start retraining and leave-one-out against
  a parameter;
- :class:`DetectionCurveDisplay`: mislabel detection curves of several
  self-scores at once.

One module per display (``terms``, ``agreement``, ``detection``); what they
share — choices, labels, the x axis, the curve ``from_estimator`` computes
— is in ``_common``.
"""

from .agreement import AgreementCurveDisplay
from .detection import DetectionCurveDisplay
from .terms import TermsCurveDisplay

__all__ = ["TermsCurveDisplay", "AgreementCurveDisplay", "DetectionCurveDisplay"]
