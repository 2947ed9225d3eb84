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

Anything else with trainable parameters (``nn.Conv1d``, ``nn.MultiheadAttention``'s
in-projection, an ``nn.Parameter`` used directly, a subclass with its own
``forward``, a grouped convolution) raises :class:`UnsupportedLayerError`
(a ``ValueError``) naming the
layer: use ``solver="cg"`` or ``"arnoldi"`` for those.

Layers are treated independently (block-diagonal), the weight decay ``μ`` is
the diagonal of ``diag(μ)`` in the same basis (exact when ``μ`` is the same for
a layer's parameters) and the damping ``λ`` is added to every eigenvalue.

When the factorisation is exact (EK-FAC and K-FAC equal the exact damped
inverse): one Linear layer with one output and the squared loss (``g_ik`` a
constant); more generally a single Linear, Conv2d or Embedding layer whose
(flattened) output *is* the network output under the squared loss, for any
number of positions ``T`` — then ``g_itk = c e_(t,o)``, ``G = c² I ⊗ A`` and
``S = c² I``, which pins the ``1/T`` in ``S`` (and, for Embedding, averaging
``S`` over the non-padding tokens). Normalisation layers are always exact
within their block.

The same layer passes give the *exact* Gauss–Newton matrix cheaply for nets
of ``nn.Linear`` layers applied to one row per sample (:func:`linear_ggn`):
its block for layers ``l`` and ``m`` is ``Σ_i (Σ_k g_ik^l g_ik^{mᵀ}) ⊗
ā_i^l ā_i^{mᵀ}``, ``K`` times fewer operations than from per-sample
Jacobians.

On the first samples the parameter gradients the captured inputs and outputs
imply, ``Σ_i D_ik``, are checked against autograd's, which catches a weight
also used outside its layer's call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from ..model.functional import FunctionalModel, iterate_batches
from ..exceptions import UnsupportedLayerError
from .layers import LAYERWISE, KroneckerLayer, LinearBlock, kronecker_layers

__all__ = ["KroneckerFactors", "LinearBlock", "UnsupportedLayerError",
           "kronecker_layers", "kronecker_passes", "linear_blocks", "layer_passes",
           "linear_ggn"]


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


@contextmanager
def _capture(module: torch.nn.Module, layers: list[KroneckerLayer]):
    """Hooks recording each layer's input (what the layer keeps of it) and output.

    The layer hands on a copy of its output, so that an in-place operation
    after it (``ReLU(inplace=True)``) cannot change the recorded one.
    """
    modules = dict(module.named_modules())
    records: dict[str, list] = {layer.name: [] for layer in layers}

    def hook(layer: KroneckerLayer):
        def record(module_, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            records[layer.name].append((layer.record(module_, x), output))
            return output.clone()
        return record

    handles = [modules["" if layer.name == "<module>" else layer.name].register_forward_hook(
        hook(layer), with_kwargs=True) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


#: Samples the first-batch gradient check differentiates: autograd's parameter
#: gradient, batched over the ``K`` root columns, is the costliest part of a pass.
CHECK_SAMPLES = 64


def kronecker_passes(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                     X: Tensor, T: Tensor, batch_size: int | None, *,
                     check: bool = True,
                     gradients: bool = False) -> Iterator[list[NamedTuple]]:
    """Yield, per batch, every layer's capture (:meth:`KroneckerLayer.capture`):
    its recorded inputs with the back-propagated output-Hessian roots, float64
    (with ``gradients``: the back-propagated loss gradient ``∇_y L_i``, one
    column, so that the captures give the samples' loss gradients).

    With ``check`` (a caller's first pass over the data), the parameter
    gradients the captures imply on the first ``CHECK_SAMPLES`` samples (at
    most a batch), ``Σ_i D_ik``, are first checked against autograd's: a
    weight also used outside its layer's call, or any other way the layers'
    inputs and outputs miss part of the parameters' effect, is caught there.

    Raises
    ------
    UnsupportedLayerError
        If a layer is applied more than once per forward pass, to inputs
        whose first dimension is not the samples, or the check fails.
    """
    theta = theta.detach().clone().requires_grad_(True)
    if check:
        n = min(CHECK_SAMPLES, batch_size or CHECK_SAMPLES)
        _batch_captures(model, theta, layers, X[:n], T[:n], verify=True)
    for xb, tb in iterate_batches(X, T, batch_size):
        yield _batch_captures(model, theta, layers, xb, tb, gradients=gradients)


def _batch_captures(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                    xb: Tensor, tb: Tensor, verify: bool = False,
                    gradients: bool = False) -> list[NamedTuple]:
    """One forward and one backward (batched over the root's ``K`` columns) pass."""
    with _capture(model.module, layers) as records, torch.enable_grad():
        out = model.forward(theta, xb)
        for layer in layers:
            if len(records[layer.name]) != 1:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} is applied {len(records[layer.name])} "
                    f"times per forward pass; {LAYERWISE} needs each "
                    "layer used once. Use solver='cg' or 'arnoldi'.")
            a = records[layer.name][0][0]
            if a.dim() < 1 or a.shape[0] != xb.shape[0]:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} receives inputs of shape {tuple(a.shape)} "
                    f"for {xb.shape[0]} samples; {LAYERWISE} needs one "
                    "row per sample (the samples along the first dimension). "
                    "Use solver='cg' or 'arnoldi'.")
        if gradients:
            cotangents = model.loss.output_grad(out.detach(), tb).unsqueeze(0)  # (1, B, K)
        else:
            root = model.loss.output_hessian_root(out.detach(), tb)  # (B, K, K)
            cotangents = root.permute(2, 0, 1)  # (K, B, K): column k for every sample
        outputs = [records[layer.name][0][1] for layer in layers]
        wrt = outputs + ([theta] if verify else [])
        grads = torch.autograd.grad(out, wrt, grad_outputs=cotangents,
                                    is_grads_batched=True, allow_unused=True)
        grads = [torch.zeros((cotangents.shape[0], *w.shape), dtype=w.dtype,
                             device=w.device) if g is None else g  # output not used
                 for g, w in zip(grads, wrt)]
    captures = [layer.capture(records[layer.name][0][0], g) for layer, g in zip(layers, grads)]
    if verify:
        _check_gradients(layers, captures, grads[-1])
    return captures


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


def _check_gradients(layers: list[KroneckerLayer], captures: list, expected: Tensor) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``Σ_i D_ik`` is autograd's gradient."""
    eps = torch.finfo(expected.dtype).eps  # the model's arithmetic
    expected = expected.to(torch.float64)
    implied, scale = torch.zeros_like(expected), torch.zeros_like(expected)
    for layer, cap in zip(layers, captures):
        layer.put(implied, layer.gradient_sums(cap))
        layer.put(scale, layer.gradient_sums(cap, absolute=True))
    error = float((implied - expected).norm())
    if error > 1e3 * eps * float(scale.norm()):
        raise UnsupportedLayerError(
            "the layers' inputs and outputs do not account for the parameters' "
            f"gradients (relative difference {error / max(float(expected.norm()), 1e-300):.1e}"
            "): a weight is used outside its layer's call, or a layer's forward is "
            f"not the plain one. {LAYERWISE} cannot handle this network; "
            "use solver='cg' or 'arnoldi'.")


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
    blocks : list of KroneckerLayer
        The layers, with their eigenbases and (undamped) eigenvalues.
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
        self.blocks = kronecker_layers(model)
        self._fit(X, T, batch_size)
        low = min(float(b.eigenvalues.min()) for b in self.blocks) + self.damping
        high = max(float(b.eigenvalues.max()) for b in self.blocks) + self.damping
        self.info = {"fit_seconds": time.perf_counter() - start,
                     "approx_bottom_eigenvalue": low, "approx_top_eigenvalue": high}

    @property
    def memory_bytes(self) -> int:
        """Bytes held: the eigenbases and the eigenvalues of every layer."""
        return 8 * sum(b.memory_elements for b in self.blocks)

    # ------------------------------------------------------------------ fit
    def _fit(self, X: Tensor, T: Tensor, batch_size: int | None) -> None:
        n = X.shape[0]
        L = len(self.blocks)
        A: list[Tensor | None] = [None] * L
        S: list[Tensor | None] = [None] * L
        counts = [0] * L
        for captures in kronecker_passes(self.model, self.theta, self.blocks, X, T, batch_size):
            for j, (block, cap) in enumerate(zip(self.blocks, captures)):
                a_sum, s_sum, count = block.factor_sums(cap)
                A[j] = a_sum if A[j] is None else A[j] + a_sum
                S[j] = s_sum if S[j] is None else S[j] + s_sum
                counts[j] += count
        for block, A_l, S_l, count in zip(self.blocks, A, S, counts):
            block.set_factors(A_l / n, S_l / max(count, 1), self.corrected)
        if self.corrected:
            sums = [torch.zeros(b.d_out, b.n_cols, dtype=torch.float64, device=self.theta.device)
                    for b in self.blocks]
            for captures in kronecker_passes(self.model, self.theta, self.blocks, X, T,
                                             batch_size, check=False):  # the first checked
                for j, (block, cap) in enumerate(zip(self.blocks, captures)):
                    sums[j] += block.rotated_squares(cap)
            for block, total in zip(self.blocks, sums):
                block.eigenvalues = total / n
        mu = self.model.weight_decay.to(torch.float64)
        for block in self.blocks:  # diag(μ) in the eigenbasis (exact if μ is uniform)
            block.eigenvalues = block.eigenvalues + block.weight_decay_diagonal(mu)

    # ------------------------------------------------------------- inverse
    def solve(self, B: Tensor) -> Tensor:
        """Approximate ``(G + μ + λI)⁻¹ bᵀ`` for each row ``b`` of ``B``, in float64."""
        B = B.to(torch.float64)
        X = torch.empty_like(B)
        for block in self.blocks:
            rotated = block.rotate(block.to_matrices(B))
            rotated = rotated / (block.eigenvalues + self.damping)
            block.put(X, block.unrotate(rotated))
        return X


# ------------------------------------------------------------- exact GGN
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
