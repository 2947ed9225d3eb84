"""Normalisation layers (BatchNorm in eval mode, LayerNorm, GroupNorm): their exact block."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...exceptions import UnsupportedLayerError
from .base import ADVICE, LAYERWISE, Eigenbasis, KroneckerLayer, _f64, register_layer

__all__ = ["NormLayer", "NormCapture"]


class NormCapture(NamedTuple):
    """Per-sample gradients of a normalisation layer's scales and shifts."""

    d: Tensor  # (B, K, n_cols)
    bound: Tensor  # (B, K, n_cols): the same sums of absolute values


@register_layer
@dataclass(eq=False)
class NormLayer(KroneckerLayer):
    """Elementwise affine parameters of BatchNorm (eval mode), LayerNorm, GroupNorm.

    Layout ``(1, [γ | β])`` over the trainable ones; ``A`` is the exact block
    and ``S = 1``. ``channel_dim`` is the dimension of the ``C`` channels
    (BatchNorm/GroupNorm: 1), or None when they are the trailing
    ``normalized_shape`` (LayerNorm).
    """

    weight: slice | None = None
    bias: slice | None = None
    channels: int = 0
    channel_dim: int | None = 1

    module_types: ClassVar = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

    @classmethod
    def build(cls, name, module, slices):
        weight, bias = slices.get("weight"), slices.get("bias")
        if weight is None and bias is None:
            return None
        if isinstance(module, nn.LayerNorm):
            channels, channel_dim = math.prod(module.normalized_shape), None
        else:
            channels = module.num_features if hasattr(module, "num_features") \
                else module.num_channels
            channel_dim = 1
        return cls(name, 1, channels * ((weight is not None) + (bias is not None)),
                   weight=weight, bias=bias, channels=channels, channel_dim=channel_dim)

    def _parts(self) -> list[slice]:
        return [s for s in (self.weight, self.bias) if s is not None]

    def to_matrices(self, V: Tensor) -> Tensor:
        return torch.cat([V[:, s] for s in self._parts()], dim=1).unsqueeze(1)

    def put(self, V: Tensor, M: Tensor) -> None:
        for j, s in enumerate(self._parts()):
            V[:, s] = M[:, 0, j * self.channels:(j + 1) * self.channels]

    def _channels_last(self, x: Tensor) -> Tensor:
        """``(B, ...)`` → ``(B, T, C)``."""
        if self.channel_dim is not None:
            x = x.movedim(self.channel_dim, -1)
        return x.reshape(x.shape[0], -1, self.channels)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        x = x.detach()
        if isinstance(module, nn.LayerNorm):
            normalised = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        elif isinstance(module, nn.GroupNorm):
            normalised = F.group_norm(x, module.num_groups, eps=module.eps)
        else:
            if module.training or module.running_mean is None:
                raise UnsupportedLayerError(
                    f"layer {self.name!r} normalises with batch statistics; "
                    f"{LAYERWISE} needs BatchNorm in eval mode with running statistics. "
                    f"{ADVICE}")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            normalised = (x - module.running_mean.reshape(shape)) \
                / torch.sqrt(module.running_var.reshape(shape) + module.eps)
        return self._channels_last(normalised)

    def capture(self, recorded: Tensor, grads: Tensor) -> NormCapture:
        K, B = grads.shape[:2]
        g = self._channels_last(_f64(grads).flatten(0, 1))  # (K·B, T, C)
        g = g.reshape(K, B, *g.shape[1:]).transpose(0, 1)  # (B, K, T, C)
        x = _f64(recorded)
        d, bound = [], []
        if self.weight is not None:
            d.append(torch.einsum("bktc,btc->bkc", g, x))
            bound.append(torch.einsum("bktc,btc->bkc", g.abs(), x.abs()))
        if self.bias is not None:
            d.append(g.sum(2))
            bound.append(g.abs().sum(2))
        return NormCapture(torch.cat(d, dim=-1), torch.cat(bound, dim=-1))

    def factor_sums(self, cap: NormCapture) -> tuple[Tensor, Tensor, int]:
        d = cap.d.reshape(-1, self.d_in)
        B = cap.d.shape[0]
        return d.T @ d, d.new_full((1, 1), float(B)), B

    def sample_gradients(self, cap: NormCapture) -> Tensor:
        return cap.d.unsqueeze(2)

    def rotated_squares(self, basis: Eigenbasis, cap: NormCapture) -> Tensor:
        return ((cap.d.reshape(-1, self.d_in) @ basis.Q_A) ** 2).sum(0, keepdim=True)

    def gradient_sums(self, cap: NormCapture, absolute: bool = False) -> Tensor:
        return (cap.bound if absolute else cap.d).sum(0).unsqueeze(1)
