"""The exact Gauss–Newton matrix of a net of ``nn.Linear`` layers from layer captures.

The layers' capture passes give the *exact* Gauss–Newton matrix cheaply for nets
of ``nn.Linear`` layers applied to one row per sample (:func:`linear_ggn`):
its block for layers ``l`` and ``m`` is ``Σ_i (Σ_k g_ik^l g_ik^{mᵀ}) ⊗
ā_i^l ā_i^{mᵀ}``, ``K`` times fewer operations than from per-sample
Jacobians.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..exceptions import UnsupportedLayerError
from ..model.functional import FunctionalModel
from .capture import kronecker_passes
from .layers import LinearBlock, kronecker_layers

__all__ = ["LINEAR_GGN_WORK_ELEMENTS", "layer_passes", "linear_blocks", "linear_ggn"]

#: Elements of work buffers :func:`linear_ggn` may always use (16 MiB in float64).
LINEAR_GGN_WORK_ELEMENTS = 2 ** 21


def linear_blocks(model: FunctionalModel) -> list[LinearBlock]:
    """The ``nn.Linear`` layers holding ``model``'s trainable parameters.

    Raises
    ------
    UnsupportedLayerError
        If some trainable parameter is outside a plain ``nn.Linear`` layer
        (subclasses with their own ``forward`` count as other layers), is
        shared by two layers, or a layer trains its bias but not its weight.
    """
    layers = kronecker_layers(model)
    others = [f"{layer.name!r} ({type(layer).__name__})" for layer in layers
              if not isinstance(layer, LinearBlock)]
    if others:
        raise UnsupportedLayerError(
            "the exact Kronecker build of the Gauss–Newton matrix handles nn.Linear layers "
            f"only, but the network also trains {', '.join(others[:3])}; its matrix comes "
            "from the Jacobians instead.")
    return layers


def layer_passes(model: FunctionalModel, theta: Tensor, blocks: list[LinearBlock],
                 X: Tensor, T: Tensor, batch_size: int | None, *, check: bool = True):
    """Yield, per batch, ``[(ā, g)]`` per Linear layer: inputs ``(B, d_in [+1])`` and
    back-propagated output-Hessian roots ``(B·K, d_out)``, sample-major, float64.

    Raises
    ------
    UnsupportedLayerError
        As :func:`kronecker_passes`, and if a layer's input is not one 2-D row
        per sample.
    """
    for captures in kronecker_passes(model, theta, blocks, X, T, batch_size, check=check):
        for block, cap in zip(blocks, captures):
            if cap.a.shape[1] != 1:
                raise UnsupportedLayerError(
                    f"layer {block.name!r} receives {cap.a.shape[1]} rows per sample; the "
                    "exact Kronecker build needs one row per sample (2-D inputs).")
        yield [(cap.a[:, 0], cap.g.reshape(-1, block.d_out))
               for block, cap in zip(blocks, captures)]


def linear_ggn(model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor, *,
               batch_size: int | None = None, chunk_size: int = 256) -> Tensor:
    """The exact Gauss–Newton sum ``Σ_i J_iᵀ H_i J_i`` of a net of ``nn.Linear`` layers.

    Uses the per-sample Kronecker structure instead of the Jacobians: the
    block of layers ``l`` and ``m`` is

        ``Σ_i A_i^{lm} ⊗ ā_i^l ā_i^{mᵀ}``,  ``A_i^{lm} = Σ_k g_ik^l g_ik^{mᵀ}``,

    one matrix product over samples of ``(d_out^l d_out^m) × (d_in^l d_in^m)``
    entries — ``K`` times fewer operations than ``Σ_i (L_iᵀJ_i)ᵀ(L_iᵀJ_i)``
    for ``K`` outputs, and on a diagonal block only the pairs ``o ≤ p`` and
    ``c ≤ d`` of the two symmetric factors are formed (a quarter of it).

    Parameters
    ----------
    model : FunctionalModel
        Every trainable parameter must belong to a plain ``nn.Linear`` layer
        of its own, applied once per forward pass to one input row per sample.
    theta : Tensor
        Where to linearise.
    X, T : Tensor
        The data.
    batch_size : int, optional
        Samples per forward/backward pass (``None``: ``chunk_size``).
    chunk_size : int, default=256
        Samples per accumulated matrix product.

    Returns
    -------
    Tensor
        ``(P, P)`` float64, the plain sum (not divided by ``N``, no weight
        decay or damping). Memory beyond the result: the accumulator of the
        largest pair of layers (``8 P_l P_m`` bytes, ``2 P_l²`` on the
        diagonal, so at most ``2 P²`` in all), work buffers of at most that
        size or 16 MiB, and ``8 N (K + 1) Σ_l d_l`` bytes of layer inputs
        and back-propagations.

    Raises
    ------
    UnsupportedLayerError
        If the network is not made of such layers (then use the Jacobians).
    """
    blocks = linear_blocks(model)
    acts: list[list[Tensor]] = [[] for _ in blocks]
    backs: list[list[Tensor]] = [[] for _ in blocks]
    for layers in layer_passes(model, theta, blocks, X, T, batch_size or chunk_size):
        for j, (a, g) in enumerate(layers):
            acts[j].append(a.detach().to(torch.float64))
            backs[j].append(g.detach().to(torch.float64).reshape(a.shape[0], -1, g.shape[-1]))
    a_all = [torch.cat(parts) for parts in acts]
    g_all = [torch.cat(parts) for parts in backs]
    P = model.n_params
    dense = torch.zeros(P, P, dtype=torch.float64, device=theta.device)
    for l_, block_l in enumerate(blocks):
        for m, block_m in enumerate(blocks[:l_ + 1]):
            _add_pair_block(dense, block_l, block_m, a_all[l_], g_all[l_], a_all[m], g_all[m],
                            chunk_size)
            if m != l_:  # mirror the cross block
                for rows in _slices(block_l):
                    for cols in _slices(block_m):
                        dense[cols, rows] = dense[rows, cols].T
    return dense


def _slices(block: LinearBlock) -> list[slice]:
    return [block.weight] if block.bias is None else [block.weight, block.bias]


def _pair_index(n: int, device) -> tuple[Tensor, Tensor]:
    """The pairs ``i ≤ j`` of ``range(n)`` and, for every ``(i, j)``, its pair's number."""
    upper = torch.triu_indices(n, n, device=device)
    number = torch.empty(n, n, dtype=torch.long, device=device)
    number[upper[0], upper[1]] = torch.arange(upper.shape[1], device=device)
    number[upper[1], upper[0]] = torch.arange(upper.shape[1], device=device)
    return upper, number


def _add_pair_block(dense: Tensor, block_l: LinearBlock, block_m: LinearBlock, a_l: Tensor,
                    g_l: Tensor, a_m: Tensor, g_m: Tensor, chunk_size: int) -> None:
    """Write ``Σ_i A_i ⊗ ā_i^l ā_i^{mᵀ}`` into the rows of layer ``l``, columns of ``m``.

    Accumulates ``M[(o, p), (c, d)] = Σ_i A_i[o, p] ā_i^l[c] ā_i^m[d]`` — for a
    diagonal block (``block_l is block_m``) only over ``o ≤ p`` and ``c ≤ d`` —
    then writes it one output row ``o`` (``d_in^l`` matrix rows) at a time, so
    the only temporaries are ``M`` and one such slab.
    """
    same = block_l is block_m
    o_l, o_m = g_l.shape[-1], g_m.shape[-1]
    d_l, d_m = a_l.shape[-1], a_m.shape[-1]
    device = a_l.device
    if same:
        pairs_o, number_o = _pair_index(o_l, device)
        pairs_d, number_d = _pair_index(d_l, device)
        flat_o = pairs_o[0] * o_l + pairs_o[1]
        shape = (pairs_o.shape[1], pairs_d.shape[1])
    else:
        shape = (o_l * o_m, d_l * d_m)
    M = torch.zeros(shape, dtype=torch.float64, device=device)
    # one set of work buffers reused for every chunk (no allocator churn), within the
    # accumulator's size or LINEAR_GGN_WORK_ELEMENTS (a wide layer with few outputs:
    # short chunks)
    sizes = (o_l * o_m, shape[1]) + ((shape[0], shape[1]) if same else ())
    chunk_size = max(1, min(chunk_size,
                            max(M.numel(), LINEAR_GGN_WORK_ELEMENTS) // sum(sizes)))
    n = min(chunk_size, a_l.shape[0])
    buffers = [torch.empty(n, k, dtype=torch.float64, device=device) for k in sizes]
    for s in range(0, a_l.shape[0], chunk_size):
        al, am = a_l[s:s + chunk_size], a_m[s:s + chunk_size]
        b = al.shape[0]
        A, right = buffers[0][:b], buffers[1][:b]
        torch.bmm(g_l[s:s + b].transpose(1, 2), g_m[s:s + b], out=A.view(b, o_l, o_m))
        if same:
            left, other = buffers[2][:b], buffers[3][:b]
            torch.index_select(A, 1, flat_o, out=left)
            torch.index_select(al, 1, pairs_d[0], out=right)
            torch.index_select(al, 1, pairs_d[1], out=other)
            right.mul_(other)
        else:
            left = A
            torch.mul(al[:, :, None], am[:, None, :], out=right.view(b, d_l, d_m))
        M.addmm_(left.T, right)
    if not same:
        M = M.reshape(o_l, o_m, d_l, d_m)
    for o in range(o_l):
        if same:  # entry ((o, c), (p, d)) is M[pair(o, p), pair(c, d)]
            rows = M.index_select(0, number_o[o]).index_select(1, number_d.reshape(-1))
            slab = rows.reshape(o_l, d_l, d_l).permute(1, 0, 2)
        else:
            slab = M[o].permute(1, 0, 2)
        _write_slab(dense, block_l, o, block_m, slab)


def _write_slab(dense: Tensor, block_l: LinearBlock, o: int, block_m: LinearBlock,
                slab: Tensor) -> None:
    """``slab[c, p, d]`` (``[W | b]`` order) into the flat rows of ``(o, c)`` and columns
    of ``(p, d)``, by slices."""
    d_in_l, d_in_m = block_l.d_in, block_m.d_in
    start = block_l.weight.start + o * d_in_l
    parts = [(slice(start, start + d_in_l), slab[:d_in_l])]
    if block_l.bias is not None:
        parts.append((block_l.bias.start + o, slab[d_in_l]))
    for rows, part in parts:
        dense[rows, block_m.weight] = part[..., :d_in_m].reshape(*part.shape[:-2], -1)
        if block_m.bias is not None:
            dense[rows, block_m.bias] = part[..., d_in_m]
