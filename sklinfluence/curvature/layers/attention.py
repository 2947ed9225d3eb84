"""``nn.MultiheadAttention``: its projections as Linear layers with positions.

An attention layer ``y = W_o · attend(W_q x_q + b_q, W_k x_k + b_k, W_v x_v + b_v)
+ b_o`` holds four linear maps: the query, key and value projections (rows
``0:E``, ``E:2E`` and ``2E:3E`` of ``in_proj_weight`` and ``in_proj_bias``) and
the output projection ``out_proj`` (an ``nn.Linear``). Each acts on every
position of its sequence, as an ``nn.Linear`` applied to ``(N, T, E)`` inputs,
and gets its own Kronecker factors as one (KFC, see
:mod:`sklinfluence.curvature.layers`):

- :class:`AttentionProjections` is the layer of the in-projection: three
  blocks ``(E, E + 1)`` with their own ``A`` (from the query, key or value
  tokens), ``S`` (averaged over the query or key positions) and eigenbases,
  laid out as ``[in_proj_weight | in_proj_bias]``, ``(3E, E + 1)``;
- ``out_proj`` is an ordinary :class:`~sklinfluence.curvature.layers.LinearBlock`.

Neither is reachable by a forward hook: ``nn.MultiheadAttention.forward`` hands
its weights to :func:`torch.nn.functional.multi_head_attention_forward` as
tensors and never calls ``out_proj``. During the capture passes only,
:meth:`AttentionProjections.capture_hooks` runs that call decomposed — under a
:class:`torch.overrides.TorchFunctionMode` active for the module's forward,
which receives the call with the arguments the module's own ``forward``
prepared (``batch_first`` undone, masks merged): the three projections by
:func:`torch.nn.functional.linear` (recorded, batch first), the attention
itself by the same function with identity projections (the masks, the heads,
``need_weights``, ``bias_k``/``bias_v``, ``add_zero_attn`` exactly as torch
computes them) and the output projection by calling ``out_proj``, whose
forward hook records it like any Linear layer. Multiplying by an identity
matrix is exact, so the decomposed output equals the module's to rounding
(the first-batch check of :mod:`sklinfluence.curvature.capture` compares them,
and the captured gradients with autograd's).

Handled: ``batch_first`` either way, ``bias`` either way, ``dropout`` in eval
mode (always, for a :class:`~sklinfluence.model.functional.FunctionalModel`),
frozen ``bias_k``/``bias_v``, ``add_zero_attn``, attention and key-padding
masks, causal attention, self- and cross-attention. Refused with an
:class:`~sklinfluence.exceptions.UnsupportedLayerError`: trainable
``bias_k``/``bias_v`` (``add_bias_kv=True``), trainable separate projection
weights (``kdim`` or ``vdim`` not ``embed_dim``; the output projection of
such a layer is handled), a trainable bias with a frozen weight, dropout in
training mode and inputs without a batch dimension.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ...exceptions import UnsupportedLayerError
from .base import ADVICE, LAYERWISE, Eigenbasis, KroneckerLayer, register_layer
from .linear import LinearBlock
from .patches import PatchCapture

__all__ = ["AttentionProjections", "AttentionCapture"]

#: The names of the query, key and value projections, in their row order.
PROJECTIONS = ("q", "k", "v")
#: :data:`~sklinfluence.curvature.layers.ADVICE` after another way out.
_OR_ADVICE = "or " + ADVICE[0].lower() + ADVICE[1:]


class AttentionCapture(NamedTuple):
    """The query, key and value projections' captures (one per projection)."""

    parts: tuple[PatchCapture, PatchCapture, PatchCapture]


@register_layer
@dataclass(eq=False)
class AttentionProjections(KroneckerLayer):
    """The in-projection of an ``nn.MultiheadAttention``: three Linear blocks.

    Layout ``[in_proj_weight | in_proj_bias]``, ``(3E, E + 1)`` (``(3E, E)``
    without bias): rows ``jE:(j+1)E`` are projection ``j`` of ``q, k, v``,
    each a block with its own factors. Its :class:`Eigenbasis` holds the
    three blocks' bases stacked, ``Q_S`` ``(3, E, E)`` and ``Q_A`` ``(3, C, C)``.

    Attributes
    ----------
    parts : tuple of LinearBlock
        The query, key and value projections as Linear layers, each on its own
        rows of the flat parameters.
    """

    parts: tuple[LinearBlock, ...] = ()

    module_types: ClassVar = (nn.MultiheadAttention,)
    #: ``bias_k``, ``bias_v`` and the separate projection weights are listed so
    #: that :meth:`build` refuses them by name when they train.
    param_attrs: ClassVar = ("in_proj_weight", "in_proj_bias", "q_proj_weight",
                             "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")

    @classmethod
    def build(cls, name, module, slices):
        what = f"layer {name!r} is an nn.MultiheadAttention with"
        if slices.get("bias_k") is not None or slices.get("bias_v") is not None:
            raise UnsupportedLayerError(
                f"{what} add_bias_kv=True and trainable bias_k/bias_v: they are appended to "
                f"the keys and values, not weights of a projection, and {LAYERWISE} "
                "factor only the projections. Freeze bias_k and bias_v "
                f"(requires_grad_(False)), {_OR_ADVICE}")
        separate = [a for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                    if slices.get(a) is not None]
        if separate:
            raise UnsupportedLayerError(
                f"{what} kdim={module.kdim}, vdim={module.vdim} (embed_dim="
                f"{module.embed_dim}), whose separate projection weights {separate} "
                f"train; {LAYERWISE} factor attention's in-projection only for "
                "kdim = vdim = embed_dim (its out_proj is factored either way). "
                f"{ADVICE}")
        weight, bias = slices.get("in_proj_weight"), slices.get("in_proj_bias")
        if weight is None and bias is not None:
            raise UnsupportedLayerError(
                f"{what} a frozen in_proj_weight but a trainable in_proj_bias; "
                f"{LAYERWISE} handle whole projections. Freeze the bias too, {_OR_ADVICE}")
        if weight is None:
            return None
        if module.training and module.dropout > 0:
            raise UnsupportedLayerError(
                f"{what} dropout={module.dropout} in training mode: its curvature would "
                f"be random. Put it in eval mode (as FunctionalModel does), {_OR_ADVICE}")
        E = module.embed_dim
        parts = tuple(LinearBlock(
            f"{name}.{p}_proj", E, E,
            weight=slice(weight.start + j * E * E, weight.start + (j + 1) * E * E),
            bias=None if bias is None else slice(bias.start + j * E, bias.start + (j + 1) * E))
            for j, p in enumerate(PROJECTIONS))
        return cls(name, 3 * E, E, parts=parts)

    # -------------------------------------------------------------- layout
    @property
    def n_cols(self) -> int:
        return self.parts[0].n_cols

    def to_matrices(self, V: Tensor) -> Tensor:
        return torch.cat([part.to_matrices(V) for part in self.parts], dim=1)

    def put(self, V: Tensor, M: Tensor) -> None:
        E = self.d_in
        for j, part in enumerate(self.parts):
            part.put(V, M[:, j * E:(j + 1) * E])

    def _blocks(self, M: Tensor) -> Tensor:
        """``(k, 3E, C)`` → ``(k, 3, E, C)``."""
        return M.reshape(*M.shape[:-2], 3, self.d_in, M.shape[-1])

    # ------------------------------------------------------------- capture
    def record(self, module: nn.Module, x: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Copies of the query, key and value tokens ``(B, T_j, E)`` the
        projections receive (handed over by :meth:`capture_hooks`; one copy of an
        input they share)."""
        copies: dict[int, Tensor] = {}
        for tokens in x:
            if id(tokens) not in copies:
                copies[id(tokens)] = tokens.detach().clone()
        return tuple(copies[id(tokens)] for tokens in x)

    def capture(self, recorded: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> AttentionCapture:
        """The three projections' inputs ``(B, T_j, E)`` and their outputs'
        back-propagated root columns ``(K, B, T_j, E)`` (:meth:`capture_hooks`)."""
        return AttentionCapture(tuple(part.capture(x, g)
                                      for part, x, g in zip(self.parts, recorded, grads)))

    def factor_sums(self, cap: AttentionCapture) -> tuple[Tensor, Tensor, int]:
        """Stacked ``(3, C, C)`` and ``(3, E, E)`` sums and the batch's samples:
        each ``S`` sum is divided by its projection's positions ``T_j`` here (the
        key and value sequences may be longer than the query's), so that
        ``S_j = Σ/(N T_j)`` as for a Linear layer with positions."""
        A, S = [], []
        for part, c in zip(self.parts, cap.parts):
            a_sum, s_sum, _ = part.factor_sums(c)
            A.append(a_sum)
            S.append(s_sum / c.a.shape[1])
        return torch.stack(A), torch.stack(S), cap.parts[0].a.shape[0]

    def sample_gradients(self, cap: AttentionCapture) -> Tensor:
        return torch.cat([part.sample_gradients(c) for part, c in zip(self.parts, cap.parts)],
                         dim=2)

    def rotated_squares(self, basis: Eigenbasis, cap: AttentionCapture) -> Tensor:
        return torch.cat([part.rotated_squares(Eigenbasis(basis.Q_S[j], basis.Q_A[j]), c)
                          for j, (part, c) in enumerate(zip(self.parts, cap.parts))])

    def gradient_sums(self, cap: AttentionCapture, absolute: bool = False) -> Tensor:
        return torch.cat([part.gradient_sums(c, absolute)
                          for part, c in zip(self.parts, cap.parts)], dim=1)

    # --------------------------------------------------------- eigenbases
    def eigenbasis(self, A: Tensor, S: Tensor, corrected: bool) -> Eigenbasis:
        """The three blocks' eigenbases, batched."""
        lam_A, Q_A = torch.linalg.eigh(A)
        lam_S, Q_S = torch.linalg.eigh(S)
        eigenvalues = None if corrected else \
            (lam_S.clamp_min(0)[:, :, None] * lam_A.clamp_min(0)[:, None, :]).reshape(
                self.d_out, self.n_cols)
        return Eigenbasis(Q_S, Q_A, eigenvalues)

    def rotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        return (basis.Q_S.mT @ self._blocks(M) @ basis.Q_A).reshape(M.shape)

    def unrotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        return (basis.Q_S @ self._blocks(M) @ basis.Q_A.mT).reshape(M.shape)

    def weight_decay_diagonal(self, basis: Eigenbasis, mu: Tensor) -> Tensor:
        M = self._blocks(self.to_matrices(mu.unsqueeze(0))[0])
        return ((basis.Q_S ** 2).mT @ M @ (basis.Q_A ** 2)).reshape(self.d_out, self.n_cols)

    # ------------------------------------------------------ capture hooks
    @classmethod
    def capture_hooks(cls, root: nn.Module, layers: list[KroneckerLayer],
                      records: dict[str, list]) -> list[RemovableHandle]:
        """Hooks for one capture pass: every handled attention module whose
        in-projection or ``out_proj`` is one of ``layers`` runs decomposed during
        its forward (see the module's docstring).

        The in-projection's entry of ``records`` receives ``(recorded, outputs)``:
        :meth:`record` of the query, key and value tokens ``(B, T_j, E)`` and
        their projections (in the graph), batch first; ``out_proj`` is called as
        a module, so that its own forward hook records it.

        Returns
        -------
        list of RemovableHandle
            The hooks, for the caller to remove.
        """
        by_name = {layer.name: layer for layer in layers}
        handles = []
        for name, module in root.named_modules():
            key = name or "<module>"
            if not cls.handles(module) or (key not in by_name
                                           and f"{name}.out_proj" not in by_name):
                continue
            layer = by_name.get(key)
            sink = None if layer is None else (
                lambda inputs, outputs, layer=layer, module=module:
                records[layer.name].append((layer.record(module, inputs), outputs)))
            mode = _Decomposed(module, key, sink)
            handles.append(module.register_forward_pre_hook(mode.enter))
            handles.append(module.register_forward_hook(mode.exit, always_call=True))
        return handles


_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _Decomposed(TorchFunctionMode):
    """Active during one attention module's forward: runs its call of
    :func:`~torch.nn.functional.multi_head_attention_forward` as projections
    (recorded, handed to ``sink``), attention with identity projections, and
    ``out_proj`` called as a module."""

    def __init__(self, module: nn.MultiheadAttention, name: str,
                 sink: Callable[[tuple, tuple], None] | None) -> None:
        super().__init__()
        self.module, self.name, self.sink = module, name, sink

    def enter(self, *_) -> None:
        """Forward pre-hook: activate the mode."""
        self.__enter__()

    def exit(self, *_) -> None:
        """Forward hook (also called when the forward raises): deactivate it."""
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        call = _SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        p = call.arguments
        query, key, value = p["query"], p["key"], p["value"]
        if query.dim() != 3:
            raise UnsupportedLayerError(
                f"layer {self.name!r} (nn.MultiheadAttention) receives unbatched inputs of "
                f"shape {tuple(query.shape)}; {LAYERWISE} need one sequence per sample. "
                f"{ADVICE}")
        if p["use_separate_proj_weight"]:
            weights = (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
        else:
            weights = p["in_proj_weight"].chunk(3)
        biases = (None,) * 3 if p["in_proj_bias"] is None else p["in_proj_bias"].chunk(3)
        batch_first = {id(x): x.transpose(0, 1) for x in (query, key, value)}
        inputs = tuple(batch_first[id(x)] for x in (query, key, value))  # shared stay shared
        projected = tuple(F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases))
        if self.sink is not None:
            self.sink(inputs, projected)
        W_o, b_o = p["out_proj_weight"], p["out_proj_bias"]
        E = projected[0].shape[-1]
        eye = torch.eye(E, dtype=projected[0].dtype, device=projected[0].device)
        p.update(query=projected[0].transpose(0, 1), key=projected[1].transpose(0, 1),
                 value=projected[2].transpose(0, 1), in_proj_weight=None, in_proj_bias=None,
                 use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                 v_proj_weight=eye, out_proj_weight=eye, out_proj_bias=None)
        context, attention = func(**p)
        context = context.transpose(0, 1)  # (B, L, E)
        out_proj = self.module.out_proj
        if W_o is out_proj.weight and b_o is out_proj.bias:
            output = out_proj(context)  # its forward hook records it
        else:  # called with other weights than the module's own
            output = F.linear(context, W_o, b_o)
        return output.transpose(0, 1), attention
