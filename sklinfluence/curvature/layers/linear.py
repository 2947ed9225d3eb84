"""``nn.Linear``: K-FAC's own layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from .base import _f64, _weight_and_bias, register_layer
from .patches import PatchCapture, _PatchLayer

__all__ = ["LinearBlock"]


@register_layer
@dataclass(eq=False)
class LinearBlock(_PatchLayer):
    """``nn.Linear``: inputs ``(N, ..., d_in)``, the middle dimensions are positions.

    Layout ``[W | b]``, ``(out_features, in_features + 1)``.
    """

    module_types: ClassVar = (nn.Linear,)
    factorable: ClassVar = True

    @classmethod
    def build(cls, name, module, slices):
        weight, bias = _weight_and_bias(name, module, slices)
        if weight is None:
            return None
        return cls(name, module.out_features, module.in_features, weight=weight, bias=bias)

    def outer_factors(self, cap: PatchCapture) -> tuple[Tensor, Tensor] | None:
        """One row per sample (2-D inputs): ``(ā, g)``; None for ``(N, ..., d_in)`` inputs."""
        if cap.a.shape[1] != 1:
            return None
        return cap.a[:, 0], cap.g[:, :, 0]

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.detach().clone()  # an in-place operation later must not change it

    def capture(self, recorded: Tensor, grads: Tensor) -> PatchCapture:
        B, K = recorded.shape[0], grads.shape[0]
        a = self._augment(recorded.reshape(B, -1, self.d_in))
        g = _f64(grads).reshape(K, B, -1, self.d_out).transpose(0, 1)
        return PatchCapture(a, g)
