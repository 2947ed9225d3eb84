"""Curvature of the training objective: Gauss–Newton and Hessian products.

:class:`Curvature` is the damped curvature ``C + λI`` of
``J(θ) = (1/N) Σ_i L_i(θ) + (μ/2)‖θ‖²`` at ``θ`` over a data set, where ``C``
is either

- the Gauss–Newton matrix ``G = (1/N) Σ_i J_iᵀ H_i J_i + diag(μ)`` (always
  PSD), or
- the Hessian ``∇²J(θ)`` (may be indefinite away from a minimum).

Products with many vectors at once (``matmat``) are vectorised with
:func:`torch.func.vmap` over the vectors and streamed over the data in chunks
of ``batch_size`` samples, so memory stays bounded. ``dense`` builds the full
``P × P`` matrix in float64 (for the exact solver and for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from ..model.functional import FunctionalModel, iterate_batches
from ..exceptions import UnsupportedLayerError
from .dense_ggn import linear_ggn
from ..utils.memory import check_dense

__all__ = ["Curvature", "CURVATURES"]

CURVATURES = ("ggn", "hessian")
#: Without a ``batch_size``, products with ``k`` vectors stream the data in chunks
#: of ``PRODUCT_CHUNK // k`` samples: the activations of ``k`` vectors over a chunk
#: stay cache- and memory-friendly (on the digits MLP, 300 vectors: 1.1 s in
#: chunks of ~100 samples against 1.8 s for all 1,200 at once, a fifth of the memory).
PRODUCT_CHUNK = 2 ** 15
#: Blocks per side of the symmetric dense Gauss–Newton build.
DENSE_BLOCKS = 4


class Curvature:
    """Damped curvature operator ``C + λI`` of the training objective.

    Parameters
    ----------
    model : FunctionalModel
        The network, loss and weight decay.
    X, T : Tensor
        Training inputs and targets (the objective's data set), in the model's
        dtype/device.
    kind : {"ggn", "hessian"}, default="ggn"
        Which curvature ``C`` to use.
    damping : float, default=0.0
        ``λ`` added to the diagonal.
    theta : Tensor, optional
        Point of linearisation; defaults to the trained ``θˢ``.
    batch_size : int, optional
        Number of training samples processed at once (``None``: chunks of
        ``PRODUCT_CHUNK // k`` samples for a product with ``k`` vectors).
    """

    def __init__(
        self,
        model: FunctionalModel,
        X: Tensor,
        T: Tensor,
        *,
        kind: str = "ggn",
        damping: float = 0.0,
        theta: Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        if kind not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {kind!r}")
        self.model = model
        self.X, self.T = X, T
        self.kind = kind
        self.damping = float(damping)
        self.theta = model.params if theta is None else theta
        self.batch_size = batch_size
        self.n_samples = int(X.shape[0])

    @property
    def n_params(self) -> int:
        return self.model.n_params

    def astype(self, dtype: torch.dtype) -> "Curvature":
        """The same operator computed in ``dtype`` (inputs and results in ``dtype``)."""
        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        return Curvature(self.model.astype(dtype), cast(self.X), cast(self.T), kind=self.kind,
                         damping=self.damping, theta=cast(self.theta),
                         batch_size=self.batch_size)

    def _diagonal(self) -> Tensor:
        return self.model.damped_diagonal(self.damping)

    # ------------------------------------------------------------- products
    def matmat(self, V: Tensor) -> Tensor:
        """``(C + λI) vᵀ`` for each row ``v`` of ``V`` (shape ``(k, P)``), computed in
        the operator's precision and returned in ``V``'s (a float32 net's operator
        takes the float64 vectors of its PBRF's chord solves)."""
        if V.shape[0] == 0:
            return V.clone()
        dtype, V = V.dtype, V.to(self.theta.dtype)
        product = self._ggn_batch if self.kind == "ggn" else self._hessian_batch
        total = torch.zeros_like(V)
        step = self.batch_size or max(1, PRODUCT_CHUNK // V.shape[0])
        for xb, tb in iterate_batches(self.X, self.T, step):
            total += product(V, xb, tb)
        return (total / self.n_samples + self._diagonal() * V).to(dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``(C + λI) v`` for one vector ``v`` of shape ``(P,)``."""
        return self.matmat(v.unsqueeze(0))[0]

    def _ggn_batch(self, V: Tensor, xb: Tensor, tb: Tensor) -> Tensor:
        model, theta = self.model, self.theta

        def f(th: Tensor) -> Tensor:
            return model.forward(th, xb)

        out, pullback = vjp(f, theta)
        H = model.loss.output_hessian(out.detach(), tb)

        def one(v: Tensor) -> Tensor:
            _, Jv = jvp(f, (theta,), (v,))
            return pullback(torch.einsum("bkl,bl->bk", H, Jv))[0]

        return vmap(one)(V)

    def _hessian_batch(self, V: Tensor, xb: Tensor, tb: Tensor) -> Tensor:
        model = self.model

        def batch_loss_grad(th: Tensor) -> Tensor:
            return grad(lambda p: model.losses(p, xb, tb).sum())(th)

        _, pullback = vjp(batch_loss_grad, self.theta)
        return vmap(lambda v: pullback(v)[0])(V)

    # --------------------------------------------------------------- dense
    def dense(self, chunk_size: int = 256) -> Tensor:
        """The full damped matrix ``C + λI`` in float64, shape ``(P, P)``.

        The GGN of a net with ``K > 1`` outputs whose trainable parameters all
        sit in ``nn.Linear`` layers is built from its per-layer Kronecker
        structure (:func:`~sklinfluence.curvature.dense_ggn.linear_ggn`, ``K`` times fewer
        operations). Any other net's is accumulated from per-sample output
        Jacobians as ``Σ_i (L_iᵀJ_i)ᵀ(L_iᵀJ_i)`` with ``L_i L_iᵀ = H_i``,
        computing only the blocks on and below the diagonal (``DENSE_BLOCKS``
        per side: 10 of 16 block products). Both give the same matrix to
        rounding. The Hessian comes from Hessian-vector products with the
        identity's rows, ``chunk_size`` at a time.

        Raises
        ------
        NotEnoughMemoryError
            Before allocating, when the matrix and its factor (``16 P²``
            bytes) exceed :func:`~sklinfluence.utils.memory.memory_limit`.
        """
        P = self.n_params
        check_dense(P)
        if self.kind == "hessian":
            eye = torch.eye(P, dtype=self.model.dtype, device=self.model.device)
            rows = [self.matmat(eye[i:i + chunk_size]) for i in range(0, P, chunk_size)]
            dense = torch.cat(rows).to(torch.float64)
            return 0.5 * (dense + dense.T)
        dense = None
        n_outputs = self.model.forward(self.theta, self.X[:1]).shape[1]
        if n_outputs > 1:  # nets of Linear layers: K times fewer operations (sklinfluence.curvature.kfac)
            try:
                dense = linear_ggn(self.model, self.theta, self.X, self.T,
                                   batch_size=self.batch_size, chunk_size=chunk_size)
            except UnsupportedLayerError:
                pass
        if dense is None:
            dense = self._jacobian_ggn(chunk_size)
        dense /= self.n_samples
        dense.diagonal().add_(self._diagonal().to(torch.float64))
        return dense

    def _jacobian_ggn(self, chunk_size: int) -> Tensor:
        """``Σ_i (L_iᵀJ_i)ᵀ(L_iᵀJ_i)`` from per-sample output Jacobians, float64."""
        P = self.n_params
        model, theta = self.model, self.theta
        dense = torch.zeros(P, P, dtype=torch.float64, device=model.device)
        edges = [round(i * P / DENSE_BLOCKS) for i in range(DENSE_BLOCKS + 1)]
        blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]

        def single_output(th: Tensor, x: Tensor) -> Tensor:
            return model.forward(th, x.unsqueeze(0))[0]

        jac = vmap(jacrev(single_output), in_dims=(None, 0))
        for xb, tb in iterate_batches(self.X, self.T, self.batch_size or chunk_size):
            J = jac(theta, xb)  # (B, K, P)
            root = model.loss.output_hessian_root(model.forward(theta, xb).detach(), tb)
            U = torch.einsum("bkl,bkp->blp", root, J).reshape(-1, P).to(torch.float64)
            for i, rows in enumerate(blocks):  # UᵀU = Σ JᵀHJ, lower blocks only
                for cols in blocks[:i + 1]:
                    dense[rows, cols].addmm_(U[:, rows].T, U[:, cols])
        for i, rows in enumerate(blocks):  # mirror the lower blocks, one block at a time
            for cols in blocks[:i]:
                dense[cols, rows] = dense[rows, cols].T
            block = dense[rows, rows]
            block.copy_(block.tril() + block.tril(-1).T)
        return dense
