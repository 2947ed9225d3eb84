"""The mixed-precision kernel's stopping rules (:mod:`sklinfluence.curvature.kernel`): a float32
refinement round gaining less than tenfold switches the kernel to float64; the
float64 solutions are then refined in parameter space to what float64 allows; and
where ``tol`` lies below that, the solve says so and why."""

import re

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from sklinfluence.curvature import kernel as kernel_module
from sklinfluence.curvature.operator import Curvature
from sklinfluence.curvature.kernel import GaussNewtonKernel
from sklinfluence.solvers import make_solver
from test_kernel import _mlp
from test_kfac import _dense_ggn, _model, _targets


def _clustered_least_squares(n=200, d=300, damping=3e-7):
    """``Linear(d, 1)`` on ``n < d`` rows whose singular values are half 1, half 1e-3
    (MSE, no decay): ``‖I + ŨŨᵀ‖ = 1 + 2/λ ≈ 6.7e6`` with half the kernel's
    spectrum there, so each float32 refinement round gains only about fivefold."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    V, _ = np.linalg.qr(rng.normal(size=(d, n)))
    s = np.where(np.arange(n) < n // 2, 1.0, 1e-3) * np.sqrt(n)
    X = torch.tensor(U @ np.diag(s) @ V.T)
    torch.manual_seed(0)
    model = _model(nn.Linear(d, 1, bias=False), "MSELoss", mu=0.0)
    T = model.forward(model.params, X).detach() + torch.randn(n, 1, dtype=torch.float64)
    A = 2.0 / n * X.T @ X + damping * torch.eye(d, dtype=torch.float64)
    return model, X, T, A


def _relative_residuals(A, B, x):
    return ((B - x @ A).norm(dim=1) / B.norm(dim=1)).numpy()


def _mixed_mlp(damping, tol):
    """The Tanh MLP of ``test_kernel`` (MSE, no weight decay), its mixed-precision
    kernel solver and three right-hand sides."""
    module, X = _mlp()
    model = _model(module, "MSELoss", mu=0.0)
    T = _targets(model, X)
    solver = make_solver("kernel", Curvature(model, X, T, damping=damping), tol=tol,
                         solver_params={"mixed_precision": True})
    B = torch.randn(3, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    return model, X, T, solver, B


def test_a_round_gaining_less_than_tenfold_switches_to_float64():
    """Far above float64's reach (residual ~1e2, slowly converging), a round gains
    between 1× and 10×: the kernel is rebuilt in float64 there and then, not after
    more float32 rounds, and the answer meets tol against the dense matrix."""
    damping, tol = 3e-7, 1e-8
    model, X, T, A = _clustered_least_squares(damping=damping)
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=damping, mixed_precision=True)
    assert kernel.factor.dtype == torch.float32
    B = torch.randn(3, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    x = kernel.solve(B, tol=tol)
    assert kernel.info["precision"] == "float64" and kernel.factor.dtype == torch.float64
    before, after = map(float, re.fullmatch(
        r"a float64 refinement round took the residual from (\S+) only to (\S+)",
        kernel.info["fallback"]).groups())
    assert 1.0 < before / after < 10.0 and after > 1.0  # converging, slowly, far from tol
    assert kernel.last_residual <= tol and kernel.last_stop is None
    # against the dense matrix: within tol, and the measured residual right to the
    # rounding of a residual at this conditioning (eps·‖I + ŨŨᵀ‖ = 1.5e-9)
    dense = _relative_residuals(A, B, x).max()
    assert dense <= tol
    assert abs(dense - kernel.last_residual) <= np.finfo(np.float64).eps * kernel.norm()


def test_the_float64_fallback_is_refined_to_tol():
    """MSE, no weight decay, damping 3e-6, tol 1e-10: float32 stalls at 1.1e-10, the
    float64 kernel's own solve misses too (1.3e-10, its way back to parameters
    cancels); refining the solutions in float64 meets tol, measured against the
    dense matrix, with no warning."""
    damping, tol = 3e-6, 1e-10
    model, X, T, solver, B = _mixed_mlp(damping, tol)
    x = solver.solve(B)
    assert solver.info["precision"] == "float64" and "refinement round" in solver.info["fallback"]
    solve = solver.last_solve
    assert solve.converged and solve.max_relative_residual <= tol and solve.n_measured == 3
    assert solver.info["stopped_short"] is None
    A = _dense_ggn(model, X, T) + damping * torch.eye(model.n_params, dtype=torch.float64)
    dense = _relative_residuals(A, B, x).max()
    assert dense <= tol
    assert abs(dense - solve.max_relative_residual) <= (np.finfo(np.float64).eps
                                                        * solver._kernel.norm())
    # a later solve on the float64 kernel is checked and refined too
    x2 = solver.solve(2 * B)
    assert solver.last_solve.converged and _relative_residuals(A, 2 * B, x2).max() <= tol


def test_a_tol_below_what_float64_allows_is_reported_with_the_reason():
    """tol 1e-15 on the same problem: no float64 solve gets there. The solve stops
    when refinement stops gaining, reports ``converged=False``, and the warning and
    ``info["stopped_short"]`` name the conditioning ``‖I + ŨŨᵀ‖`` (checked against the
    dense matrix: ``1 + λ_max(G)/λ``) and the level ``eps·‖I + ŨŨᵀ‖`` it allows."""
    damping, tol = 3e-6, 1e-15
    model, X, T, solver, B = _mixed_mlp(damping, tol)
    with pytest.warns(ConvergenceWarning, match=r"missed tol: the float64 solve") as record:
        solver.solve(B)
    assert not solver.last_solve.converged and solver.last_solve.max_relative_residual > tol
    G = _dense_ggn(model, X, T)
    norm = solver._kernel.norm()  # by power iteration: about the true one
    assert norm == pytest.approx(1.0 + float(torch.linalg.eigvalsh(G)[-1]) / damping, rel=1e-3)
    floor = np.finfo(np.float64).eps * norm
    message = str(record[0].message)
    assert f"= {floor:.1e} for this conditioning" in message and f"= {norm:.1e}" in message
    assert f"tol={tol:g}" in message and solver.info["stopped_short"] in message
    # what it reached is float64's level for this matrix: within a few eps·‖I + ŨŨᵀ‖
    assert solver.last_solve.max_relative_residual < 3 * floor


def test_float32_rounds_that_run_out_say_so(monkeypatch):
    """With one refinement round allowed, a float32 solve that gains tenfold but
    not to tol stays float32 and says that the rounds ran out."""
    monkeypatch.setattr(kernel_module, "KERNEL_MAX_REFINEMENTS", 1)
    module, X = _mlp()
    model = _model(module, "MSELoss", mu=0.0)
    T = _targets(model, X)
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=1e-2, mixed_precision=True)
    B = torch.randn(3, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    kernel.solve(B, tol=1e-15)
    assert kernel.factor.dtype == torch.float32 and kernel.last_rounds == 1
    assert kernel.last_stop.startswith("the float32 refinement stopped after 1 rounds")
