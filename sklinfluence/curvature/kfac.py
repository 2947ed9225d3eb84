"""Kronecker-factored curvature: K-FAC and EK-FAC, layer by layer.

A layer's Gauss–Newton block is built from its per-sample gradient matrices
``D_ik`` (layout ``(d_out, d_in)``, e.g. ``[W | b]``):

    ``G_l = (1/N) Σ_i Σ_k vec(D_ik) vec(D_ik)ᵀ``,

where ``k`` runs over the ``K`` columns of a square root ``L_i L_iᵀ = H_i``
of the output Hessian, back-propagated to the layer's output — the
Gauss–Newton matrix *exactly*, not a Monte-Carlo sample of it as the
"empirical/true Fisher" variants used by other libraries. For a linear layer
``s = W a + b`` it is ``D_ik = g_ik ā_iᵀ`` with ``ā_i = (a_i, 1)`` and
``g_ik = (∂f/∂s)ᵀ L_i[:, k]``.

- **K-FAC** (Martens & Grosse, 2015; KFC for convolutions, Grosse & Martens,
  2016) approximates ``G_l ≈ S_l ⊗ A_l`` with ``A_l = (1/N) Σ ā āᵀ`` and
  ``S_l`` the mean of ``Σ_k g gᵀ``; with the eigenbases
  ``S = Q_S Λ_S Q_Sᵀ``, ``A = Q_A Λ_A Q_Aᵀ`` its eigenvalues are
  ``Λ_S ⊗ Λ_A``.
- **EK-FAC** (George et al., 2018) keeps the Kronecker eigenbasis and replaces
  the eigenvalues by the exact diagonal of ``G_l`` in that basis,
  ``Λ = (1/N) Σ_ik (Q_Sᵀ D_ik Q_A)²`` (elementwise) — the best diagonal
  approximation in that basis.

Which layers, and how (:mod:`sklinfluence.curvature.layers`, one class per type; memory
in numbers, 8 bytes each):

- ``nn.Linear`` (inputs ``(N, ..., d_in)``, the middle dimensions are
  positions): ``ā`` the input row. ``d_out² + (d_in+1)² + d_out (d_in+1)``.
- ``nn.Conv2d`` with ``groups=1`` (KFC): ``ā`` the unfolded patch at each of
  the ``T`` output pixels, ``A`` summed and ``S`` averaged over them.
  ``C_out² + (C_in kh kw + 1)² + C_out (C_in kh kw + 1)``.
- ``nn.Embedding``: ``A`` diagonal (token counts), ``Q_A = I`` never stored.
  ``dim² + dim · num_embeddings``.
- ``BatchNorm1d/2d/3d`` (eval mode), ``LayerNorm``, ``GroupNorm`` (affine):
  the exact ``2C × 2C`` block of the ``C`` scales and shifts (K-FAC = EK-FAC
  = exact block). ``(2C)² + 2C + 1``.
- ``nn.MultiheadAttention`` (``kdim = vdim = embed_dim``; also inside
  ``nn.TransformerEncoderLayer``): the query, key and value projections
  (the ``E``-row blocks of ``in_proj_weight``/``in_proj_bias``) and
  ``out_proj`` as Linear layers with positions (their own sequence's
  tokens), each with its own factors; run decomposed during the capture
  passes, since the module never calls them as modules.
  ``4 (E² + (E+1)² + E (E+1))``.

Anything else with trainable parameters (``nn.Conv1d``, an ``nn.Parameter``
used directly, a subclass with its own ``forward``, a grouped convolution,
attention's trainable ``bias_k``/``bias_v`` or separate ``kdim``/``vdim``
projection weights) raises :class:`UnsupportedLayerError` (a ``ValueError``)
naming the layer: use ``solver="cg"`` or ``"arnoldi"`` for those.

Layers are treated independently (block-diagonal), the weight decay ``μ`` is
the diagonal of ``diag(μ)`` in the same basis (exact when ``μ`` is the same for
a layer's parameters) and the damping ``λ`` is added to every eigenvalue.

When the factorisation is exact (EK-FAC and K-FAC equal the exact damped
inverse): one Linear layer with one output and the squared loss (``g_ik`` a
constant); more generally a single Linear, Conv2d or Embedding layer (an
attention's ``out_proj`` included) whose (flattened) output *is* the network
output under the squared loss, for any number of positions ``T`` — then
``g_itk = c e_(t,o)``, ``G = c² I ⊗ A`` and ``S = c² I``, which pins the
``1/T`` in ``S`` (and, for Embedding, averaging ``S`` over the non-padding
tokens). Normalisation layers are always exact within their block.

The factors come from the layers' capture passes
(:mod:`sklinfluence.curvature.capture`), which the kernel form shares; each
layer's fitted eigenbasis and eigenvalues live here, in an
:class:`~sklinfluence.curvature.layers.Eigenbasis` per layer.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..model.functional import FunctionalModel
from ..utils.memory import chunk_rows
from .capture import kronecker_passes
from .layer_gradients import gradient_captures
from .layers import Eigenbasis, KroneckerLayer, kronecker_layers

__all__ = ["KroneckerFactors"]


class KroneckerFactors:
    """K-FAC / EK-FAC approximation of the damped Gauss–Newton matrix.

    Parameters
    ----------
    model : FunctionalModel
        The network; every trainable parameter must belong to a registered
        layer type (:mod:`sklinfluence.curvature.layers`).
    X, T : Tensor
        Training inputs and targets.
    damping : float
        ``λ`` added to every eigenvalue.
    corrected : bool, default=True
        EK-FAC eigenvalues (``True``) or plain K-FAC ones (``False``).
    theta : Tensor, optional
        Where to linearise (default: the model's parameters).
    batch_size : int, optional
        Samples per forward/backward pass while accumulating (``None``: all).

    Attributes
    ----------
    layers : list of KroneckerLayer
        The layers, in module order.
    bases : list of Eigenbasis
        Each layer's eigenbases and (undamped) eigenvalues.
    info : dict
        ``fit_seconds`` and the smallest/largest approximate eigenvalues.
    """

    def __init__(self, model: FunctionalModel, X: Tensor, T: Tensor, *, damping: float,
                 corrected: bool = True, theta: Tensor | None = None,
                 batch_size: int | None = None) -> None:
        self.model = model
        self.theta = model.params if theta is None else theta
        self.damping = float(damping)
        self.corrected = bool(corrected)
        start = time.perf_counter()
        self.layers = kronecker_layers(model)
        self._fit(X, T, batch_size)
        low = min(float(b.eigenvalues.min()) for b in self.bases) + self.damping
        high = max(float(b.eigenvalues.max()) for b in self.bases) + self.damping
        self.info = {"fit_seconds": time.perf_counter() - start,
                     "approx_bottom_eigenvalue": low, "approx_top_eigenvalue": high}

    @property
    def memory_bytes(self) -> int:
        """Bytes held: the eigenbases and the eigenvalues of every layer."""
        return 8 * sum(b.memory_elements for b in self.bases)

    # ------------------------------------------------------------------ fit
    def _fit(self, X: Tensor, T: Tensor, batch_size: int | None) -> None:
        n = X.shape[0]
        L = len(self.layers)
        A: list[Tensor | None] = [None] * L
        S: list[Tensor | None] = [None] * L
        counts = [0] * L
        for captures in kronecker_passes(self.model, self.theta, self.layers, X, T, batch_size):
            for j, (block, cap) in enumerate(zip(self.layers, captures)):
                a_sum, s_sum, count = block.factor_sums(cap)
                A[j] = a_sum if A[j] is None else A[j] + a_sum
                S[j] = s_sum if S[j] is None else S[j] + s_sum
                counts[j] += count
        self.bases = [block.eigenbasis(A_l / n, S_l / max(count, 1), self.corrected)
                      for block, A_l, S_l, count in zip(self.layers, A, S, counts)]
        if self.corrected:
            sums = [torch.zeros(b.d_out, b.n_cols, dtype=torch.float64, device=self.theta.device)
                    for b in self.layers]
            for captures in kronecker_passes(self.model, self.theta, self.layers, X, T,
                                             batch_size, check=False):  # the first checked
                for j, (block, basis, cap) in enumerate(zip(self.layers, self.bases, captures)):
                    sums[j] += block.rotated_squares(basis, cap)
            for basis, total in zip(self.bases, sums):
                basis.eigenvalues = total / n
        mu = self.model.weight_decay.to(torch.float64)
        for block, basis in zip(self.layers, self.bases):  # diag(μ) in the eigenbasis
            basis.eigenvalues = basis.eigenvalues + block.weight_decay_diagonal(basis, mu)

    # ------------------------------------------------------------- inverse
    def solve(self, B: Tensor) -> Tensor:
        """Approximate ``(G + μ + λI)⁻¹ bᵀ`` for each row ``b`` of ``B``, in float64."""
        X = torch.empty(B.shape, dtype=torch.float64, device=B.device)
        for start, stop, parts in self.solve_layers(B):
            for block, part in zip(self.layers, parts):
                block.put(X[start:stop], part)
        return X

    def solve_layers(self, B: Tensor, dtype: torch.dtype = torch.float64):
        """:meth:`solve` by chunks of rows, each layer's part in its matrix layout:
        yields ``(start, stop, [(rows, d_out, n_cols) per layer])`` in ``dtype``.

        Rows at a time within a quarter of ``working_memory_bytes`` (the caller
        holds ``B`` and the solutions besides): a layer's rotation holds a few
        ``(rows, d_out, n_cols)`` temporaries in float64."""
        step = chunk_rows(4 * 8 * (B.shape[1] + 4 * self._widest), B.shape[0])
        for start in range(0, B.shape[0], step):
            part = B[start:start + step].to(torch.float64)
            parts = [self._solved(block, basis, block.rotate(basis, block.to_matrices(part)),
                                  dtype) for block, basis in zip(self.layers, self.bases)]
            yield start, start + part.shape[0], parts

    def solve_rows(self, X: Tensor, T: Tensor, dtype: torch.dtype = torch.float64,
                   batch_size: int | None = None):
        """:meth:`solve_layers` for the loss gradients of the rows ``(X, T)``, read
        off the layers' captures (:func:`~.layer_gradients.gradient_captures`: one
        batched pass per chunk, each layer's gradient rotated in its factored
        form, :meth:`~.layers.KroneckerLayer.rotated_gradients`) — no flat
        gradient of a row is ever formed. Chunks of rows within
        ``working_memory_bytes`` (``batch_size``: rows per pass)."""
        start = 0
        for captures in gradient_captures(self.model, self.theta, self.layers, X, T,
                                          batch_size, row_bytes=4 * 8 * self._widest):
            parts = [self._solved(block, basis, block.rotated_gradients(basis, cap), dtype)
                     for block, basis, cap in zip(self.layers, self.bases, captures)]
            stop = start + parts[0].shape[0]
            yield start, stop, parts
            start = stop

    @property
    def _widest(self) -> int:
        """Numbers of the largest layer block (a few float64 copies a row while solving)."""
        return max(layer.d_out * layer.n_cols for layer in self.layers)

    def _solved(self, block: KroneckerLayer, basis: Eigenbasis, rotated: Tensor,
                dtype: torch.dtype) -> Tensor:
        """``Q_S [R / (Λ + λ)] Q_Aᵀ`` for rotated matrices ``R`` (float64), in ``dtype``."""
        rotated = rotated.to(torch.float64)
        rotated /= basis.eigenvalues + self.damping
        return block.unrotate(basis, rotated).to(dtype)
