"""Self-influence from a factorisation instead of one solve per removal
(``solver.self_products``): the kernel form reads ``g_sᵀ (G + D)⁻¹ g_s`` off the
diagonal blocks of its inverse (no gradient of a training row at all), the dense
Cholesky with one triangular solve; both equal the dense reference for single
rows, groups and rows that need their gradients, and a float32 factor is
checked, refined or rebuilt to meet ``tol``."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from sklinfluence import InfluenceEstimator
from sklinfluence.curvature.operator import Curvature
from sklinfluence.response.rungs import removal_forces
from sklinfluence.solvers import make_solver
from test_architectures import LAMBDA as ARCH_LAMBDA, _net
from test_kernel import LAMBDA, NETS, _model, _removals_mixture, _targets
from tolerances import CLOSED_FORM_RTOL


def _problem(name, criterion):
    module, X = NETS[name]()
    model = _model(module, criterion)
    T = _targets(model, X, criterion)
    removals = _removals_mixture(X, T, int(model.forward(model.params, X[:1]).shape[1]))
    F = removal_forces(model, removals)
    A = _dense_ggn_damped(model, X, T)
    expected = (F * torch.linalg.solve(A, F.T).T).sum(dim=1)
    return model, X, T, removals, expected


def _dense_ggn_damped(model, X, T):
    from test_kfac import _dense_ggn
    return _dense_ggn(model, X, T) + LAMBDA * torch.eye(model.n_params, dtype=torch.float64)


def _counting_forces(model, requested):
    def forces(some):
        requested.append(len(some))
        return removal_forces(model, some)
    return forces


@pytest.mark.parametrize("criterion", ["MSELoss", "CrossEntropyLoss"])
@pytest.mark.parametrize("name", ["cnn_batchnorm", "tokens_layernorm", "mlp"])
@pytest.mark.parametrize("solver", ["kernel", "exact"])
def test_self_products_equal_the_dense_quadratic_forms(name, criterion, solver):
    """Single rows, a group, a row outside the training set and a relabelled row:
    the forms equal ``gᵀ A⁻¹ g`` with the dense matrix to rounding; the kernel
    computes gradients only for the last two."""
    model, X, T, removals, expected = _problem(name, criterion)
    s = make_solver(solver, Curvature(model, X, T, damping=LAMBDA))
    requested = []
    got = s.self_products(removals, _counting_forces(model, requested))
    assert requested == ([2] if solver == "kernel" else [len(removals)])
    assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-13 * float(expected.abs().max()))
    assert s.last_solve.converged and s.last_solve.n_rhs == len(removals)


def test_a_float32_factor_meets_a_loose_tol_without_refinement():
    """At ``tol=1e-3`` the plain float32 forms pass their check: the factor stays
    float32, the reported error is below tol and bounds the actual one."""
    model, X, T, removals, expected = _problem("cnn_batchnorm", "CrossEntropyLoss")
    s = make_solver("kernel", Curvature(model, X, T, damping=LAMBDA), tol=1e-3,
                    solver_params={"mixed_precision": True})
    got = s.self_products(removals, lambda r: removal_forces(model, r))
    assert s.info["precision"] == "float32" and s.info["fallback"] is None
    error = ((got - expected).abs() / expected.abs()).max()
    assert 0 < float(error) <= s.last_solve.max_relative_residual * 10 + 1e-12
    assert s.last_solve.max_relative_residual <= 1e-3 and s.last_solve.n_measured == 7


def test_a_float32_factor_refines_every_form_it_checked_too_coarse():
    """At ``tol=1e-8`` the plain float32 forms fail their check; every form is
    refined (variational form, second-order error) and meets tol against the dense
    reference, the factor still float32."""
    model, X, T, removals, expected = _problem("cnn_batchnorm", "CrossEntropyLoss")
    s = make_solver("kernel", Curvature(model, X, T, damping=LAMBDA), tol=1e-8,
                    solver_params={"mixed_precision": True})
    got = s.self_products(removals, lambda r: removal_forces(model, r))
    assert s.info["precision"] == "float32" and s.info["fallback"] is None
    assert s.last_solve.max_relative_residual <= 1e-8
    assert float(((got - expected).abs() / expected.abs()).max()) <= 1e-8


@pytest.mark.parametrize("tol, many", [(1e-14, False), (1e-8, True)])
def test_a_float32_factor_is_rebuilt_in_float64_where_refining_cannot_do(tol, many):
    """A tol beyond even the refined forms (1e-14), or more removals than training
    rows: the kernel is rebuilt in float64 (``fallback`` says why) and the forms are
    exact to rounding."""
    model, X, T, removals, expected = _problem("mlp", "MSELoss")
    if many:
        removals = removals * 2
        expected = torch.cat([expected, expected])
    assert (len(removals) > X.shape[0]) is many
    s = make_solver("kernel", Curvature(model, X, T, damping=LAMBDA), tol=tol,
                    solver_params={"mixed_precision": True})
    got = s.self_products(removals, lambda r: removal_forces(model, r))
    assert s.info["precision"] == "float64" and "self-influence" in s.info["fallback"]
    assert s.last_solve.max_relative_residual is None
    assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-13 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def tanh_cnn():
    from test_architectures import _digits as three_digits
    X, y = three_digits()
    return _net("cnn"), X, y


@pytest.mark.parametrize("solver", ["kernel", "exact", "cg"])
def test_score_samples_is_the_diagonal_of_the_influence_matrix(tanh_cnn, solver):
    """Through the estimator: self-influence (single rows and groups) equals the
    diagonal of ``loss_change`` and the group's summed-force form of the exact
    solver, whichever route computes it."""
    net, X, y = tanh_cnn
    reference = InfluenceEstimator(net, damping=ARCH_LAMBDA, solver="exact",
                                   random_state=0).fit(X, y)
    est = InfluenceEstimator(net, damping=ARCH_LAMBDA, solver=solver, tol=1e-12,
                             random_state=0).fit(X, y)
    expected = np.diag(reference.loss_change(X, y, X, y))
    got = est.score_samples(X)
    assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    groups = np.arange(len(X)) % 5
    forces = removal_forces(reference.model_, reference._removals(X, y, groups)[0])
    solved = reference.solver_.solve(forces)
    expected_groups = reference.epsilon_ * (forces * solved).sum(dim=1).numpy()
    assert_allclose(est.score_samples(X, groups=groups), expected_groups, rtol=1e-9,
                    atol=1e-12 * np.abs(expected_groups).max())
    assert est.diagnostics_["n_rhs"] == 5
