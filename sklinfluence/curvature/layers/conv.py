"""``nn.Conv2d``: KFC (Grosse & Martens 2016), the patches as positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ...exceptions import UnsupportedLayerError
from .base import ADVICE, LAYERWISE, _f64, _weight_and_bias, register_layer
from .patches import PatchCapture, _PatchLayer

__all__ = ["Conv2dLayer"]


def _conv_padding(module: nn.Conv2d) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) the convolution applies."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0, 0, 0]
        amounts = []  # 'same': the extra one of an even total on the right/bottom
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts
    ph, pw = module.padding
    return [pw, pw, ph, ph]


@register_layer
@dataclass(eq=False)
class Conv2dLayer(_PatchLayer):
    """``nn.Conv2d`` with ``groups=1`` (KFC): unfolded patches at ``T`` output pixels.

    Layout ``[W.reshape(C_out, C_in·kh·kw) | b]``.
    """

    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, ...] = (0, 0, 0, 0)
    padding_mode: str = "zeros"

    module_types: ClassVar = (nn.Conv2d,)

    @classmethod
    def build(cls, name, module, slices):
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"layer {name!r} is a Conv2d with groups={module.groups}; {LAYERWISE} "
                "handles convolutions with groups=1 only (a grouped convolution's "
                f"block is not one Kronecker product). {ADVICE}")
        weight, bias = _weight_and_bias(name, module, slices)
        if weight is None:
            return None
        return cls(name, module.out_channels, module.weight[0].numel(), weight=weight,
                   bias=bias, kernel_size=tuple(module.kernel_size),
                   stride=tuple(module.stride), dilation=tuple(module.dilation),
                   padding=tuple(_conv_padding(module)), padding_mode=module.padding_mode)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise UnsupportedLayerError(
                f"layer {self.name!r} (Conv2d) receives inputs of shape {tuple(x.shape)}; "
                f"{LAYERWISE} needs batched (N, C, H, W) inputs, one sample per "
                f"row. {ADVICE}")
        x = x.detach()
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, list(self.padding), mode=mode)
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        return patches.transpose(1, 2)  # (B, T, C_in·kh·kw)

    def capture(self, recorded: Tensor, grads: Tensor) -> PatchCapture:
        K, B = grads.shape[:2]
        g = _f64(grads).reshape(K, B, self.d_out, -1).permute(1, 0, 3, 2)  # (B, K, T, O)
        return PatchCapture(self._augment(recorded), g)
