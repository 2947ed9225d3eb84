"""InfluenceEstimator on a linear least-squares skorch model against its closed form
(docs/theory.rst, "Closed forms").

Model ``f(θ, x) = φ(x)ᵀθ`` with ``φ(x) = [x, 1]`` (skorch ``Linear`` weight then
bias), skorch's ``MSELoss`` so ``L_i = (φ_iᵀθ − t_i)²``, and SGD weight decay
``μ``: ``A = (2/N) ΦᵀΦ + μI``, ``∇L_m = 2 r_m φ_m`` and the exact influence is
``Δθ_m = ε A_λ⁻¹ ∇L_m`` at any ``θˢ`` (converged or not).
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from skorch import NeuralNetRegressor
from sklearn.datasets import load_diabetes
from sklearn.frozen import FrozenEstimator

from sklinfluence import InfluenceEstimator
from tolerances import CLOSED_FORM_ATOL, CLOSED_FORM_RTOL

MU, DAMPING = 0.05, 1e-3


def _close(a, b):
    scale = np.max(np.abs(b))
    assert_allclose(a, b, rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL * max(scale, 1.0))


@pytest.fixture(scope="module")
def data():
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return X[:80], (y[:80] - y.mean()) / y.std(), X[400:410], (y[400:410] - y.mean()) / y.std()


def _net(max_epochs=3):
    return NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=max_epochs, lr=0.01,
                              optimizer__weight_decay=MU, batch_size=16, verbose=0,
                              train_split=None)


def _design(X):
    return np.hstack([X, np.ones((X.shape[0], 1))])


def _theta(net):
    return torch.cat([p.detach().reshape(-1) for p in net.module_.parameters()]).numpy()


def _closed_form(X, y, theta, X_rm, y_rm, X_ev, y_ev, damping=DAMPING):
    N = X.shape[0]
    Phi = _design(X)
    A = 2.0 / N * Phi.T @ Phi + MU * np.eye(Phi.shape[1])
    A_lam = A + damping * np.eye(Phi.shape[1])
    grad = lambda Xs, ys: 2 * (_design(Xs) @ theta - ys)[:, None] * _design(Xs)
    g_rm, g_ev = grad(X_rm, y_rm), grad(X_ev, y_ev)
    delta = (1.0 / N) * np.linalg.solve(A_lam, g_rm.T).T
    return A, delta, (g_rm * delta).sum(1), delta @ g_ev.T


def _converged_frozen_net(X, y):
    Phi = _design(X)
    N = X.shape[0]
    A = 2.0 / N * Phi.T @ Phi + MU * np.eye(Phi.shape[1])
    theta = np.linalg.solve(A, 2.0 / N * Phi.T @ y)
    net = _net().initialize()
    with torch.no_grad():
        net.module_.weight.copy_(torch.as_tensor(theta[:-1])[None])
        net.module_.bias.copy_(torch.as_tensor(theta[-1:]))
    return net, theta, A


@pytest.mark.parametrize("solver, curvature", [("exact", "ggn"), ("exact", "hessian"),
                                               ("cg", "ggn"), ("cg", "hessian")])
def test_converged_linear_least_squares(data, solver, curvature):
    X, y, X_ev, y_ev = data
    net, theta, A = _converged_frozen_net(X, y)
    assert np.abs(A @ theta - 2.0 / len(y) * _design(X).T @ y).max() < 1e-12  # ∇J(θˢ) = 0
    est = InfluenceEstimator(FrozenEstimator(net), damping=DAMPING, solver=solver,
                             curvature=curvature, tol=1e-13).fit(X, y)
    assert est.net_ is net  # adopted, not retrained
    rm = slice(0, 12)
    _, delta, self_inf, matrix = _closed_form(X, y, theta, X[rm], y[rm], X_ev, y_ev)
    _close(est.param_change(X[rm]), delta)
    _close(est.score_samples(X[rm]), self_inf)
    _close(est.loss_change(X[rm], y[rm], X_ev, y_ev), matrix)
    assert np.all(est.score_samples(X[rm]) > 0)  # removing a sample raises its own loss


def test_not_converged_linear_least_squares_trained_by_the_estimator(data):
    X, y, X_ev, y_ev = data
    est = InfluenceEstimator(_net(max_epochs=2), damping=DAMPING, random_state=0).fit(X, y)
    theta = _theta(est.net_)
    A, delta, self_inf, matrix = _closed_form(X, y, theta, X[:12], y[:12], X_ev, y_ev)
    grad_J = A @ theta - 2.0 / len(y) * _design(X).T @ y
    assert np.linalg.norm(grad_J) > 1e-3  # θˢ is genuinely not a minimiser
    _close(est.param_change(X[:12], y[:12]), delta)
    _close(est.score_samples(X[:12], y[:12]), self_inf)
    _close(est.loss_change(X[:12], None, X_ev, y_ev), matrix)
    # the other side of the solve (more evaluation points than removed samples)
    _, delta2, _, matrix2 = _closed_form(X, y, theta, X[:3], y[:3], X_ev, y_ev)
    _close(est.loss_change(X[:3], None, X_ev, y_ev), matrix2)


def test_adding_a_sample_flips_the_sign(data):
    X, y, X_ev, y_ev = data
    net, theta, _ = _converged_frozen_net(X, y)
    remove = InfluenceEstimator(FrozenEstimator(net), damping=DAMPING).fit(X, y)
    add = InfluenceEstimator(FrozenEstimator(net), damping=DAMPING, epsilon=-1 / len(y)).fit(X, y)
    _close(add.param_change(X[:5]), -remove.param_change(X[:5]))
