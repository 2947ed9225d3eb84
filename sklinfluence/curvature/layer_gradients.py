"""Per-sample loss gradients in the layers' own form, streamed: the training side
of influence matrices, self-influence and top-k at 10⁴–10⁵ rows.

The per-sample gradient of a registered layer (:mod:`sklinfluence.curvature.layers`)
is a matrix ``D_i = Σ_t g_it ā_itᵀ`` of the layer's output gradients ``g``
and inputs ``ā`` at its ``T`` positions (one outer product for a ``Linear``
row). One batched forward and backward pass per chunk of rows gives every
layer's ``(ā, g)`` (the capture passes of :mod:`~sklinfluence.curvature.capture`,
in loss-gradient mode) — far cheaper than differentiating each sample — and
two contractions use them without ever holding a ``(rows, P)`` matrix of
flat gradients for more than one chunk:

- :func:`gradient_products`: ``⟨D_i, V_e⟩`` for a few fixed vectors ``V_e``
  (preconditioned query gradients), per layer in the net's own precision (a
  float32 net's gradients are float32-accurate), the layers' contributions
  added in float64; a ``Linear`` layer's outer products are never formed
  (:meth:`~sklinfluence.curvature.layers.KroneckerLayer.gradient_products`);
- :func:`rotated_forms`: ``Σ (Q_Sᵀ D_i Q_A)² / (Λ + λ)``, the quadratic
  form of a Kronecker-factored inverse, with the factors rotated rather
  than the product (:meth:`~sklinfluence.curvature.layers.KroneckerLayer.rotated_forms`;
  for a ``Linear`` row the squares factor too), in the net's precision and
  added in float64: self-influence directly, without a solve per row.

Chunks hold at most ``working_memory_bytes`` (:func:`sklinfluence.set_config`)
unless a ``batch_size`` is given; the answers do not depend on the chunks
beyond rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..model.functional import FunctionalModel
from .capture import kronecker_passes
from .layers import Eigenbasis, KroneckerLayer

__all__ = ["gradient_captures", "gradient_products", "rotated_forms"]


def gradient_captures(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                      X: Tensor, T: Tensor, batch_size: int | None = None, *,
                      row_bytes: int = 0) -> Iterator[list]:
    """Every layer's loss-gradient capture, per chunk of the rows ``(X, T)``, in order.

    ``row_bytes``: what the caller builds per row from a capture (counted in
    the chunk size when ``batch_size`` is None). The layers were checked
    against autograd when the curvature was fitted on this net; the passes
    here do not check again.
    """
    yield from kronecker_passes(model, theta, layers, X, T, batch_size, check=False,
                                gradients=True, row_bytes=row_bytes)


def gradient_products(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                      X: Tensor, T: Tensor, vectors: list[Tensor],
                      batch_size: int | None = None) -> Tensor:
    """``[i, e] = ∇L_i(θ) · v_e`` for the rows ``(X, T)``, float64, ``(n, k)``.

    Parameters
    ----------
    model, theta, layers
        The net, where to differentiate, and its registered layers (all its
        trainable parameters).
    X, T : Tensor
        The rows and their targets.
    vectors : list of Tensor
        Each layer's part of the ``k`` vectors ``v_e`` in its matrix layout,
        ``(k, d_out, n_cols)``: their dtype is the precision of the products
        (each layer's, then added in float64).
    batch_size : int, optional
        Rows per pass (None: as many as ``working_memory_bytes`` allows).
    """
    k = vectors[0].shape[0] if vectors else 0
    out = torch.zeros((X.shape[0], k), dtype=torch.float64, device=theta.device)
    # per row, the largest layer's temporaries: k·d_out products of a factored row
    # (a Linear layer's at one position), else its gradient matrix (formed within
    # working memory by the layer itself), plus the row's results
    itemsize = vectors[0].element_size() if vectors else 8
    row_bytes = itemsize * max((k * layer.d_out if layer.factorable
                                else layer.d_out * layer.n_cols for layer in layers),
                               default=0) + 8 * k
    start = 0
    for captures in gradient_captures(model, theta, layers, X, T, batch_size,
                                      row_bytes=row_bytes):
        for layer, cap, V in zip(layers, captures, vectors):
            part = layer.gradient_products(cap, V)
            rows = part.shape[0]
            out[start:start + rows] += part.to(torch.float64)
        start += rows
    return out


def rotated_forms(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                  bases: list[Eigenbasis], damping: float, X: Tensor, T: Tensor,
                  owner: Tensor | None = None, n_sets: int | None = None,
                  batch_size: int | None = None) -> Tensor:
    """``g_sᵀ (Q Λ Qᵀ + λI)⁻¹ g_s`` of a Kronecker-factored inverse, float64.

    ``g_s`` is the loss gradient of each row of ``(X, T)`` or, with ``owner``
    (each row's set, ``0 … n_sets − 1``), the summed gradients of each set;
    each layer contributes ``Σ (Q_Sᵀ D Q_A)² / (Λ + λ)`` (its blocks are
    independent).
    """
    dtype = model.dtype  # the rotations in the net's precision, the sums in float64
    weights = [(1.0 / (basis.eigenvalues + damping)).to(dtype) for basis in bases]
    bases = [Eigenbasis(b.Q_S.to(dtype), None if b.Q_A is None else b.Q_A.to(dtype),
                        b.eigenvalues) for b in bases]
    device = theta.device
    if owner is None:
        out = torch.zeros(X.shape[0], dtype=torch.float64, device=device)
        sums = None
    else:
        sums = [torch.zeros((n_sets, layer.d_out, layer.n_cols), dtype=torch.float64,
                            device=device) for layer in layers]
    # per row, the largest layer's rotated matrix (two rotated factors for a
    # factored row, the outer products never formed), in the net's precision
    itemsize = torch.finfo(dtype).bits // 8
    row_bytes = 2 * itemsize * max(
        (layer.d_out + layer.n_cols if layer.factorable and sums is None
         else layer.d_out * layer.n_cols for layer in layers), default=0)
    start = 0
    for captures in gradient_captures(model, theta, layers, X, T, batch_size,
                                      row_bytes=row_bytes):
        for j, (layer, basis, cap, w) in enumerate(zip(layers, bases, captures, weights)):
            if sums is None:
                part = layer.rotated_forms(basis, cap, w)
                rows = part.shape[0]
                out[start:start + rows] += part.to(torch.float64)
            else:
                R = layer.rotated_gradients(basis, cap)
                rows = R.shape[0]
                sums[j].index_add_(0, owner[start:start + rows], R.to(torch.float64))
        start += rows
    if sums is None:
        return out
    return sum((S.square() * w.to(torch.float64)).sum(dim=(1, 2))
               for S, w in zip(sums, weights))
