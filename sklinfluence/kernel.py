"""The exact damped Gauss–Newton inverse in kernel (Woodbury) form.

With ``D = diag(μ) + λ`` (weight decay plus damping, positive) the damped
Gauss–Newton matrix of SPEC §1 is

    ``G + D = D^{1/2} (I + ŨᵀŨ) D^{1/2}``,
    rows of ``Ũ``: ``u_ik = N^{-1/2} D^{-1/2} J_iᵀ L_i[:, k]``,

``L_i L_iᵀ = H_i`` the output Hessian's root, one row per training sample
``i`` and root column ``k``. Where the data are smaller than the net,
``n = N·K' < P``, the Woodbury identity

    ``(G + D)⁻¹ = D^{-1/2} (I − Ũᵀ (I + ŨŨᵀ)⁻¹ Ũ) D^{-1/2}``

trades the ``P × P`` matrix for the ``n × n`` kernel ``I + ŨŨᵀ`` — the exact
inverse (to rounding, float64 Cholesky) for ``16 n²`` bytes instead of
``16 P²``: 1.9 GB rather than 82 GB for the digits CNN (1,200 samples, 10
classes, 71,754 parameters).

Root columns that vanish for every sample are left out (``K' = K − 1`` for the
softmax cross-entropy, whose Hessian is blind to a shift of all logits); what
they leave out of ``G`` is below ``K·eps`` of the output Hessian's largest
eigenvalue.

The rows of ``Ũ`` come from the layer captures of :mod:`sklinfluence.kfac`
(one forward and one batched backward pass per chunk of samples, the
registered layer types of :mod:`sklinfluence.layers`), and each layer keeps
the cheaper of two forms:

- **factored**, for ``nn.Linear`` applied to one row per sample whose ``D`` is
  the same down each column of ``[W | b]``: ``u_ik = g_ik ⊗ ã_i`` is never
  formed; its kernel block is ``(g_ik·g_jl)(ã_i·ã_j)`` and its products with
  vectors are matrix products with the captured ``ã`` and ``g`` — what keeps
  the CNN's 65,664-parameter ``Linear(512, 128)`` at 641 numbers per row;
- **materialised** rows ``(n, P_l)`` for any other layer (convolutions,
  embeddings, normalisation parameters).

The kernel's lower triangle is accumulated in blocks of sample rows (the
Cholesky factorisation reads only that triangle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .functional import FunctionalModel, iterate_batches
from .kfac import kronecker_passes
from .layers import KroneckerLayer, LinearBlock, UnsupportedLayerError, kronecker_layers
from .memory import NotEnoughMemoryError, format_bytes, memory_limit

__all__ = ["GaussNewtonKernel", "kernel_bytes", "kernel_applies"]

#: Kernel rows accumulated per block (a ``BLOCK_ROWS × n`` work buffer).
BLOCK_ROWS = 1024
#: Right-hand sides pushed through the factored layers' products at once.
RHS_CHUNK = 64


def kernel_bytes(n_rows: int, materialised_params: int) -> int:
    """Bytes the kernel form holds: kernel and factor (``16 n²``) plus the
    materialised rows (``8 n P_m``)."""
    return 16 * n_rows ** 2 + 8 * n_rows * materialised_params


def _diagonal(model: FunctionalModel, damping: float) -> Tensor:
    """``D = diag(μ) + λ`` per parameter, float64."""
    return (model.weight_decay + damping).to(torch.float64)


def kernel_applies(model: FunctionalModel, X: Tensor, damping: float) -> str | None:
    """Why the kernel form does not apply to ``model`` on ``X``, or None if it does.

    It needs a positive ``D`` (weight decay plus damping), every trainable
    parameter in a registered layer type, fewer kernel rows than parameters
    (``N·K ≤ P``) and ``16 (N·K)²`` bytes plus the materialised rows within
    :func:`~sklinfluence.memory.memory_limit`.
    """
    if float(_diagonal(model, damping).min()) <= 0:
        return "weight decay plus damping is not positive everywhere"
    try:
        layers = kronecker_layers(model)
    except UnsupportedLayerError as err:
        return str(err)
    n_outputs = int(model.forward(model.params, X[:1]).shape[1])
    n = int(X.shape[0]) * n_outputs
    P = model.n_params
    if n > P:
        return f"the data give {n:,} kernel rows, more than the {P:,} parameters"
    needed = kernel_bytes(n, _materialised_bound(layers))
    limit = memory_limit()
    if limit is not None and needed > limit:
        return f"it needs {format_bytes(needed)}, more than the limit of {format_bytes(limit)}"
    return None


def _materialised_bound(layers: list[KroneckerLayer]) -> int:
    """Parameters of the layers that may keep materialised rows (all but Linear)."""
    return sum(layer.d_out * layer.n_cols for layer in layers
               if not isinstance(layer, LinearBlock))


@dataclass
class _Factored:
    """A Linear layer's rows as ``g_ik ⊗ ã_i``: ``a`` ``(N, C)``, ``g`` ``(N, K', O)``;
    ``scale`` is ``D^{-1/2}`` in the layer's ``(O, C)`` layout."""

    layer: KroneckerLayer
    scale: Tensor
    a: Tensor
    g: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return self.a, self.g


@dataclass
class _Materialised:
    """A layer's rows of ``Ũ`` as a matrix ``(N·K', O·C)`` (layout order)."""

    layer: KroneckerLayer
    scale: Tensor
    rows: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.rows,)


class GaussNewtonKernel:
    """``(G + D)⁻¹`` in kernel form for a net and its training data.

    Parameters
    ----------
    model : FunctionalModel
        The network, loss and weight decay.
    theta : Tensor
        Point of linearisation.
    X, T : Tensor
        Training inputs and targets.
    damping : float
        ``λ``; ``D = diag(μ) + λ`` must be positive.
    batch_size : int, optional
        Samples per capture pass (None: all at once).
    verbose : int, default=0
        Progress bar over the kernel's row blocks.

    Raises
    ------
    UnsupportedLayerError
        If a trainable parameter is outside a registered layer type.
    NotEnoughMemoryError
        Before allocating, if the kernel, its factor and the materialised
        rows exceed :func:`~sklinfluence.memory.memory_limit`.
    ValueError
        If ``D`` is not positive.
    """

    def __init__(self, model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor, *,
                 damping: float, batch_size: int | None = None, verbose: int = 0) -> None:
        start = time.perf_counter()
        diagonal = _diagonal(model, damping)
        if float(diagonal.min()) <= 0:
            raise ValueError("the kernel form needs weight decay plus damping > 0 for every "
                             "parameter; increase damping.")
        self.layers = kronecker_layers(model)
        self.scale = diagonal.rsqrt()  # D^{-1/2}
        self.n_samples = N = int(X.shape[0])
        self.keep = _kept_root_columns(model, theta, X, T, batch_size)
        K = int(self.keep.numel())
        self.n_rows = n = N * K
        self.parts: list = []
        offset = 0
        for captures in kronecker_passes(model, theta, self.layers, X, T, batch_size):
            B = _batch_size(captures[0])
            if not self.parts:
                self.parts = self._allocate(captures, n)
            for part, cap in zip(self.parts, captures):
                self._store(part, cap, offset, B)
            offset += B
        captured = time.perf_counter()
        self.factor = self._factorise(verbose)
        self.info = {"kernel_rows": n, "root_columns": K,
                     "materialised_params": sum(p.rows.shape[1] for p in self.parts
                                                if isinstance(p, _Materialised)),
                     "capture_seconds": captured - start,
                     "factor_seconds": time.perf_counter() - captured,
                     # held once factorised: the factor (the kernel is freed) and the rows
                     "memory_bytes": 8 * n ** 2 + sum(
                         8 * sum(t.numel() for t in part.tensors()) for part in self.parts)}

    # ----------------------------------------------------------- rows of Ũ
    def _allocate(self, captures: list, n: int) -> list:
        """Choose each layer's form from the first batch; check memory; allocate."""
        forms, scales = [], []
        for layer, cap in zip(self.layers, captures):
            columns = layer.to_matrices(self.scale.unsqueeze(0))[0]  # D^{-1/2}, (O, C)
            factored = (isinstance(layer, LinearBlock) and cap.a.shape[1] == 1
                        and bool((columns == columns[:1]).all()))
            forms.append(factored)
            scales.append(columns)
        materialised = sum(layer.d_out * layer.n_cols
                           for layer, factored in zip(self.layers, forms) if not factored)
        factored_numbers = sum(self.n_samples * layer.n_cols + n * layer.d_out
                               for layer, factored in zip(self.layers, forms) if factored)
        needed = kernel_bytes(n, materialised) + 8 * factored_numbers
        limit = memory_limit()
        if limit is not None and needed > limit:
            raise NotEnoughMemoryError(
                f"the kernel form of the damped Gauss–Newton inverse needs {format_bytes(needed)} "
                f"({n:,} kernel rows: 16·n² bytes for the kernel and its factor, plus "
                f"{materialised:,} parameters' rows), more than the limit of "
                f"{format_bytes(limit)} (set_config(memory_limit_bytes=...)). Nothing was "
                "allocated. Use solver='cg' (matrix-free) or an approximation such as "
                "solver='ekfac'.")
        parts = []
        for layer, factored, scale in zip(self.layers, forms, scales):
            if factored:
                parts.append(_Factored(layer, scale, torch.empty(
                    self.n_samples, layer.n_cols, dtype=torch.float64), torch.empty(
                    self.n_samples, n // self.n_samples, layer.d_out, dtype=torch.float64)))
            else:
                parts.append(_Materialised(layer, scale, torch.empty(
                    n, layer.d_out * layer.n_cols, dtype=torch.float64)))
        return parts

    def _store(self, part, cap, offset: int, B: int) -> None:
        layer, K, columns = part.layer, int(self.keep.numel()), part.scale
        root_n = self.n_samples ** -0.5
        if isinstance(part, _Factored):
            part.a[offset:offset + B] = cap.a[:, 0] * columns[0]
            part.g[offset:offset + B] = cap.g[:, self.keep, 0] * root_n
            return
        D = layer.sample_gradients(cap)[:, self.keep]  # (B, K', O, C)
        rows = (D * (columns * root_n)).reshape(B * K, -1)
        part.rows[offset * K:(offset + B) * K] = rows

    # ------------------------------------------------------------- kernel
    def _factorise(self, verbose: int) -> Tensor:
        """Cholesky factor of ``I + ŨŨᵀ`` from its lower triangle, in row blocks."""
        n, K = self.n_rows, int(self.keep.numel())
        kernel = torch.zeros(n, n, dtype=torch.float64)
        per_block = max(1, BLOCK_ROWS // K)
        starts = range(0, self.n_samples, per_block)
        for s0 in tqdm(starts, desc="kernel", unit="block", disable=not verbose,
                       leave=False):
            s1 = min(self.n_samples, s0 + per_block)
            block = kernel[s0 * K:s1 * K, :s1 * K]  # the rows' part on and below the diagonal
            for part in self.parts:
                if isinstance(part, _Factored):
                    g = part.g.reshape(-1, part.g.shape[-1])
                    gg = g[s0 * K:s1 * K] @ g[:s1 * K].T
                    aa = part.a[s0:s1] @ part.a[:s1].T
                    block += (gg.view(s1 - s0, K, s1, K) * aa[:, None, :, None]).view_as(block)
                else:
                    block.addmm_(part.rows[s0 * K:s1 * K], part.rows[:s1 * K].T)
        kernel.diagonal().add_(1.0)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:  # I + ŨŨᵀ ≥ I: only non-finite inputs get here
            raise ValueError("the Gauss–Newton kernel is not positive definite: the "
                             "network's outputs or gradients are not finite.")
        return factor

    # ------------------------------------------------------------- products
    def _rows_times(self, V: Tensor) -> Tensor:
        """``Ũ Vᵀ`` for scaled vectors ``V`` ``(k, P)``: ``(n, k)``."""
        out = V.new_zeros(self.n_rows, V.shape[0])
        for part in self.parts:
            M = part.layer.to_matrices(V)  # (k, O, C)
            if isinstance(part, _Materialised):
                out.addmm_(part.rows, M.reshape(M.shape[0], -1).T)
                continue
            for c in range(0, V.shape[0], RHS_CHUNK):
                Y = part.a @ M[c:c + RHS_CHUNK].transpose(1, 2)  # (k, N, O): W ã_i
                out[:, c:c + RHS_CHUNK] += torch.einsum("kno,nqo->nqk", Y, part.g).reshape(
                    self.n_rows, -1)
        return out

    def _rows_transposed_times(self, Z: Tensor, out: Tensor) -> None:
        """``out −= (Ũᵀ Z)ᵀ`` for ``Z`` ``(n, k)``, in place."""
        k = Z.shape[1]
        for part in self.parts:
            layer = part.layer
            if isinstance(part, _Materialised):
                M = (part.rows.T @ Z).T.reshape(k, layer.d_out, layer.n_cols)
            else:
                N, K = part.g.shape[:2]
                Zs = Z.view(N, K, k)
                M = torch.empty(k, layer.d_out, layer.n_cols, dtype=Z.dtype)
                for c in range(0, k, RHS_CHUNK):
                    E = torch.einsum("nqk,nqo->kon", Zs[..., c:c + RHS_CHUNK], part.g)
                    M[c:c + RHS_CHUNK] = E @ part.a  # Σ_i (Σ_q z g) ã_iᵀ
            layer.put(out, layer.to_matrices(out) - M)

    def solve(self, B: Tensor) -> Tensor:
        """``(G + D)⁻¹ b`` for each row ``b`` of ``B`` ``(k, P)``, float64."""
        Bs = B.to(torch.float64) * self.scale
        W = self._rows_times(Bs)
        Z = torch.cholesky_solve(W, self.factor)
        self._rows_transposed_times(Z, Bs)
        return Bs * self.scale


def _batch_size(capture) -> int:
    return int(capture[0].shape[0])


def _kept_root_columns(model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor,
                       batch_size: int | None) -> Tensor:
    """Root columns (ascending eigenvalue order) not negligible for some sample."""
    largest = None
    for xb, tb in iterate_batches(X, T, batch_size):
        with torch.no_grad():
            out = model.forward(theta, xb)
        w = torch.linalg.eigvalsh(model.loss.output_hessian(out, tb).to(torch.float64))
        top = w.max(dim=0).values
        largest = top if largest is None else torch.maximum(largest, top)
    K = largest.numel()
    negligible = largest <= K * torch.finfo(model.dtype).eps * float(largest.max())
    return (~negligible).nonzero().flatten()
