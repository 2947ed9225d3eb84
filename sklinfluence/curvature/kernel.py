"""The exact damped Gauss–Newton inverse in kernel (Woodbury) form.

With ``D = diag(μ) + λ`` (weight decay plus damping, positive) the damped
Gauss–Newton matrix (``G`` its data part ``(1/N) Σ_i J_iᵀ H_i J_i``) is

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

The rows of ``Ũ`` come from the layer captures of :mod:`sklinfluence.curvature.capture`
(one forward and one batched backward pass per chunk of samples, the
registered layer types of :mod:`sklinfluence.curvature.layers`) and, for every
parameter outside them (the *remainder*: attention, a bare ``nn.Parameter``,
any module type), from per-sample vector–Jacobian products with
``torch.func`` (:func:`~sklinfluence.curvature.kernel_rows.remainder_products`): the
kernel is a sum over parameter blocks, so the two add up and the kernel form
applies to any differentiable net. A registered layer that a capture pass
cannot describe (applied twice, a weight also used outside its call) joins the
remainder. Each layer keeps the cheaper of two forms:

- **factored**, for a layer whose per-sample gradients are outer products
  (:meth:`~sklinfluence.curvature.layers.KroneckerLayer.outer_factors`:
  ``nn.Linear`` applied to one row per sample) and whose ``D`` is
  the same down each column of ``[W | b]``: ``u_ik = g_ik ⊗ ã_i`` is never
  formed; its kernel block is ``(g_ik·g_jl)(ã_i·ã_j)`` and its products with
  vectors are matrix products with the captured ``ã`` and ``g`` — what keeps
  the CNN's 65,664-parameter ``Linear(512, 128)`` at 641 numbers per row;
- **materialised** rows ``(n, P_l)`` for any other layer (convolutions,
  embeddings, normalisation parameters) and for the remainder (``n·P_R``
  numbers, counted in the memory check).

The kernel's lower triangle is accumulated in blocks of sample rows (the
Cholesky factorisation reads only that triangle).

**Mixed precision** (``mixed_precision=True``): the kernel and its Cholesky
factor in float32 (the two ``O(n²P_m)`` and ``O(n³)`` steps, 2.5× faster on
one core, half the memory), then iterative refinement in float64: the
residual ``W − (I + ŨŨᵀ) Z`` from the float64 rows, corrected by another
float32 solve, until the parameter-space residual ``b − (G + D) x`` of the
checked right-hand sides meets ``tol``. Each round gains about ``‖I + ŨŨᵀ‖``
float32 roundings (the kernel's eigenvalues are ≥ 1, so its condition number is its
norm): on the digits CNN, ``‖I + ŨŨᵀ‖ ≈ 2,100``, the float32 solve is
within 1e-4 of the float64 influence matrix and one round within 3e-9. Where
float32 is too coarse for that (a failed float32 factorisation, or a round
gaining less than tenfold) the kernel is rebuilt and factorised in float64.
The float64 solutions are then refined in parameter space where they still
miss ``tol``: the Woodbury way back to parameters cancels, so the kernel
form alone can miss by far more than a dense float64 solve (1.9e-7 against
2.7e-10 on least squares with ``‖I + ŨŨᵀ‖ = 2e6``); one round of
``x += (G + D)⁻¹ r`` closes the gap. A ``tol`` below what float64 allows for
the conditioning (about ``eps·‖I + ŨŨᵀ‖``) is reported as missed, with why.
"""

from __future__ import annotations

import time
from itertools import chain

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..exceptions import NotEnoughMemoryError, UnsupportedLayerError
from ..model.functional import FunctionalModel
from ..utils.memory import format_bytes, memory_limit
from .capture import kronecker_passes
from .kernel_rows import (RHS_CHUNK, KernelProducts, Remainder, _Factored, _kept_root_columns,
                          _Materialised, aligned_batches, kernel_blocks, remainder_products)
from .layers import KroneckerLayer

__all__ = ["GaussNewtonKernel", "kernel_bytes", "kernel_applies", "kernel_verdict",
           "kernel_widths", "KERNEL_MAX_REFINEMENTS"]

#: Kernel rows accumulated per block (a ``BLOCK_ROWS × n`` work buffer).
BLOCK_ROWS = 1024
#: Most refinement rounds of a mixed-precision kernel solve, of each kind (float64
#: rounds on a float32 factor; rounds in parameter space on a float64 one).
KERNEL_MAX_REFINEMENTS = 5
#: Power iterations of :meth:`GaussNewtonKernel.norm` (only run to explain a missed tol).
NORM_ITERATIONS = 30


def kernel_bytes(n_rows: int, materialised_params: int, itemsize: int = 8) -> int:
    """Bytes the kernel form holds at its peak: kernel and factor (``2 s n²`` for
    ``s`` bytes per number) plus the float64 materialised rows (``8 n P_m``) and,
    in float32, their float32 copy (``4 n P_m``)."""
    copy = itemsize * n_rows * materialised_params if itemsize != 8 else 0
    return 2 * itemsize * n_rows ** 2 + 8 * n_rows * materialised_params + copy


def _diagonal(model: FunctionalModel, damping: float) -> Tensor:
    """``D = diag(μ) + λ`` per parameter, float64."""
    return model.damped_diagonal(damping).to(torch.float64)


def kernel_applies(model: FunctionalModel, X: Tensor, damping: float) -> str | None:
    """Why the kernel form does not apply to ``model`` on ``X``, or None if it does.

    It needs a positive ``D`` (weight decay plus damping), fewer kernel rows
    than parameters (``N·K ≤ P``) and ``16 (N·K)²`` bytes plus the
    materialised rows (those of the parameters outside registered layers
    included) within :func:`~sklinfluence.utils.memory.memory_limit`
    (:func:`kernel_verdict`). Any differentiable net qualifies otherwise.
    """
    applies, why = kernel_verdict(model, X, damping)
    return None if applies else why


def kernel_verdict(model: FunctionalModel, X: Tensor, damping: float) -> tuple[bool, str]:
    """Whether the kernel form applies to ``model`` on ``X``, and why (or why not).

    The conditions of :func:`kernel_applies`; the reason names the numbers
    (``"N·K = 6,000 kernel rows ≤ P = 71,754 parameters ..."``, and the
    parameters whose rows come from autograd, if any). Parameters outside
    registered layers do not disqualify a net: they count as materialised rows.
    """
    if float(_diagonal(model, damping).min()) <= 0:
        return False, "weight decay plus damping is not positive everywhere"
    layers, remainder = kernel_blocks(model)
    n_outputs = int(model.forward(model.params, X[:1]).shape[1])
    n = int(X.shape[0]) * n_outputs
    P = model.n_params
    if n > P:
        return False, f"the data give {n:,} kernel rows, more than the {P:,} parameters"
    needed = kernel_bytes(n, _materialised_bound(layers, remainder))
    limit = memory_limit()
    if limit is not None and needed > limit:
        return False, (f"solver='kernel' needs {format_bytes(needed)} "
                       f"({_needs(n, layers, remainder)}), more than the limit of "
                       f"{format_bytes(limit)}")
    rest = "" if remainder is None else (
        f"; the rows of {remainder.n_cols:,} parameters outside registered layers "
        "come from autograd")
    return True, (f"N·K = {n:,} kernel rows ≤ P = {P:,} parameters, and the kernel form "
                  f"fits in memory ({format_bytes(needed)}){rest}")


def _materialised_bound(layers: list[KroneckerLayer], remainder: Remainder | None) -> int:
    """Parameters that may keep materialised rows: the layers' but the ``factorable``
    ones (whose rows may be kept as outer-product factors), and the remainder."""
    return sum(layer.d_out * layer.n_cols for layer in layers if not layer.factorable) + (
        0 if remainder is None else remainder.n_cols)


def kernel_widths(model: FunctionalModel) -> tuple[int, list[tuple[int, int]]]:
    """What the kernel form's products run over, per kernel row: the parameters
    of materialised rows (:func:`_materialised_bound`) and the ``(d_out,
    n_cols)`` of each layer whose rows may be kept as outer-product factors
    (a factored layer's kernel block costs ``n²·d_out + N²·n_cols``, not
    ``n²·d_out·n_cols``). What the cost model of ``solver="auto"`` counts."""
    layers, remainder = kernel_blocks(model)
    return (_materialised_bound(layers, remainder),
            [(layer.d_out, layer.n_cols) for layer in layers if layer.factorable])


def _needs(n: int, layers: list, remainder: Remainder | None) -> str:
    """What the kernel's memory is made of, for the refusals."""
    m = _materialised_bound(layers, remainder)
    rest = "" if remainder is None else f", {remainder.n_cols:,} of them outside registered layers"
    return (f"n = N·K = {n:,} kernel rows: 16·n² = {format_bytes(16 * n ** 2)} for the "
            f"kernel and its factor, plus 8·n·P_m = {format_bytes(8 * n * m)} for the "
            f"rows of {m:,} parameters{rest}")


def _blocks_and_passes(model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor,
                       batch_size: int | None, n_columns: int):
    """``(layers, remainder, passes)``: the kernel's blocks (:func:`kernel_blocks`) and
    an iterator over their capture passes, one list of captures per batch (None
    without layers; see :func:`~sklinfluence.curvature.kernel_rows.aligned_batches`),
    batches sized for ``n_columns`` root columns of materialised rows.

    The first pass checks the captures against autograd; a layer it refuses
    (applied twice, a weight also used outside its call, inputs without a
    sample dimension) joins the remainder and the check is repeated — every
    layer at once where the refusal names none.
    """
    excluded: frozenset[str] = frozenset()
    while True:
        layers, remainder = kernel_blocks(model, excluded)
        if not layers:
            return layers, remainder, None
        row_bytes = 16 * n_columns * _materialised_bound(layers, remainder)  # rows, a copy
        passes = kronecker_passes(model, theta, layers, X, T, batch_size, row_bytes=row_bytes)
        try:
            first = next(passes)
        except UnsupportedLayerError as err:
            names = frozenset(getattr(err, "layer_names", None) or
                              (layer.name for layer in layers))
            excluded |= names
            continue
        return layers, remainder, chain([first], passes)




class GaussNewtonKernel(KernelProducts):
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
    mixed_precision : bool, default=False
        Kernel and factor in float32, solves refined in float64 to the ``tol``
        given to :meth:`solve` (see the module notes); False: float64
        throughout, exact to rounding.
    verbose : int, default=0
        Progress bar over the kernel's row blocks.

    Attributes
    ----------
    layers : list of KroneckerLayer
        The captured layers.
    remainder : Remainder or None
        The parameters whose rows come from autograd (outside ``layers``).

    Raises
    ------
    NotEnoughMemoryError
        Before allocating, if the kernel, its factor and the materialised
        rows exceed :func:`~sklinfluence.utils.memory.memory_limit`.
    ValueError
        If ``D`` is not positive.
    """

    def __init__(self, model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor, *,
                 damping: float, batch_size: int | None = None, mixed_precision: bool = False,
                 verbose: int = 0) -> None:
        start = time.perf_counter()
        diagonal = _diagonal(model, damping)
        if float(diagonal.min()) <= 0:
            raise ValueError("solver='kernel' needs weight decay plus damping > 0 for every "
                             "parameter (the kernel form scales by D^{-1/2}); increase "
                             "damping.")
        self.scale = diagonal.rsqrt()  # D^{-1/2}
        self.n_samples = N = int(X.shape[0])
        self.keep = _kept_root_columns(model, theta, X, T, batch_size)
        K = int(self.keep.numel())
        self.layers, self.remainder, passes = _blocks_and_passes(model, theta, X, T,
                                                                 batch_size, K)
        self.n_rows = n = N * K
        self.parts: list | None = None
        self.verbose = verbose
        self.fallback: str | None = None
        self._coefficients = None
        self._norm: float | None = None
        self.last_residual, self.last_rounds, self.last_stop = None, 0, None
        self._dtype = torch.float32 if mixed_precision else torch.float64
        offset = 0
        for xb, tb, captures in aligned_batches(passes, X, T, batch_size):
            B = int(xb.shape[0])
            if self.parts is None:
                self.parts = self._allocate(captures, n)
            for part, cap in zip(self.parts, captures):
                self._store(part, cap, offset, B)
            if self.remainder is not None:
                self._store_remainder(model, theta, xb, tb, offset)
            offset += B
        captured = time.perf_counter()
        self.factor = self._factorise()
        self.info = {"kernel_rows": n, "root_columns": K,
                     "precision": str(self.factor.dtype).removeprefix("torch."),
                     "fallback": self.fallback, "materialised_params": self._sizes[0],
                     "autograd_params": 0 if self.remainder is None else self.remainder.n_cols,
                     "capture_seconds": captured - start,
                     "factor_seconds": time.perf_counter() - captured,
                     # held once factorised: the factor (the kernel is freed) and the rows
                     "memory_bytes": self.factor.element_size() * n ** 2 + sum(
                         8 * sum(t.numel() for t in part.tensors()) for part in self.parts)}

    # ----------------------------------------------------------- rows of Ũ
    def _allocate(self, captures: list, n: int) -> list:
        """Choose each layer's form from the first batch; check memory; allocate
        (the remainder's rows last)."""
        forms, scales = [], []
        for layer, cap in zip(self.layers, captures):
            columns = layer.to_matrices(self.scale.unsqueeze(0))[0]  # D^{-1/2}, (O, C)
            factored = (layer.outer_factors(cap) is not None
                        and bool((columns == columns[:1]).all()))
            forms.append(factored)
            scales.append(columns)
        materialised = sum(layer.d_out * layer.n_cols
                           for layer, factored in zip(self.layers, forms) if not factored)
        if self.remainder is not None:
            materialised += self.remainder.n_cols
        factored_numbers = sum(self.n_samples * layer.n_cols + n * layer.d_out
                               for layer, factored in zip(self.layers, forms) if factored)
        self._sizes = materialised, factored_numbers
        self._check_memory("Nothing was allocated.")
        parts = []
        for layer, factored, scale in zip(self.layers, forms, scales):
            if factored:
                parts.append(_Factored(layer, scale, torch.empty(
                    self.n_samples, layer.n_cols, dtype=torch.float64), torch.empty(
                    self.n_samples, n // self.n_samples, layer.d_out, dtype=torch.float64)))
            else:
                parts.append(_Materialised(layer, scale, torch.empty(
                    n, layer.d_out * layer.n_cols, dtype=torch.float64)))
        if self.remainder is not None:
            parts.append(_Materialised(
                self.remainder, self.remainder.to_matrices(self.scale.unsqueeze(0))[0],
                torch.empty(n, self.remainder.n_cols, dtype=torch.float64)))
        return parts

    def _check_memory(self, state: str) -> None:
        """Raise before allocating a kernel in ``self._dtype`` that does not fit."""
        n, (materialised, factored_numbers) = self.n_rows, self._sizes
        itemsize = torch.finfo(self._dtype).bits // 8
        needed = kernel_bytes(n, materialised, itemsize) + 8 * factored_numbers
        limit = memory_limit()
        if limit is not None and needed > limit:
            rest = "" if self.remainder is None else \
                f", {self.remainder.n_cols:,} of them outside registered layers"
            raise NotEnoughMemoryError(
                f"solver='kernel' (the kernel form of the damped Gauss–Newton inverse, in "
                f"{self._dtype}) needs {format_bytes(needed)}: n = N·K = {n:,} kernel rows, "
                f"{2 * itemsize}·n² = {format_bytes(2 * itemsize * n ** 2)} for the kernel "
                f"and its factor, plus {format_bytes(needed - 2 * itemsize * n ** 2)} for "
                f"the rows of {materialised:,} parameters{rest} — more than the limit of "
                f"{format_bytes(limit)} (set_config(memory_limit_bytes=...)). {state} "
                "Use solver='cg' (matrix-free block conjugate gradients, the same inverse "
                "to its tol).")

    def _store(self, part, cap, offset: int, B: int) -> None:
        layer, K, columns = part.layer, int(self.keep.numel()), part.scale
        root_n = self.n_samples ** -0.5
        if isinstance(part, _Factored):
            a, g = layer.outer_factors(cap)
            part.a[offset:offset + B] = a * columns[0]
            part.g[offset:offset + B] = g[:, self.keep] * root_n
            return
        D = layer.sample_gradients(cap)[:, self.keep]  # (B, K', O, C)
        rows = (D * (columns * root_n)).reshape(B * K, -1)
        part.rows[offset * K:(offset + B) * K] = rows

    def _store_remainder(self, model: FunctionalModel, theta: Tensor, xb: Tensor, tb: Tensor,
                         offset: int) -> None:
        """The remainder's rows for the batch ``(xb, tb)`` from autograd, with the
        output-Hessian roots the capture pass of the same batch uses (the
        blocks' rows must share them)."""
        K, part = int(self.keep.numel()), self.parts[-1]
        with torch.no_grad():
            root = model.loss.output_hessian_root(model.forward(theta, xb), tb)
        rows = remainder_products(model, theta, self.remainder, xb,
                                  root[:, :, self.keep].transpose(1, 2))  # (B, K', P_R)
        rows *= part.scale[0] * self.n_samples ** -0.5
        part.rows[offset * K:(offset + xb.shape[0]) * K] = rows.reshape(-1, rows.shape[-1])

    # ------------------------------------------------------------- kernel
    def _factorise(self) -> Tensor:
        """Cholesky factor of ``I + ŨŨᵀ`` from its lower triangle, in row blocks, in
        the kernel's precision (float64 where float32 fails to factorise)."""
        n, K, dtype = self.n_rows, int(self.keep.numel()), self._dtype
        kernel = torch.zeros(n, n, dtype=dtype)
        per_block = max(1, BLOCK_ROWS // K)
        parts = [[t.to(dtype).reshape(t.shape[0], -1) if isinstance(part, _Materialised) else
                  t.to(dtype) for t in part.tensors()] for part in self.parts]
        starts = range(0, self.n_samples, per_block)
        for s0 in tqdm(starts, desc=f"kernel ({dtype})", unit="block",
                       disable=not self.verbose, leave=False):
            s1 = min(self.n_samples, s0 + per_block)
            block = kernel[s0 * K:s1 * K, :s1 * K]  # the rows' part on and below the diagonal
            for tensors in parts:
                if len(tensors) == 2:  # factored: ã (N, C), g (N, K', O)
                    a, g = tensors[0], tensors[1].reshape(n, -1)
                    gg = g[s0 * K:s1 * K] @ g[:s1 * K].T
                    aa = a[s0:s1] @ a[:s1].T
                    block.view(s1 - s0, K, s1, K).addcmul_(gg.view(s1 - s0, K, s1, K),
                                                           aa[:, None, :, None])
                else:
                    rows = tensors[0]
                    block.addmm_(rows[s0 * K:s1 * K], rows[:s1 * K].T)
        del parts
        kernel.diagonal().add_(1.0)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0 and dtype != torch.float64:
            return self._to_float64("the float32 factorisation failed")
        if int(info) != 0:  # I + ŨŨᵀ ≥ I: only non-finite inputs get here
            raise ValueError("the Gauss–Newton kernel is not positive definite: the "
                             "network's outputs or gradients are not finite.")
        return factor

    def _to_float64(self, why: str) -> Tensor:
        """Rebuild and factorise the kernel in float64 (float32 was too coarse)."""
        self.factor = None  # free the float32 factor first
        self._dtype, self._norm = torch.float64, None
        self.fallback = why
        self._check_memory(f"The float32 kernel was too coarse ({why}).")
        self.factor = self._factorise()
        if hasattr(self, "info"):  # built: record the switch
            self.info.update(precision="float64", fallback=why)
        return self.factor

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

    def _kernel_solve(self, W: Tensor) -> Tensor:
        """``(I + ŨŨᵀ)⁻¹ W`` with the factor, in its precision; float64 result.

        Two triangular solves: 4.4× faster than ``torch.cholesky_solve`` on
        float64 (10,800 rows, 300 right-hand sides, one thread), the same numbers.
        """
        L = self.factor
        Y = torch.linalg.solve_triangular(L, W.to(L.dtype), upper=False)
        return torch.linalg.solve_triangular(L.mT, Y, upper=True).to(torch.float64)

    def _scaled_residual(self, Xs: Tensor, Bs: Tensor) -> Tensor:
        """``D^{-1/2}(b − (G + D) x) = Bs − (I + ŨᵀŨ) Xs`` per row, from scaled
        ``Xs = D^{1/2} x`` and ``Bs = D^{-1/2} b``."""
        R = Bs - Xs
        self._rows_transposed_times(self._rows_times(Xs), R)
        return R

    def _relative_residual(self, Xs: Tensor, Bs: Tensor) -> Tensor:
        """``‖b − (G + D) x‖ / ‖b‖`` per row, from scaled ``Xs = D^{1/2} x`` and
        ``Bs = D^{-1/2} b``: ``(G + D) x = D^{1/2}(Xs + ŨᵀŨ Xs)``."""
        R = self._scaled_residual(Xs, Bs) / self.scale
        return R.norm(dim=1) / (Bs / self.scale).norm(dim=1).clamp_min(
            torch.finfo(R.dtype).tiny)

    def norm(self) -> float:
        """``‖I + ŨŨᵀ‖``, the condition number of the scaled damped Gauss–Newton
        matrix ``I + ŨᵀŨ`` (its eigenvalues are ≥ 1), by power iteration on the
        factor (:data:`NORM_ITERATIONS` products ``L(Lᵀv)``; cached)."""
        if self._norm is None:
            L = self.factor.to(torch.float64)
            v = torch.ones(L.shape[0], dtype=torch.float64)
            value = 1.0
            for _ in range(NORM_ITERATIONS):
                w = L @ (L.T @ v)
                value = float(w.norm())
                v = w / value
            self._norm = max(value, 1.0)
        return self._norm

    def _solve_kernel(self, W: Tensor, Bs: Tensor, tol: float | None,
                      rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(Z, Xs)``: ``Z ≈ (I + ŨŨᵀ)⁻¹ W`` for ``W = Ũ Bsᵀ``, ``Bs`` the scaled
        right-hand sides ``D^{-1/2} b``, and the scaled solutions ``Xs = D^{1/2} x``
        where they were refined in parameter space (``None``: ``Xs = Bs − ŨᵀZ``).

        Without ``tol``: one solve with the factor. With ``tol``, until the
        relative residual ``‖b − (G + D) x‖ / ‖b‖`` of the right-hand sides
        ``rows`` is at most ``tol``:

        1. a float32 factor: rounds of float64 refinement of the kernel
           equation (:data:`KERNEL_MAX_REFINEMENTS` at most; a round gaining less
           than tenfold switches the kernel to float64 for good);
        2. a float64 factor: rounds of refinement of ``x`` itself,
           ``x += (G + D)⁻¹ r`` through the kernel form with ``r`` the float64
           residual (:data:`KERNEL_MAX_REFINEMENTS` at most, while each gains
           tenfold). The kernel form's own float64 solve can miss by far more
           than a dense one — its way back to parameters, ``Bs − ŨᵀZ``,
           cancels: 1.9e-7 where a dense Cholesky reaches 2.7e-10 —; a round
           brings it to the dense solve's level (1.6e-10 there). ``Z`` follows
           the corrections, so ``Ũ Xs ≈ Z`` still.

        Records ``last_residual`` (largest checked relative residual, None if
        not measured), ``last_rounds`` (both kinds) and ``last_stop``: ``None``
        when ``tol`` was met (or not given), else why not.
        """
        Z = self._kernel_solve(W)
        self.last_residual, self.last_rounds, self.last_stop = None, 0, None
        if tol is None or not W.shape[1]:
            return Z, None
        residual = self._checked(Bs, Z, rows)
        while (residual > tol and self.factor.dtype != torch.float64
               and self.last_rounds < KERNEL_MAX_REFINEMENTS):
            UtZ = W.new_zeros((W.shape[1], self.scale.numel()))
            self._rows_transposed_times(Z, UtZ)  # −(ŨᵀZ)ᵀ
            Z += self._kernel_solve(W - Z + self._rows_times(UtZ))  # W − (I + ŨŨᵀ) Z
            self.last_rounds += 1
            previous, residual = residual, self._checked(Bs, Z, rows)
            if residual > tol and residual > 0.1 * previous:
                self._to_float64(f"a float64 refinement round took the residual from "
                                 f"{previous:.1e} only to {residual:.1e}")
                Z = self._kernel_solve(W)
                residual = self._checked(Bs, Z, rows)
        Xs, rounds = None, 0
        while (residual > tol and self.factor.dtype == torch.float64
               and rounds < KERNEL_MAX_REFINEMENTS):
            if Xs is None:
                Xs = Bs.clone()
                self._rows_transposed_times(Z, Xs)  # Bs − ŨᵀZ
            R = self._scaled_residual(Xs, Bs)
            Z_R = self._kernel_solve(self._rows_times(R))
            Z += Z_R
            self._rows_transposed_times(Z_R, R)  # the correction R − ŨᵀZ_R, in place
            Xs += R
            rounds += 1
            previous = residual
            residual = float(self._relative_residual(Xs[rows], Bs[rows]).max())
            if residual > previous:  # at the floor, rounding went the wrong way: undo
                Xs -= R
                Z -= Z_R
                residual = previous
            if residual > 0.1 * previous:
                break
        self.last_rounds += rounds
        self.last_residual = residual
        if residual > tol:
            self.last_stop = self._why_short(residual, tol)
        return Z, Xs

    def _why_short(self, residual: float, tol: float) -> str:
        """Why a solve stopped at ``residual`` above ``tol`` (after :meth:`_solve_kernel`)."""
        if self.factor.dtype != torch.float64:
            return (f"the float32 refinement stopped after {KERNEL_MAX_REFINEMENTS} rounds "
                    f"(sklinfluence.curvature.kernel.KERNEL_MAX_REFINEMENTS) at a relative residual of "
                    f"{residual:.1e}, above tol={tol:g}, each round still gaining tenfold.")
        norm = self.norm()
        floor = torch.finfo(torch.float64).eps * norm
        return (f"the float64 solve, refined in parameter space until its rounds stopped "
                f"gaining tenfold, stopped at a relative residual of {residual:.1e}, above "
                f"tol={tol:g}. Backward-stable float64 solves guarantee about eps·‖I + ŨŨᵀ‖ "
                f"= {floor:.1e} for this conditioning (‖I + ŨŨᵀ‖ = {norm:.1e} is the "
                f"condition number of the damped Gauss–Newton matrix in the kernel's "
                f"scaling), a dense Cholesky solve too. Use tol >= {10 * residual:.0e}, or "
                f"more damping (the condition number falls as it grows).")

    def _checked(self, Bs: Tensor, Z: Tensor, rows: Tensor) -> float:
        """Largest relative residual of ``Xs = Bs − ŨᵀZ`` over ``rows``."""
        Xs = Bs[rows]
        self._rows_transposed_times(Z[:, rows], Xs)
        return float(self._relative_residual(Xs, Bs[rows]).max())

    def solve(self, B: Tensor, tol: float | None = None,
              check_rows: Tensor | None = None) -> Tensor:
        """``(G + D)⁻¹ b`` for each row ``b`` of ``B`` ``(k, P)``, float64.

        Without ``tol`` one solve with the factor; with ``tol`` (what the
        mixed-precision solver passes) refined until the rows ``check_rows``
        (all by default) meet it (:meth:`_solve_kernel`), recording
        ``last_residual``, ``last_rounds`` and ``last_stop``.
        """
        Bs = B.to(torch.float64) * self.scale
        rows = torch.arange(B.shape[0]) if check_rows is None else check_rows
        Z, Xs = self._solve_kernel(self._rows_times(Bs), Bs, tol, rows)
        if Xs is None:
            self._rows_transposed_times(Z, Bs)  # Xs = Bs − ŨᵀZ, in place
            Xs = Bs
        return Xs * self.scale
