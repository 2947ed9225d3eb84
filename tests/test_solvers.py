"""Solvers on an MLP: CG against the exact solve, non-convergence, indefinite curvature,
and what each solve reports (exact or approximate, measured residual)."""

import re

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetRegressor

from linear_problems import well_conditioned_data
from nets import make_net, toy_data
from sklinfluence import InfluenceEstimator
from sklinfluence.curvature.operator import Curvature
from sklinfluence.solvers import RESIDUAL_CHECKS, CGSolver, ExactSolver, measured_rows
from tolerances import CG_VS_EXACT_RTOL, CLOSED_FORM_RTOL, SOLVE_RESIDUAL_PER_CONDITION


@pytest.fixture(scope="module")
def trained():
    X, y = toy_data("CrossEntropyLoss", n=60)
    net = make_net("CrossEntropyLoss", X.shape[1], hidden=8, max_epochs=30).fit(X, y)
    return net, X, y


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_agrees_with_exact_on_an_mlp(trained, curvature):
    net, X, y = trained
    kwargs = dict(damping=0.5, curvature=curvature)  # Hessian PD at this damping
    exact = InfluenceEstimator(FrozenEstimator(net), **kwargs).fit(X, y)
    cg = InfluenceEstimator(FrozenEstimator(net), solver="cg", tol=1e-13, **kwargs).fit(X, y)
    ref = exact.loss_change(X, y, X[:7], y[:7])
    got = cg.loss_change(X, y, X[:7], y[:7])
    assert_allclose(got, ref, rtol=CG_VS_EXACT_RTOL, atol=CG_VS_EXACT_RTOL * np.abs(ref).max())
    assert_allclose(cg.score_samples(X[:9]), exact.score_samples(X[:9]), rtol=CG_VS_EXACT_RTOL)
    info = cg.solver_.last_solve
    assert info.n_iter > 0 and info.max_relative_residual < 1e-12 and info.converged


def test_cg_stopped_short_warns_with_the_residual(trained):
    net, X, y = trained
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", max_iter=2, damping=1e-3).fit(X, y)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 .*largest relative residual \d"):
        est.score_samples(X[:4])
    assert est.solver_.last_solve.n_iter == 2 and not est.solver_.last_solve.converged


def test_solvers_agree_on_random_spd_like_curvature_with_many_rhs(trained):
    net, X, y = trained
    est = InfluenceEstimator(FrozenEstimator(net), damping=0.05).fit(X, y)
    curvature = Curvature(est.model_, est.X_train_, est.T_train_, damping=0.05)
    B = torch.randn(40, curvature.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    x_cg = CGSolver(curvature, tol=1e-13).solve(B)
    x_exact = ExactSolver(curvature).solve(B)
    residual = (curvature.matmat(x_cg) - B).norm(dim=1) / B.norm(dim=1)
    assert float(residual.max()) < 1e-12
    assert_allclose(x_cg.numpy(), x_exact.numpy(), rtol=CG_VS_EXACT_RTOL, atol=1e-10)


def test_indefinite_hessian_is_refused_with_its_most_negative_eigenvalue():
    X, y = toy_data("MSELoss", n=40)
    net = make_net("MSELoss", X.shape[1], hidden=8, max_epochs=1).fit(X, y)
    hess = Curvature(InfluenceEstimator(FrozenEstimator(net)).fit(X, y).model_,
                     torch.as_tensor(X), torch.as_tensor(y), kind="hessian").dense()
    lowest = float(torch.linalg.eigvalsh(hess)[0])
    assert lowest < 0  # an early-training MLP's Hessian is indefinite
    with pytest.raises(ValueError, match=re.escape(f"most negative eigenvalue is {lowest:.3e}")):
        InfluenceEstimator(FrozenEstimator(net), curvature="hessian", damping=0.0).fit(X, y)
    est = InfluenceEstimator(FrozenEstimator(net), curvature="hessian", damping=0.0,
                             solver="cg").fit(X, y)
    with pytest.raises(ValueError, match="non-positive curvature"):
        est.score_samples(X)
    # enough damping makes it positive definite again
    InfluenceEstimator(FrozenEstimator(net), curvature="hessian", damping=-lowest + 1e-3).fit(X, y)


# ---------------------------------------------------------------- honest diagnostics
def _dense_residuals(est, damping, B, X):
    """``‖b − (C + λI)x‖/‖b‖`` per row, with the dense matrix (not the library's products)."""
    A = Curvature(est.model_, est.X_train_, est.T_train_, damping=damping).dense()
    return ((B - X @ A).norm(dim=1) / B.norm(dim=1)).numpy(), torch.linalg.eigvalsh(A)


def _grads(est, X, y):
    Xt, Tt, _ = est._targets_for(X, y)
    return est.model_.per_sample_grads(est.model_.params, Xt, Tt)


def test_measured_rows_are_few_evenly_spaced_and_deterministic():
    assert measured_rows(5).tolist() == [0, 1, 2, 3, 4]
    rows = measured_rows(60)
    assert len(rows) == RESIDUAL_CHECKS == len(set(rows.tolist()))
    assert rows[0] == 0 and rows[-1] == 59 and bool((rows.diff() > 0).all())
    assert measured_rows(60).tolist() == rows.tolist() and measured_rows(0).numel() == 0


def test_ekfac_reports_an_approximation_and_the_residual_it_measures(trained):
    net, X, y = trained
    est = InfluenceEstimator(FrozenEstimator(net), solver="ekfac", damping=1e-2).fit(X, y)
    assert est.diagnostics_["approximate"] is True
    est.loss_change(X, y, X[:5], y[:5])  # one solve, of the 5 evaluation gradients
    B = _grads(est, X[:5], y[:5])
    truth, _ = _dense_residuals(est, 1e-2, B, est.solver_.factors.solve(B))
    d = est.diagnostics_
    assert d["approximate"] is True and d["converged"] is None and d["n_measured"] == 5
    assert truth.max() > 0.05  # EK-FAC is not exact on an MLP
    assert_allclose(d["max_relative_residual"], truth.max(), rtol=CLOSED_FORM_RTOL)
    est.score_samples(X, y)  # one solve of 60 right-hand sides: 8 measured
    B = _grads(est, X, y)
    truth, _ = _dense_residuals(est, 1e-2, B, est.solver_.factors.solve(B))
    assert est.diagnostics_["n_measured"] == RESIDUAL_CHECKS
    assert_allclose(est.diagnostics_["max_relative_residual"], truth[measured_rows(60)].max(),
                    rtol=CLOSED_FORM_RTOL)


def test_kronecker_residual_is_at_rounding_where_the_factorisation_is_exact():
    """One linear layer, one output, squared loss: EK-FAC and K-FAC are exact there."""
    X, y = well_conditioned_data(n=40, d=4)
    net = NeuralNetRegressor(torch.nn.Linear(4, 1, dtype=torch.float64), max_epochs=5, lr=0.05,
                             optimizer__weight_decay=0.02, verbose=0, train_split=None)
    net.fit(X, y.reshape(-1, 1))
    for solver in ("ekfac", "kfac"):
        est = InfluenceEstimator(FrozenEstimator(net), solver=solver).fit(X, y)
        est.score_samples(X, y)
        B = _grads(est, X, y)
        _, eigenvalues = _dense_residuals(est, 1e-3, B, B)  # default damping
        condition = float(eigenvalues[-1] / eigenvalues[0])
        d = est.diagnostics_
        assert d["approximate"] is True and d["converged"] is None
        assert d["max_relative_residual"] <= SOLVE_RESIDUAL_PER_CONDITION * condition


def test_arnoldi_residual_is_at_rounding_at_full_rank_and_measured_below(trained):
    net, X, y = trained
    full = InfluenceEstimator(FrozenEstimator(net), solver="arnoldi", damping=0.1,
                              solver_params={"rank": 67}).fit(X, y)
    assert full.model_.n_params == 67
    full.score_samples(X[:6], y[:6])
    B = _grads(full, X[:6], y[:6])
    _, eigenvalues = _dense_residuals(full, 0.1, B, B)
    d = full.diagnostics_
    assert d["approximate"] is False and d["converged"] is True and d["n_measured"] == 6
    assert d["max_relative_residual"] <= SOLVE_RESIDUAL_PER_CONDITION * float(
        eigenvalues[-1] / eigenvalues[0])
    low = InfluenceEstimator(FrozenEstimator(net), solver="arnoldi", damping=0.1,
                             solver_params={"rank": 5}).fit(X, y)
    low.score_samples(X[:6], y[:6])
    truth, _ = _dense_residuals(low, 0.1, B, low.solver_.solve(B))
    d = low.diagnostics_
    assert d["approximate"] is True and d["converged"] is None
    assert truth.max() > 1e-3
    assert_allclose(d["max_relative_residual"], truth.max(), rtol=CLOSED_FORM_RTOL)


def test_exact_solver_says_exact_and_a_preconditioner_measures_nothing(trained):
    net, X, y = trained
    exact = InfluenceEstimator(FrozenEstimator(net), damping=0.1).fit(X, y)
    exact.score_samples(X[:4], y[:4])
    d = exact.diagnostics_
    assert d["solver"] == "exact" and d["approximate"] is False and d["converged"] is True
    assert d["max_relative_residual"] is None and d["n_measured"] == 0
    cg = InfluenceEstimator(FrozenEstimator(net), solver="cg", damping=0.1,
                            solver_params={"preconditioner": "ekfac"}).fit(X, y)
    cg.score_samples(X[:4], y[:4])
    assert cg.diagnostics_["approximate"] is False and cg.diagnostics_["converged"] is True
    assert cg.diagnostics_["n_measured"] == 4 and cg.diagnostics_["n_iter"] > 0
    assert cg.solver_.preconditioner.last_solve is None  # apply(): no residual per iteration


def test_cg_shows_its_progress_under_verbose(capfd):
    """``verbose`` gives a progress bar per block of CG solves (columns converged,
    iterations, worst residual); without it CG prints nothing."""
    X, y = toy_data("CrossEntropyLoss", n=60)
    net = make_net("CrossEntropyLoss", X.shape[1], hidden=8, max_epochs=10)
    for verbose in (0, 1):
        est = InfluenceEstimator(net, damping=0.1, solver="cg", tol=1e-12, verbose=verbose,
                                 random_state=0).fit(X, y)
        capfd.readouterr()
        est.loss_change(X, y, X[:30], y[:30])
        err = capfd.readouterr().err
        if verbose:
            assert "CG" in err and "/30" in err and "column" in err
        else:
            assert err == ""
