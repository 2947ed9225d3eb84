"""The curvature layer: the damped curvature of a trained net and its structured forms.

- :mod:`~sklinfluence.curvature.operator`: :class:`Curvature`, the damped
  Gauss–Newton matrix or Hessian as batched products (and its dense matrix);
- :mod:`~sklinfluence.curvature.layers`: the layer registry, one module per
  layer type, each with its captures and Kronecker-factored pieces;
- :mod:`~sklinfluence.curvature.kfac` (capture passes, EK-FAC/K-FAC factors,
  the dense Gauss–Newton build of ``nn.Linear`` nets),
  :mod:`~sklinfluence.curvature.kernel` (the exact inverse in kernel form) and
  :mod:`~sklinfluence.curvature.lowrank` (Lanczos eigenpairs), all built on it.

Imports from the layers below only: model, utils.
"""

from .operator import Curvature

__all__ = ["Curvature"]
