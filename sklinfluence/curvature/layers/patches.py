"""What ``nn.Linear`` and ``nn.Conv2d`` share: ``s_t = W ā_t`` at ``T`` positions per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...utils.memory import chunk_rows
from .base import Eigenbasis, KroneckerLayer, _f64

__all__ = ["PatchCapture", "ROTATED_SQUARES_WORK_ELEMENTS"]

#: Elements of the per-sample gradient matrices ``rotated_squares`` forms at once
#: (4 MiB in float64: small enough to stay in cache, measured faster than 16 or 64 MiB).
ROTATED_SQUARES_WORK_ELEMENTS = 2 ** 19


class PatchCapture(NamedTuple):
    """Layer inputs and output gradients at ``T`` positions per sample."""

    a: Tensor  # (B, T, n_cols): inputs with a 1 for the bias
    g: Tensor  # (B, K, T, d_out)


@dataclass(eq=False)
class _PatchLayer(KroneckerLayer):
    """``s_t = W ā_t`` at ``T`` positions per sample (Linear, Conv2d): the common maths."""

    weight: slice | None = None
    bias: slice | None = None

    @property
    def n_cols(self) -> int:
        return self.d_in + (self.bias is not None)

    def to_matrices(self, V: Tensor) -> Tensor:
        W = V[:, self.weight].reshape(-1, self.d_out, self.d_in)
        if self.bias is None:
            return W
        return torch.cat([W, V[:, self.bias].unsqueeze(-1)], dim=-1)

    def put(self, V: Tensor, M: Tensor) -> None:
        V[:, self.weight] = M[..., :self.d_in].reshape(M.shape[0], -1)
        if self.bias is not None:
            V[:, self.bias] = M[..., self.d_in]

    def _augment(self, a: Tensor) -> Tensor:
        """``(B, T, d_in)`` → float64 with a column of ones for the bias."""
        a = _f64(a)
        if self.bias is None:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def factor_sums(self, cap: PatchCapture) -> tuple[Tensor, Tensor, int]:
        a = cap.a.reshape(-1, cap.a.shape[-1])
        g = cap.g.reshape(-1, self.d_out)
        return a.T @ a, g.T @ g, a.shape[0]

    def sample_gradients(self, cap: PatchCapture) -> Tensor:
        return torch.einsum("bkto,btc->bkoc", cap.g, cap.a)

    def rotated_squares(self, basis: Eigenbasis, cap: PatchCapture) -> Tensor:
        B, K, T, O = cap.g.shape
        if T == 1:  # D_ik = g_ik ā_iᵀ: the squares factor, (Q_Sᵀg)² (Q_Aᵀā)²ᵀ
            ga = (cap.g.reshape(-1, O) @ basis.Q_S) ** 2  # (B·K, d_out)
            aa = (cap.a.reshape(B, -1) @ basis.Q_A) ** 2  # (B, n_cols)
            return ga.T @ aa.repeat_interleave(K, dim=0)
        a = cap.a @ basis.Q_A  # (B, T, C)
        C = a.shape[-1]
        g = torch.matmul(basis.Q_S.T, cap.g.transpose(-1, -2)).reshape(B, K * O, T)
        total = torch.zeros(O, C, dtype=torch.float64, device=a.device)
        step = max(1, ROTATED_SQUARES_WORK_ELEMENTS // (K * O * C))
        for s in range(0, B, step):  # chunks of samples bound the D_ik held at once
            D = torch.bmm(g[s:s + step], a[s:s + step])  # (b, K·O, C): Q_Sᵀ D_ik Q_A
            total += D.square_().view(-1, O, C).sum(0)
        return total

    def gradient_products(self, cap: PatchCapture, V: Tensor) -> Tensor:
        """``⟨D_i, V_e⟩`` in ``V``'s dtype. At one position ``D_i = g_i āᵢᵀ`` is
        never formed: ``g_iᵀ (V_e ā_i)``, one matrix product over all ``e``. At
        ``T`` positions ``D_i = Gᵢᵀ Aᵢ`` is formed (``T`` times cheaper than
        contracting every position with every ``V_e``) and multiplied by ``V``."""
        k = V.shape[0]
        a, g = cap.a.to(V.dtype), cap.g[:, 0].to(V.dtype)  # (B, T, C), (B, T, O)
        B, T, C = a.shape
        if T == 1:
            Va = a[:, 0] @ V.reshape(k * self.d_out, C).T  # (B, k·O), V not copied
            return torch.bmm(Va.view(B, k, self.d_out), g[:, 0, :, None])[..., 0]
        step = chunk_rows(a.element_size() * self.d_out * C, B)  # D within working memory
        return torch.cat([torch.bmm(g[s:s + step].transpose(1, 2), a[s:s + step]).view(
            -1, self.d_out * C) @ V.reshape(k, -1).T for s in range(0, B, step)])

    def rotated_gradients(self, basis: Eigenbasis, cap: PatchCapture) -> Tensor:
        """``Q_Sᵀ D_i Q_A = Σ_t (Q_Sᵀ g_it)(Q_Aᵀ ā_it)ᵀ``: the two factors rotated,
        then multiplied (at one position, an outer product). In the bases' dtype."""
        g, a = self._rotated_factors(basis, cap)
        if g.shape[1] == 1:
            return g[:, 0, :, None] * a[:, 0, None, :]
        return torch.bmm(g.transpose(1, 2), a)

    def _rotated_factors(self, basis: Eigenbasis, cap: PatchCapture) -> tuple[Tensor, Tensor]:
        """``(G Q_S, A Q_A)``, ``(B, T, d_out)`` and ``(B, T, n_cols)``, in the bases' dtype."""
        dtype = basis.Q_S.dtype
        return cap.g[:, 0].to(dtype) @ basis.Q_S, cap.a.to(dtype) @ basis.Q_A

    def rotated_forms(self, basis: Eigenbasis, cap: PatchCapture, weights: Tensor) -> Tensor:
        """At one position the squares factor: ``Σ_oc g'_o² W_oc a'_c²``, never
        forming the outer products; at ``T`` positions as the default."""
        if cap.a.shape[1] != 1:
            return super().rotated_forms(basis, cap, weights)
        g, a = self._rotated_factors(basis, cap)
        return ((g[:, 0].square() @ weights) * a[:, 0].square()).sum(dim=1)

    def gradient_sums(self, cap: PatchCapture, absolute: bool = False) -> Tensor:
        g, a = (cap.g.abs(), cap.a.abs()) if absolute else (cap.g, cap.a)
        return torch.einsum("bkto,btc->koc", g, a)
