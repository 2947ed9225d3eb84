"""Extreme eigenpairs of the damped curvature, matrix-free.

Lanczos (scipy's ARPACK ``eigsh``, the symmetric form of the Arnoldi
iteration) on the curvature's products: the top eigenvalue sets LiSSA's scale
and is reported as a diagnostic; the top eigenpairs make the low-rank
(``"arnoldi"``) inverse and preconditioner. ARPACK's start vector is fixed, so
results are reproducible. Small problems (``P`` at most a few times the rank)
use the dense matrix instead, where ARPACK has nothing to gain.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from .operator import Curvature
from ..utils.memory import dense_fits_memory

__all__ = ["bottom_eigenvalue", "top_eigenpairs", "top_eigenvalue"]

DENSE_BELOW = 200


def _operator(curvature: Curvature) -> LinearOperator:
    model = curvature.model

    def matmat(V: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(V).reshape(curvature.n_params, -1).T.copy(),
                            dtype=model.dtype, device=model.device)
        return curvature.matmat(V).T.to(torch.float64).cpu().numpy()

    return LinearOperator((curvature.n_params,) * 2, matvec=matmat, matmat=matmat,
                          dtype=np.float64)


def top_eigenpairs(curvature: Curvature, rank: int, *, tol: float = 1e-6,
                   which: str = "LA") -> tuple[Tensor, Tensor]:
    """The ``rank`` largest (or smallest) eigenvalues and eigenvectors (rows).

    Parameters
    ----------
    curvature : Curvature
        The damped operator.
    rank : int
        Number of eigenpairs, ``1 ≤ rank ≤ P``.
    tol : float, default=1e-6
        Relative accuracy (ARPACK's ``tol``).
    which : {"LA", "SA"}, default="LA"
        Largest (``"LA"``) or smallest (``"SA"``) algebraic eigenvalues.

    Returns
    -------
    values : Tensor of shape (rank,), float64
    vectors : Tensor of shape (rank, P), float64, orthonormal rows
    """
    P = curvature.n_params
    if not 1 <= rank <= P:
        raise ValueError(f"solver_params['rank'] must be between 1 and the number of "
                         f"parameters ({P}), got {rank}. Use a smaller rank, or "
                         "solver='exact' for the full inverse.")
    if P <= max(DENSE_BELOW, 3 * rank) and dense_fits_memory(P):  # else matrix-free Lanczos
        values, vectors = torch.linalg.eigh(curvature.dense())
        if which == "SA":
            return values[:rank].contiguous(), vectors[:, :rank].T.contiguous()
        return values.flip(0)[:rank].contiguous(), vectors.flip(1)[:, :rank].T.contiguous()
    start = np.ones(P) / np.sqrt(P)
    values, vectors = eigsh(_operator(curvature), k=rank, which=which, tol=tol, v0=start,
                            ncv=min(P, max(2 * rank + 1, 20)))
    order = np.argsort(values)[::-1] if which == "LA" else np.argsort(values)
    return (torch.as_tensor(values[order].copy()),
            torch.as_tensor(vectors[:, order].T.copy()))


def top_eigenvalue(curvature: Curvature, *, tol: float = 1e-4) -> float:
    """Largest eigenvalue of the damped curvature (Lanczos, relative ``tol``)."""
    return float(top_eigenpairs(curvature, 1, tol=tol)[0][0])


def bottom_eigenvalue(curvature: Curvature, *, tol: float = 1e-4) -> float:
    """Smallest eigenvalue of the damped curvature (Lanczos, relative ``tol``)."""
    return float(top_eigenpairs(curvature, 1, tol=tol, which="SA")[0][0])
