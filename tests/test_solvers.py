"""Solvers on an MLP: CG against the exact solve, non-convergence, indefinite curvature."""

import re

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator

from nets import make_net, toy_data
from sklinfluence import InfluenceEstimator
from sklinfluence.curvature import Curvature
from sklinfluence.solvers import CGSolver, ExactSolver
from tolerances import CG_VS_EXACT_RTOL


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
