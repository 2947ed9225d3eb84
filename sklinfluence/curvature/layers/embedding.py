"""``nn.Embedding``: one-hot inputs, a diagonal input factor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...exceptions import UnsupportedLayerError
from .base import ADVICE, LAYERWISE, Eigenbasis, KroneckerLayer, _f64, register_layer

__all__ = ["EmbeddingLayer", "TokenCapture"]


class TokenCapture(NamedTuple):
    """Embedding indices and output gradients at ``T`` tokens per sample."""

    index: Tensor  # (B, T) long
    keep: Tensor  # (B, T) bool: not padding_idx
    g: Tensor  # (B, K, T, d_out)


@register_layer
@dataclass(eq=False)
class EmbeddingLayer(KroneckerLayer):
    """``nn.Embedding``: one-hot inputs, a diagonal input factor (token counts).

    The matrix layout is the transposed weight, ``(embedding_dim,
    num_embeddings)``; no bias.
    """

    weight: slice | None = None
    padding_idx: int | None = None

    module_types: ClassVar = (nn.Embedding,)
    param_attrs: ClassVar = ("weight",)

    @classmethod
    def build(cls, name, module, slices):
        for option, value, fine in (("max_norm", module.max_norm, None),
                                    ("scale_grad_by_freq", module.scale_grad_by_freq, False),
                                    ("sparse", module.sparse, False)):
            if value != fine:
                raise UnsupportedLayerError(
                    f"layer {name!r} is an Embedding with {option}={value!r}; "
                    f"{LAYERWISE} needs {option}={fine!r} (the plain lookup). {ADVICE}")
        if slices.get("weight") is None:
            return None
        return cls(name, module.embedding_dim, module.num_embeddings, weight=slices["weight"],
                   padding_idx=module.padding_idx)

    def to_matrices(self, V: Tensor) -> Tensor:
        return V[:, self.weight].reshape(-1, self.d_in, self.d_out).transpose(1, 2)

    def put(self, V: Tensor, M: Tensor) -> None:
        V[:, self.weight] = M.transpose(1, 2).reshape(M.shape[0], -1)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.is_floating_point():
            raise UnsupportedLayerError(
                f"layer {self.name!r} (Embedding) receives {x.dtype} inputs of shape "
                f"{tuple(x.shape)}; expected integer indices (N, ...). {ADVICE}")
        return x.detach().clone()

    def capture(self, recorded: Tensor, grads: Tensor) -> TokenCapture:
        K, B = grads.shape[:2]
        index = recorded.reshape(B, -1)
        keep = (index != self.padding_idx) if self.padding_idx is not None \
            else torch.ones_like(index, dtype=torch.bool)
        g = _f64(grads).reshape(K, B, -1, self.d_out).transpose(0, 1)
        return TokenCapture(index, keep, g)

    def _kept(self, cap: TokenCapture, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample numbers, token ids and ``(M, K, d_out)`` gradients of the kept tokens."""
        rows, cols = cap.keep.nonzero(as_tuple=True)
        return rows, cap.index[rows, cols], g[rows, :, cols]

    def factor_sums(self, cap: TokenCapture) -> tuple[Tensor, Tensor, int]:
        _, tokens, g = self._kept(cap, cap.g)
        counts = torch.bincount(tokens, minlength=self.d_in).to(torch.float64)
        g = g.reshape(-1, self.d_out)
        return counts, g.T @ g, int(tokens.shape[0])

    def sample_gradients(self, cap: TokenCapture) -> Tensor:
        onehot = F.one_hot(cap.index, self.d_in).to(torch.float64) * cap.keep[..., None]
        return torch.einsum("bkto,btv->bkov", cap.g, onehot)

    def rotated_squares(self, basis: Eigenbasis, cap: TokenCapture) -> Tensor:
        rows, tokens, g = self._kept(cap, cap.g @ basis.Q_S)
        # (Q_Sᵀ D_ik)[:, v] = Σ_{t: x_it = v} Q_Sᵀ g_itk: sum per distinct (sample, token)
        pairs, which = torch.unique(rows * self.d_in + tokens, return_inverse=True)
        summed = g.new_zeros(pairs.shape[0], *g.shape[1:]).index_add_(0, which, g)
        squares = summed.square().sum(1)  # (pairs, d_out)
        total = g.new_zeros(self.d_in, self.d_out).index_add_(0, pairs % self.d_in, squares)
        return total.T

    def gradient_sums(self, cap: TokenCapture, absolute: bool = False) -> Tensor:
        _, tokens, g = self._kept(cap, cap.g.abs() if absolute else cap.g)
        K = cap.g.shape[1]
        total = g.new_zeros(K, self.d_in, self.d_out)
        return total.index_add_(1, tokens, g.transpose(0, 1)).transpose(1, 2)

    def eigenbasis(self, A: Tensor, S: Tensor, corrected: bool) -> Eigenbasis:
        lam_S, Q_S = torch.linalg.eigh(S)
        # A is diagonal: its eigenbasis is the identity
        eigenvalues = None if corrected else lam_S.clamp_min(0)[:, None] * A.clamp_min(0)[None, :]
        return Eigenbasis(Q_S, None, eigenvalues)

    def rotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        return basis.Q_S.T @ M

    def unrotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        return basis.Q_S @ M

    def weight_decay_diagonal(self, basis: Eigenbasis, mu: Tensor) -> Tensor:
        return (basis.Q_S ** 2).T @ self.to_matrices(mu.unsqueeze(0))[0]
