"""Kronecker-factored curvature of ``nn.Linear`` layers: K-FAC and EK-FAC.

For a linear layer ``s = W a + b`` the Gauss–Newton block of its parameters
``[W | b]`` is

    ``G_l = (1/N) Σ_i Σ_k (g_ik ⊗ ā_i)(g_ik ⊗ ā_i)ᵀ``,

where ``ā_i = (a_i, 1)`` is the layer input (with a 1 for the bias) and
``g_ik = (∂f/∂s)ᵀ L_i[:, k]`` the back-propagation of the ``k``-th column of a
square root ``L_i L_iᵀ = H_i`` of the output Hessian (SPEC §1). The ``K``
columns give the Gauss–Newton matrix *exactly*, not a Monte-Carlo sample of
it as the "empirical/true Fisher" variants used by other libraries.

- **K-FAC** (Martens & Grosse, 2015) approximates ``G_l ≈ S_l ⊗ A_l`` with
  ``S_l = (1/N) Σ g gᵀ`` and ``A_l = (1/N) Σ ā āᵀ``; with the eigenbases
  ``S = Q_S Λ_S Q_Sᵀ``, ``A = Q_A Λ_A Q_Aᵀ`` its eigenvalues are
  ``Λ_S ⊗ Λ_A``.
- **EK-FAC** (George et al., 2018) keeps the Kronecker eigenbasis and replaces
  the eigenvalues by the exact diagonal of ``G_l`` in that basis,
  ``Λ_oc = (1/N) Σ_ik (Q_Sᵀ g_ik)_o² (Q_Aᵀ ā_i)_c²`` — the best diagonal
  approximation in that basis.

Layers are treated independently (block-diagonal), the weight decay ``μ`` is
the diagonal of ``diag(μ)`` in the same basis (exact when ``μ`` is the same for
a layer's weight and bias) and the damping ``λ`` is added to every
eigenvalue. For one layer with one output and the squared loss ``g_ik`` is a
constant, the factorisation is exact and EK-FAC equals the exact inverse.

The same layer passes give the *exact* Gauss–Newton matrix cheaply
(:func:`linear_ggn`): its block for layers ``l`` and ``m`` is
``Σ_i (Σ_k g_ik^l g_ik^{mᵀ}) ⊗ ā_i^l ā_i^{mᵀ}``, ``K`` times fewer operations
than from per-sample Jacobians.

Only networks whose trainable parameters all belong to plain ``nn.Linear``
layers, each with its own parameters and applied once per forward pass to
one input row per sample, are supported; anything else raises
:class:`NotLinearError` (a ``ValueError``) naming the layer (use
``solver="cg"`` or ``"arnoldi"`` for those). On the first batch the parameter
gradients the captured inputs and outputs imply are checked against
autograd's, which catches a weight also used outside its layer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import FunctionalModel, iterate_batches

__all__ = ["KroneckerFactors", "LinearBlock", "NotLinearError", "linear_blocks", "layer_passes",
           "linear_ggn"]


@dataclass
class LinearBlock:
    """One ``nn.Linear`` layer's place in the flat parameter vector and its factors."""

    name: str
    weight: slice
    bias: slice | None
    d_out: int
    d_in: int
    Q_S: Tensor | None = None
    Q_A: Tensor | None = None
    eigenvalues: Tensor | None = None  # (d_out, d_in + has_bias), without damping

    def to_matrices(self, V: Tensor) -> Tensor:
        """Rows of flat vectors → ``(k, d_out, d_in [+1])`` matrices ``[W | b]``."""
        W = V[:, self.weight].reshape(-1, self.d_out, self.d_in)
        if self.bias is None:
            return W
        return torch.cat([W, V[:, self.bias].unsqueeze(-1)], dim=-1)

    def put(self, V: Tensor, M: Tensor) -> None:
        """Write ``(k, d_out, d_in [+1])`` matrices into this layer's part of the rows of ``V``."""
        V[:, self.weight] = M[..., :self.d_in].reshape(M.shape[0], -1)
        if self.bias is not None:
            V[:, self.bias] = M[..., self.d_in]


#: Elements of work buffers :func:`linear_ggn` may always use (16 MiB in float64).
WORK_ELEMENTS = 2 ** 21


class NotLinearError(ValueError):
    """The network has trainable parameters outside ``nn.Linear`` layers applied
    once to 2-D inputs, so its curvature has no per-layer Kronecker structure."""


def linear_blocks(model: FunctionalModel) -> list[LinearBlock]:
    """The ``nn.Linear`` layers holding ``model``'s trainable parameters.

    Raises
    ------
    NotLinearError
        If some trainable parameter is outside a plain ``nn.Linear`` layer
        (subclasses with their own ``forward`` count as other layers), is
        shared by two layers, or a layer trains its bias but not its weight.
    """
    offsets, start = {}, 0
    for name, numel in zip(model.param_names, model.param_numels):
        offsets[name] = slice(start, start + numel)
        start += numel
    trainable = {id(p): name for name, p in model.module.named_parameters()
                 if name in offsets}
    blocks, covered = [], set()
    for layer_name, layer in model.module.named_modules():
        if not isinstance(layer, torch.nn.Linear) or \
                type(layer).forward is not torch.nn.Linear.forward:
            continue
        weight = trainable.get(id(layer.weight))
        bias = trainable.get(id(layer.bias)) if layer.bias is not None else None
        shared = {weight, bias} & covered - {None}
        if shared:
            raise NotLinearError(
                f"layer {layer_name!r} shares the parameter {shared.pop()!r} with another "
                "layer; solver='ekfac'/'kfac' needs every Linear layer to have its own. "
                "Use solver='cg' or 'arnoldi'.")
        if weight is None:
            if bias is not None:
                raise NotLinearError(
                    f"layer {layer_name!r} has a frozen weight but a trainable bias; "
                    "solver='ekfac'/'kfac' factors whole Linear layers. Freeze the bias "
                    "too, or use solver='cg' or 'arnoldi'.")
            continue
        blocks.append(LinearBlock(layer_name or "<module>", offsets[weight],
                                  None if bias is None else offsets[bias],
                                  layer.out_features, layer.in_features))
        covered.update({weight, bias} - {None})
    others = [n for n in model.param_names if n not in covered]
    if others:
        raise NotLinearError(
            f"solver='ekfac'/'kfac' handles nn.Linear layers only, but the "
            f"parameters {others[:3]} belong to other layers. Use solver='cg' or "
            "solver='arnoldi' for this network."
        )
    return blocks


@contextmanager
def _capture(module: torch.nn.Module, blocks: list[LinearBlock]):
    """Hooks recording each Linear layer's input and output on a forward.

    The layer hands on a copy of its output, so that an in-place operation
    after it (``ReLU(inplace=True)``) cannot change the recorded one.
    """
    modules = dict(module.named_modules())
    records: dict[str, list] = {b.name: [] for b in blocks}

    def hook(name):
        def record(layer, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            records[name].append((x.detach().clone(), output))
            return output.clone()
        return record

    handles = [modules["" if b.name == "<module>" else b.name].register_forward_hook(
        hook(b.name), with_kwargs=True) for b in blocks]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def layer_passes(model: FunctionalModel, theta: Tensor, blocks: list[LinearBlock],
                 X: Tensor, T: Tensor, batch_size: int | None, *, check: bool = True):
    """Yield, per batch, ``[(ā, g)]`` per layer: inputs ``(B, d_in [+1])`` and
    back-propagated output-Hessian roots ``(B·K, d_out)``, sample-major.

    With ``check`` (a caller's first pass over the data), the parameter
    gradients these imply on the first batch, ``Σ_i g_ik ⊗ ā_i``, are checked
    against autograd's: a weight also used outside its layer's call, or any
    other way the layers' inputs and outputs miss part of the parameters'
    effect, is caught there.

    Raises
    ------
    NotLinearError
        If a layer is applied more than once per forward pass, to inputs that
        are not one 2-D row per sample, or the check fails (on the first
        batch).
    """
    theta = theta.detach().clone().requires_grad_(True)
    for number, (xb, tb) in enumerate(iterate_batches(X, T, batch_size)):
        verify = check and number == 0
        with _capture(model.module, blocks) as records, torch.enable_grad():
            out = model.forward(theta, xb)
            for block in blocks:
                if len(records[block.name]) != 1:
                    raise NotLinearError(
                        f"layer {block.name!r} is applied {len(records[block.name])} "
                        "times per forward pass; solver='ekfac'/'kfac' needs each "
                        "Linear layer used once. Use solver='cg' or 'arnoldi'.")
                a = records[block.name][0][0]
                if a.dim() != 2 or a.shape[0] != xb.shape[0]:
                    raise NotLinearError(
                        f"layer {block.name!r} receives inputs of shape {tuple(a.shape)} "
                        f"for {xb.shape[0]} samples; solver='ekfac'/'kfac' needs one "
                        "row per sample (2-D inputs). Use solver='cg' or 'arnoldi'.")
            root = model.loss.output_hessian_root(out.detach(), tb)  # (B, K, K)
            cotangents = root.permute(2, 0, 1)  # (K, B, K): column k for every sample
            outputs = [records[b.name][0][1] for b in blocks]
            wrt = outputs + ([theta] if verify else [])
            grads = torch.autograd.grad(out, wrt, grad_outputs=cotangents,
                                        is_grads_batched=True, allow_unused=True)
            grads = [torch.zeros((cotangents.shape[0], *w.shape), dtype=w.dtype,
                                 device=w.device) if g is None else g  # output not used
                     for g, w in zip(grads, wrt)]
        layers = [(_augment(records[b.name][0][0], b), g.transpose(0, 1).reshape(-1, b.d_out))
                  for b, g in zip(blocks, grads)]
        if verify:
            _check_gradients(blocks, layers, grads[-1])
        yield layers


def _check_gradients(blocks: list[LinearBlock], layers: list, expected: Tensor) -> None:
    """Raise :class:`NotLinearError` unless ``Σ_i g_ik ⊗ ā_i`` is autograd's gradient."""
    implied, scale = torch.zeros_like(expected), torch.zeros_like(expected)
    for block, (a, g) in zip(blocks, layers):
        g = g.reshape(a.shape[0], -1, block.d_out)
        for target, (gg, aa) in ((implied, (g, a)), (scale, (g.abs(), a.abs()))):
            total = torch.einsum("bko,bc->koc", gg, aa)
            block.put(target, total)
    error = float((implied - expected).norm())
    if error > 1e3 * torch.finfo(expected.dtype).eps * float(scale.norm()):
        raise NotLinearError(
            "the Linear layers' inputs and outputs do not account for the parameters' "
            f"gradients (relative difference {error / max(float(expected.norm()), 1e-300):.1e}"
            "): a weight is used outside its layer's call, or a layer's forward is "
            "not the plain Linear one. solver='ekfac'/'kfac' cannot factor this network; "
            "use solver='cg' or 'arnoldi'.")


def _augment(a: Tensor, block: LinearBlock) -> Tensor:
    if block.bias is None:
        return a
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)


class KroneckerFactors:
    """K-FAC / EK-FAC approximation of the damped Gauss–Newton matrix.

    Parameters
    ----------
    model : FunctionalModel
        The network; every trainable parameter must belong to an ``nn.Linear``.
    X, T : Tensor
        Training inputs and targets.
    damping : float
        ``λ`` added to every eigenvalue.
    corrected : bool, default=True
        EK-FAC eigenvalues (``True``) or plain K-FAC ones (``False``).
    batch_size : int, optional
        Samples per forward/backward pass while accumulating (``None``: all).

    Attributes
    ----------
    blocks : list of LinearBlock
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
        self.blocks = linear_blocks(model)
        self._fit(X, T, batch_size)
        low = min(float(b.eigenvalues.min()) for b in self.blocks) + self.damping
        high = max(float(b.eigenvalues.max()) for b in self.blocks) + self.damping
        self.info = {"fit_seconds": time.perf_counter() - start,
                     "approx_bottom_eigenvalue": low, "approx_top_eigenvalue": high}

    @property
    def memory_bytes(self) -> int:
        """Bytes held: both eigenbases and the eigenvalues of every layer."""
        return 8 * sum(b.Q_S.numel() + b.Q_A.numel() + b.eigenvalues.numel()
                       for b in self.blocks)

    # ------------------------------------------------------------------ fit
    def _fit(self, X: Tensor, T: Tensor, batch_size: int | None) -> None:
        n = X.shape[0]
        A = [None] * len(self.blocks)
        S = [None] * len(self.blocks)
        for layers in layer_passes(self.model, self.theta, self.blocks, X, T, batch_size):
            for j, (a, g) in enumerate(layers):
                a64, g64 = a.to(torch.float64), g.to(torch.float64)
                A[j] = a64.T @ a64 if A[j] is None else A[j] + a64.T @ a64
                S[j] = g64.T @ g64 if S[j] is None else S[j] + g64.T @ g64
        for block, A_l, S_l in zip(self.blocks, A, S):
            lam_A, block.Q_A = torch.linalg.eigh(A_l / n)
            lam_S, block.Q_S = torch.linalg.eigh(S_l / n)
            if not self.corrected:
                block.eigenvalues = lam_S.clamp_min(0)[:, None] * lam_A.clamp_min(0)[None, :]
        if self.corrected:
            sums = [torch.zeros(b.d_out, b.Q_A.shape[0], dtype=torch.float64)
                    for b in self.blocks]
            for layers in layer_passes(self.model, self.theta, self.blocks, X, T, batch_size,
                                       check=False):  # the first pass checked
                for j, (block, (a, g)) in enumerate(zip(self.blocks, layers)):
                    K = g.shape[0] // a.shape[0]
                    ga = (g.to(torch.float64) @ block.Q_S) ** 2  # (B·K, d_out)
                    aa = (a.to(torch.float64) @ block.Q_A) ** 2  # (B, d_in+1)
                    sums[j] += ga.T @ aa.repeat_interleave(K, dim=0)
            for block, total in zip(self.blocks, sums):
                block.eigenvalues = total / n
        mu = self.model.weight_decay.to(torch.float64)
        for block in self.blocks:  # diag(μ) in the eigenbasis (exact if μ is uniform)
            M = block.to_matrices(mu.unsqueeze(0))[0]
            block.eigenvalues = block.eigenvalues + (block.Q_S ** 2).T @ M @ (block.Q_A ** 2)

    # ------------------------------------------------------------- inverse
    def solve(self, B: Tensor) -> Tensor:
        """Approximate ``(G + μ + λI)⁻¹ bᵀ`` for each row ``b`` of ``B``, in float64."""
        B = B.to(torch.float64)
        X = torch.empty_like(B)
        for block in self.blocks:
            rotated = block.Q_S.T @ block.to_matrices(B) @ block.Q_A
            rotated = rotated / (block.eigenvalues + self.damping)
            block.put(X, block.Q_S @ rotated @ block.Q_A.T)
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
    NotLinearError
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
    # accumulator's size or WORK_ELEMENTS (a wide layer with few outputs: short chunks)
    sizes = (o_l * o_m, shape[1]) + ((shape[0], shape[1]) if same else ())
    chunk_size = max(1, min(chunk_size, max(M.numel(), WORK_ELEMENTS) // sum(sizes)))
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
