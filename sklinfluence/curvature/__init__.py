"""The curvature layer: the damped curvature of a trained net and its structured forms.

- :mod:`~sklinfluence.curvature.operator`: :class:`Curvature`, the damped
  Gauss–Newton matrix or Hessian as batched products (and its dense matrix);
- :mod:`~sklinfluence.curvature.layers`: the layer registry, one module per
  layer type, each with its captures and Kronecker-factored pieces;
- :mod:`~sklinfluence.curvature.capture`: the capture passes (each layer's
  inputs and back-propagated output-Hessian roots) that
  :mod:`~sklinfluence.curvature.kfac` (EK-FAC/K-FAC factors),
  :mod:`~sklinfluence.curvature.kernel` (the exact inverse in kernel form, its
  rows in :mod:`~sklinfluence.curvature.kernel_rows`) and
  :mod:`~sklinfluence.curvature.dense_ggn` (the exact Gauss–Newton matrix of
  ``nn.Linear`` nets) are built from; :mod:`~sklinfluence.curvature.lowrank`
  (Lanczos eigenpairs) works on the operator.

Imports from the layers below only: model, utils.
"""

from .operator import Curvature

__all__ = ["Curvature"]
