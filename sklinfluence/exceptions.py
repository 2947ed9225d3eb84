"""The errors sklinfluence raises of its own, and the warnings it uses.

Every error here subclasses the built-in exception a caller would otherwise
catch (``ValueError``, ``MemoryError``), so ``except ValueError`` still works.

Warnings are scikit-learn's: :class:`~sklearn.exceptions.ConvergenceWarning`
when a solve, a retraining or a minimisation stops short of its tolerance
(re-exported here), :class:`UserWarning` for advice (an option without effect,
a slow path taken), each attributed to the caller's line.
"""

from __future__ import annotations

from sklearn.exceptions import ConvergenceWarning

__all__ = ["ConvergenceWarning", "LissaDivergenceError", "NotEnoughMemoryError",
           "NotLinearError", "UnsupportedLayerError"]


class NotEnoughMemoryError(MemoryError):
    """A dense matrix would not fit in the memory limit; raised before allocating."""


class UnsupportedLayerError(ValueError):
    """The network has trainable parameters outside the layer types with a
    Kronecker-factored curvature
    (:data:`~sklinfluence.curvature.layers.LAYER_TYPES`), or uses one in a way
    the factorisation cannot describe."""


#: The former name of :class:`UnsupportedLayerError`, kept for code that catches it.
NotLinearError = UnsupportedLayerError


class LissaDivergenceError(ValueError):
    """LiSSA's series diverged: the scale is below half the top eigenvalue."""
