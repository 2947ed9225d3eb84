"""The rows of the kernel form and the products of its inverse with gradients.

The parameters split into blocks (:func:`kernel_blocks`): the registered layers,
whose rows come from layer captures, and the **remainder** — every parameter
outside them (attention, a bare ``nn.Parameter``, a layer type without
registry entry or one used in a way its capture cannot describe) — whose rows
``N^{-1/2} D^{-1/2} J_iᵀ L_i[:, k]`` are per-sample vector–Jacobian products
from autograd (:func:`remainder_products`: ``torch.func.vmap`` over samples of
``vjp``). The kernel is a sum over blocks, ``ŨŨᵀ = Σ_b Ũ_b Ũ_bᵀ``, so the two
add up, and a net without any registered layer is all remainder.

Each layer keeps its rows of ``Ũ`` in one of two forms (:class:`_Factored`,
:class:`_Materialised`; the remainder is always materialised);
:class:`KernelProducts`, which
:class:`~sklinfluence.curvature.kernel.GaussNewtonKernel` inherits, turns the
factorised kernel into what influence needs: products with loss gradients
(influence matrices), quadratic forms (self-influence) and the training rows'
coefficients that make most removals gradient-free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ..exceptions import UnsupportedLayerError
from ..model.functional import FunctionalModel, iterate_batches
from ..utils.memory import chunk_rows
from .capture import kronecker_passes
from .layers import LAYER_TYPES, KroneckerLayer

__all__ = ["KernelProducts", "QUADRATIC_BYTES", "RHS_CHUNK", "Remainder", "kernel_blocks",
           "remainder_products", "aligned_batches"]

#: Right-hand sides pushed through the factored layers' products at once.
RHS_CHUNK = 64
#: Bytes of parameter-space products held at once by :meth:`KernelProducts.quadratic_forms`.
QUADRATIC_BYTES = 128 * 2**20


@dataclass(eq=False)
class Remainder:
    """The trainable parameters outside the kernel's registered layers, as one block
    laid out like a layer of one row (``d_out = 1``, ``n_cols = P_R``), so that the
    kernel's products treat it as a materialised layer.

    Attributes
    ----------
    names : tuple of str
        The parameter tensors' names, in parameter order.
    tensors : tuple of int
        Their positions in ``model.param_names``.
    index : Tensor
        Their flat positions in the parameter vector (int64, ascending).
    """

    names: tuple[str, ...]
    tensors: tuple[int, ...]
    index: Tensor
    name: ClassVar[str] = "<remainder>"
    d_out: ClassVar[int] = 1
    factorable: ClassVar[bool] = False

    @property
    def n_cols(self) -> int:
        """``P_R``, the parameters in the block."""
        return int(self.index.numel())

    def to_matrices(self, V: Tensor) -> Tensor:
        """Rows of flat vectors → ``(k, 1, P_R)``."""
        return V[:, self.index.to(V.device)].unsqueeze(1)

    def put(self, V: Tensor, M: Tensor) -> None:
        """Write ``(k, 1, P_R)`` matrices into the block's entries of the rows of ``V``."""
        V[:, self.index.to(V.device)] = M.reshape(M.shape[0], -1)


def kernel_blocks(model: FunctionalModel, exclude: frozenset[str] = frozenset()
                  ) -> tuple[list[KroneckerLayer], Remainder | None]:
    """The kernel form's blocks: the registered layers it captures and the remainder.

    A module of a registered layer type (:data:`~sklinfluence.curvature.layers.LAYER_TYPES`)
    is captured unless its name is in ``exclude``, its type refuses its
    configuration (``UnsupportedLayerError`` from its ``build``: a grouped
    convolution, a trainable bias on a frozen weight...) or it shares a
    parameter with another module (tied weights); every other trainable
    parameter is the remainder's.

    Parameters
    ----------
    model : FunctionalModel
        The network.
    exclude : frozenset of str, optional
        Layer names to leave to the remainder (those a capture pass refused).

    Returns
    -------
    layers : list of KroneckerLayer
        In module order.
    remainder : Remainder or None
        None when the layers hold every trainable parameter.
    """
    starts = torch.tensor([0] + model.param_numels).cumsum(0).tolist()
    offsets = {name: slice(starts[j], starts[j + 1]) for j, name in enumerate(model.param_names)}
    trainable = {id(p): name for name, p in model.module.named_parameters() if name in offsets}
    candidates = []
    for layer_name, module in model.module.named_modules():
        kind = next((cls for cls in LAYER_TYPES if cls.handles(module)), None)
        if kind is not None and (layer_name or "<module>") not in exclude:
            owned = {attr: trainable.get(id(getattr(module, attr, None)))
                     for attr in kind.param_attrs if getattr(module, attr, None) is not None}
            candidates.append((layer_name or "<module>", module, kind, owned))
    claims = Counter(p for *_, owned in candidates for p in set(owned.values()) - {None})
    layers, covered = [], set()
    for layer_name, module, kind, owned in candidates:
        if any(claims[p] > 1 for p in owned.values() if p is not None):
            continue  # tied to another module: autograd sees both uses
        try:
            layer = kind.build(layer_name, module, {attr: None if p is None else offsets[p]
                                                    for attr, p in owned.items()})
        except UnsupportedLayerError:
            continue
        if layer is not None:
            layers.append(layer)
            covered.update(set(owned.values()) - {None})
    rest = [j for j, name in enumerate(model.param_names) if name not in covered]
    if not rest:
        return layers, None
    index = torch.cat([torch.arange(starts[j], starts[j + 1]) for j in rest])
    return layers, Remainder(tuple(model.param_names[j] for j in rest), tuple(rest), index)


def remainder_products(model: FunctionalModel, theta: Tensor, block: Remainder, X: Tensor,
                       cotangents: Tensor) -> Tensor:
    """``J_{i,R}ᵀ c_iq``: each sample's output Jacobian on the remainder's parameters,
    transposed, times its cotangent columns, ``(N, Q, P_R)`` float64.

    ``torch.func.vmap`` over samples of a ``vjp`` (itself ``vmap``-ed over the
    ``Q`` columns of ``cotangents`` ``(N, Q, K)``), in chunks of samples that
    keep ``Q (P + P_R)`` numbers per sample within
    :func:`~sklinfluence.utils.memory.working_memory`: with the output
    Hessian's root columns these are the remainder's kernel rows (unscaled),
    with the loss gradient ``∇_y L_i`` (``Q = 1``) its part of ``∇L_i``.
    """
    pieces = list(torch.split(theta.detach(), model.param_numels))

    def sample(theta_R: tuple[Tensor, ...], x: Tensor, cot: Tensor) -> Tensor:
        def outputs(*values: Tensor) -> Tensor:
            full = list(pieces)
            for j, value in zip(block.tensors, values):
                full[j] = value
            return model.forward(torch.cat(full), x.unsqueeze(0))[0]

        _, pull = vjp(outputs, *theta_R)
        return torch.cat(vmap(pull)(cot), dim=-1)  # (Q, P_R)

    per_sample = vmap(sample, in_dims=(None, 0, 0))
    theta_R = tuple(pieces[j] for j in block.tensors)
    Q, itemsize = cotangents.shape[1], theta.element_size()
    step = chunk_rows(3 * itemsize * Q * (model.n_params + block.n_cols), X.shape[0])
    out = torch.empty((X.shape[0], Q, block.n_cols), dtype=torch.float64)
    for s in range(0, X.shape[0], step):
        out[s:s + step] = per_sample(theta_R, X[s:s + step], cotangents[s:s + step].to(
            theta.dtype))
    return out


def aligned_batches(passes: Iterable[list] | None, X: Tensor, T: Tensor,
                    batch_size: int | None) -> Iterator[tuple[Tensor, Tensor, list]]:
    """``(xb, tb, captures)``: each capture pass of ``passes`` with its samples (the
    passes size their own batches where ``batch_size`` is None), so that the
    remainder's rows are computed on the captures' batches; without layers
    (``passes`` None) the batches of ``batch_size``, with no captures."""
    if passes is None:
        for xb, tb in iterate_batches(X, T, batch_size):
            yield xb, tb, []
        return
    offset = 0
    for captures in passes:
        B = int(captures[0][0].shape[0])
        yield X[offset:offset + B], T[offset:offset + B], captures
        offset += B


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


class KernelProducts:
    """The kernel's products with gradients; mixed into
    :class:`~sklinfluence.curvature.kernel.GaussNewtonKernel`, whose factor, rows
    (``parts``), ``scale`` and solves they use."""

    def gradient_rows(self, model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor,
                      batch_size: int | None = None) -> Tensor:
        """``Ũ D^{-1/2} ∇L_e`` for each sample ``e`` of ``(X, T)``, ``(n, len(X))``.

        From layer captures of the loss gradients, never forming them: a
        factored layer's block is ``(g_ik·δ_e)(ã_i·D^{-1/2}a_e)``, a
        materialised one's the rows times the sample's (small) layer gradient
        — on the digits CNN 300 samples cost 0.5 s, against 1.5 s for their
        71,754-number gradients and the same product with them. The
        remainder's part of each gradient, ``J_{e,R}ᵀ ∇_y L_e``, comes from
        autograd (:func:`remainder_products`).
        """
        out = []
        passes = None if not self.layers else kronecker_passes(
            model, theta, self.layers, X, T, batch_size, check=False, gradients=True,
            row_bytes=8 * (self.n_rows + sum(p.layer.d_out * p.layer.n_cols for p in self.parts
                                             if isinstance(p, _Materialised))))
        for xb, tb, captures in aligned_batches(passes, X, T, batch_size):
            W = torch.zeros((self.n_rows, xb.shape[0]), dtype=torch.float64)
            for part, cap in zip(self.parts, captures):
                if isinstance(part, _Factored):
                    a, g = part.layer.outer_factors(cap)
                    a = a.to(torch.float64) * part.scale[0]  # (B, C)
                    delta = g[:, 0].to(torch.float64)  # (B, O)
                    gd = part.g.reshape(-1, part.g.shape[-1]) @ delta.T  # (n, B)
                    aa = part.a @ a.T  # (N, B)
                    W += (gd.view(self.n_samples, -1, gd.shape[1]) * aa[:, None]).reshape(
                        gd.shape)
                else:
                    D = part.layer.sample_gradients(cap)[:, 0].to(torch.float64) * part.scale
                    W.addmm_(part.rows, D.reshape(D.shape[0], -1).T)
            if self.remainder is not None:
                with torch.no_grad():
                    grad_y = model.loss.output_grad(model.forward(theta, xb), tb)
                D = remainder_products(model, theta, self.remainder, xb, grad_y[:, None])
                part = self.parts[-1]
                W.addmm_(part.rows, (D[:, 0] * part.scale[0]).T)
            out.append(W)
        return torch.cat(out, dim=1) if out else torch.zeros((self.n_rows, 0),
                                                             dtype=torch.float64)

    def removal_products(self, W: Tensor, B: Tensor, n_removals: int, *, rows: Tensor,
                         owner: Tensor, forces: Tensor, forces_rows: Tensor,
                         forced: Tensor, tol: float | None = None,
                         check_rows: Tensor | None = None) -> Tensor:
        """``[s, e] = g_sᵀ (G + D)⁻¹ b_e`` for removals ``s``, ``(n_removals, k)``.

        ``W = Ũ D^{-1/2} Bᵀ`` (:meth:`gradient_rows`). A training sample's
        gradient lies in the row space of its own rows of ``Ũ``:
        ``∇L_i = D^{1/2} Ũ_iᵀ c_i`` with ``c_i = √N L_i⁺ ∇_y L_i``
        (:meth:`coefficients`), so ``∇L_iᵀ (G + D)⁻¹ b = c_iᵀ Z_i`` with
        ``Z = (I + ŨŨᵀ)⁻¹ W`` — the solve's kernel half, without its way back
        to parameters nor the gradient. The removals made of such rows give
        training positions ``rows`` (eligible ones) and their ``owner``
        removal; the others their gradients ``forces`` and
        ``forces_rows = Ũ D^{-1/2} forcesᵀ`` (one per removal ``forced``),
        through ``gᵀ(G + D)⁻¹b = (D^{-1/2}g)ᵀ(D^{-1/2}b) − (Ũ D^{-1/2} g)ᵀ Z``, or
        ``(D^{-1/2}g)ᵀ Xs`` where :meth:`_solve_kernel` refined the solutions
        ``Xs`` in parameter space (``Z`` follows them: ``Ũ Xs ≈ Z``).
        """
        Bs = B.to(torch.float64) * self.scale
        check = torch.arange(B.shape[0]) if check_rows is None else check_rows
        Z, Xs = self._solve_kernel(W, Bs, tol, check)
        out = Z.new_zeros((n_removals, Z.shape[1]))
        if rows.numel():
            C = self._coefficients[0]
            picked = Z.view(self.n_samples, int(self.keep.numel()), -1)[rows]  # (r, K', k)
            out.index_add_(0, owner, torch.einsum("rq,rqe->re", C[rows], picked))
        if forces.shape[0]:
            Fs = forces.to(torch.float64) * self.scale
            out[forced] += Fs @ Bs.T - forces_rows.T @ Z if Xs is None else Fs @ Xs.T
        return out

    def quadratic_forms(self, W: Tensor) -> Tensor:
        """``wᵀ (I + ŨŨᵀ)⁻¹ w = ‖L⁻¹w‖²`` for each column ``w`` of ``W`` ``(n, k)``,
        in the factor's precision (float64 result).

        What self-influence needs: a removal's ``gᵀ (G + D)⁻¹ g`` is
        ``‖D^{-1/2}g‖² − wᵀ(I + ŨŨᵀ)⁻¹w`` with ``w = Ũ D^{-1/2} g``, and for a
        removal of training rows ``w`` holds their coefficients ``c_i``
        (:meth:`coefficients`) in their own blocks, ``‖D^{-1/2}g‖²``
        replaced by ``‖w‖²`` — the diagonal blocks of the inverse: one
        triangular solve, skipping the leading zero rows of each chunk of
        columns, no solve per row and no way back to parameters. Exact to
        rounding with a float64 factor; see :meth:`refined_forms` for a
        float32 one.
        """
        Y = self._forward_solve(W)
        return (Y * Y).sum(dim=0)

    def refined_forms(self, W: Tensor, check_rows: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
        """``(q, error)``: the forms of :meth:`quadratic_forms` to float64 accuracy
        from a float32 factor, and an estimate of their error on the columns
        ``check_rows`` (all by default).

        The variational form ``q = 2 wᵀz − zᵀ(I + ŨŨᵀ)z`` of the float32
        solution ``z`` (products in float64) is a lower bound of the true form
        whose error ``(z − z*)ᵀ(I + ŨŨᵀ)(z − z*) = rᵀ(I + ŨŨᵀ)⁻¹r`` is second
        order in the float32 residual ``r = w − (I + ŨŨᵀ)z``; ``error`` is that
        quantity with the float32 factor. Costs one product ``ŨᵀZ`` per column
        (in chunks of :data:`QUADRATIC_BYTES`) and one ``ŨV`` per checked one.
        """
        k, P = W.shape[1], self.scale.numel()
        rows = torch.arange(k) if check_rows is None else check_rows
        Z = self._kernel_solve(W)
        W = W.to(torch.float64)
        q = 2 * (W * Z).sum(dim=0) - (Z * Z).sum(dim=0)
        chunk = max(1, QUADRATIC_BYTES // (8 * P))
        for c in range(0, k, chunk):
            UtZ = Z.new_zeros((min(k, c + chunk) - c, P))
            self._rows_transposed_times(Z[:, c:c + chunk], UtZ)  # −(ŨᵀZ)ᵀ
            q[c:c + chunk] -= (UtZ * UtZ).sum(dim=1)
        UtZ = Z.new_zeros((rows.numel(), P))
        self._rows_transposed_times(Z[:, rows], UtZ)
        R = W[:, rows] - Z[:, rows] + self._rows_times(UtZ)  # w − z − ŨŨᵀz
        return q, (R * self._kernel_solve(R)).sum(dim=0)

    def _forward_solve(self, W: Tensor) -> Tensor:
        """``L⁻¹ W`` in the factor's precision (float64 result), chunks of columns
        starting at their first non-zero row (a training row's column is zero
        above its own block)."""
        L, k = self.factor, W.shape[1]
        out = W.new_zeros(W.shape, dtype=torch.float64)
        nonzero = W != 0
        first = torch.where(nonzero.any(dim=0), nonzero.to(torch.int8).argmax(dim=0),
                            W.shape[0])
        order = torch.argsort(first)
        for c in range(0, k, RHS_CHUNK * 4):
            cols = order[c:c + RHS_CHUNK * 4]
            f = int(first[cols].min())
            if f >= W.shape[0]:
                continue
            out[f:, cols] = torch.linalg.solve_triangular(
                L[f:, f:], W[f:, cols].to(L.dtype), upper=False).to(torch.float64)
        return out

    def coefficients(self, model: FunctionalModel, theta: Tensor, X: Tensor, T: Tensor,
                     batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """``(C, eligible)``: each training sample's ``c_i`` ``(N, K')`` and whether
        its gradient is in its rows' span (cached after the first call).

        ``c_i = √N L_i⁺ ∇_y L_i`` on the kept root columns; a sample is
        eligible when ``L_i c_i`` reproduces ``√N ∇_y L_i`` to ``1e-10`` of its
        norm (1,000 roundings for a float32 net) — not where the output Hessian
        has vanished along the gradient (saturated outputs: a sigmoid at
        probability 1, a softmax class at 0).
        """
        if self._coefficients is None:
            Cs, ok = [], []
            root_n = self.n_samples ** 0.5
            close = max(1e-10, 1e3 * torch.finfo(model.dtype).eps)
            for xb, tb in iterate_batches(X, T, batch_size):
                with torch.no_grad():
                    out = model.forward(theta, xb)
                # the capture's roots (same batches, same dtype): orthogonal columns
                L = model.loss.output_hessian_root(out, tb)[:, :, self.keep].to(torch.float64)
                r = model.loss.output_grad(out, tb).to(torch.float64)
                w = (L * L).sum(dim=1)  # the columns' eigenvalues
                c = torch.where(w > 0, torch.einsum("bjk,bj->bk", L, r)
                                / w.clamp_min(torch.finfo(w.dtype).tiny), 0)
                rebuilt = torch.einsum("bjk,bk->bj", L, c)
                ok.append((rebuilt - r).norm(dim=1) <= close * r.norm(dim=1))
                Cs.append(root_n * c)
            self._coefficients = (torch.cat(Cs), torch.cat(ok))
        return self._coefficients


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
