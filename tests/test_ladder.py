"""The response ladder on linear least squares against its closed forms (docs/theory.rst,
"Closed forms").

See ``linear_problems.py`` for the model, its curvature ``A`` and the recipe.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning

from linear_problems import (curvature, design, grads, mean_loss, minimiser, recipe, theta_of,
                             well_conditioned_data)
from sklinfluence import Decomposer, LOOEstimator, PBRFEstimator
from tolerances import LADDER_ATOL_REL, LOSS_AT_RUNGS_ATOL_REL, RETRAIN_RTOL

MU, LAM = 0.1, 0.05
REMOVED = [0, 7, 19]


def _close(actual, expected, rtol=RETRAIN_RTOL):
    scale = np.abs(expected).max()
    assert_allclose(actual, expected, rtol=rtol, atol=LADDER_ATOL_REL * max(scale, 1e-300))


@pytest.fixture(scope="module")
def converged():
    X, y = well_conditioned_data()
    net = recipe(X, MU, max_epochs=120)
    cold = LOOEstimator(net, random_state=0).fit(X, y)
    return X, y, cold


def test_the_recipe_converges(converged):
    X, y, cold = converged
    _close(theta_of(cold.net_), minimiser(X, y, MU))


def test_converged_loo_equals_sherman_morrison_with_the_n_minus_1_weight_decay(converged):
    X, y, cold = converged
    N = len(X)
    warm = LOOEstimator(cold.net, warm_start=True, warm_start_fraction=1.0,
                        random_state=0).fit(X, y)
    mu_ = MU * (N - 1) / N  # the recipe on N - 1 rows minimises J - L_m/N with μ(N-1)/N
    theta_ = minimiser(X, y, mu_)  # minimiser of J with μ'
    A_ = curvature(X, mu_)
    theta_s = theta_of(cold.net_)
    theta_0 = cold.initial_params_.clone()
    for m in REMOVED:
        keep = np.arange(N) != m
        direct = minimiser(X[keep], y[keep], mu_, extra=N)
        x = design(X[m:m + 1])[0]
        g = grads(X[m:m + 1], y[m:m + 1], theta_)[0]  # 2 r x at θ'
        h = x @ np.linalg.solve(A_, x)
        sherman_morrison = theta_ + np.linalg.solve(A_, g) / N / (1 - 2 * h / N)
        _close(direct, sherman_morrison, rtol=1e-12)
        expected = direct - theta_s
        _close(cold.param_change(X[m:m + 1])[0], expected)
        _close(warm.param_change(X[m:m + 1], y[m:m + 1])[0], expected)
    # retraining works on copies: θˢ and θ⁰ are untouched
    assert np.array_equal(cold.model_.params.numpy(), theta_s)
    assert np.array_equal(theta_of(cold.net_), theta_s)
    assert np.array_equal(cold.initial_params_.numpy(), theta_0.numpy())


def _converged_rungs(X, y, theta_s, m):
    """The six rungs in closed form for removing row ``m`` of a converged fit (the
    retraining rungs with the ``μ(N−1)/N`` weight decay of the recipe on ``N − 1`` rows)."""
    N = len(X)
    keep = np.arange(N) != m
    mu_ = MU * (N - 1) / N
    loo = minimiser(X[keep], y[keep], mu_, extra=N)
    prox = minimiser(X[keep], y[keep], mu_, extra=N, lam=LAM, anchor=theta_s)
    x = design(X[m:m + 1])[0]
    g = grads(X[m:m + 1], y[m:m + 1], theta_s)[0]
    A_lam = curvature(X, MU) + LAM * np.eye(len(theta_s))
    pbrf = theta_s + np.linalg.solve(A_lam - 2 * np.outer(x, x) / N, g / N)
    influence = theta_s + np.linalg.solve(A_lam, g / N)
    return np.array([loo, loo, prox, pbrf, influence, influence])


def test_converged_decomposition_matches_closed_forms(converged):
    X, y, cold = converged
    dec = Decomposer(cold.net, damping=LAM, warm_start_fraction=1.0, random_state=0).fit(X, y)
    theta_s = theta_of(dec.net_)
    Phi = design(X)
    out = lambda th: Phi @ th
    terms = dec.transform(X[REMOVED])
    responses = dec.rung_responses(X[REMOVED])
    for row, m in enumerate(REMOVED):
        expected = _converged_rungs(X, y, theta_s, m)
        for k, name in enumerate(responses):
            _close(responses[name][row], expected[k] - theta_s)
        distance = [np.abs(out(expected[k + 1]) - out(expected[k])).mean() for k in range(5)]
        assert terms[row, 0] < 1e-10 * distance[1]  # warm start gap: cold = warm
        _close(terms[row, 1], distance[1], rtol=1e-7)  # proximity gap
        # non-convergence gap: only the O(μ/N) weight decay of the N−1 recipe
        _close(terms[row, 2], distance[2], rtol=1e-6)
        _close(terms[row, 3], distance[3], rtol=1e-7)  # linearization error
        assert terms[row, 4] == 0.0  # rung 5 is rung 4 with the exact GGN solve
    assert dec.responder_.last_info["rung"] == "influence"


def test_proximity_gap_is_exactly_zero_without_damping(converged):
    X, y, cold = converged
    dec = Decomposer(cold.net, damping=0.0, warm_start_fraction=1.0, random_state=0).fit(X, y)
    terms = dec.transform(X[:2])
    assert np.all(terms[:, 1] == 0.0)


def test_non_converged_pbrf_and_proximal_rungs_equal_their_closed_forms():
    X, y = well_conditioned_data(seed=1)
    N = len(X)
    net = recipe(X, 0.0, max_epochs=2)  # μ = 0: the closed forms verbatim
    pbrf = PBRFEstimator(net, damping=LAM, random_state=0, tol=1e-12).fit(X, y)
    prox = LOOEstimator(net, warm_start=True, proximal=True, damping=LAM,
                        warm_start_fraction=150, random_state=0).fit(X, y)
    theta_s = theta_of(pbrf.net_)
    A = curvature(X, 0.0)
    A_lam = A + LAM * np.eye(len(theta_s))
    grad_J = A @ theta_s - 2.0 / N * design(X).T @ y
    assert np.linalg.norm(grad_J) > 1e-2  # genuinely not converged
    for m in REMOVED:
        x = design(X[m:m + 1])[0]
        g = grads(X[m:m + 1], y[m:m + 1], theta_s)[0]
        K = A_lam - 2 * np.outer(x, x) / N  # A_λ − ε ∇²L_m
        _close(pbrf.param_change(X[m:m + 1])[0], np.linalg.solve(K, g / N), rtol=1e-9)
        expected_prox = -np.linalg.solve(K, grad_J - g / N)
        _close(prox.param_change(X[m:m + 1])[0], expected_prox)
    info = pbrf.responder_.last_info
    assert info["converged"].all() and np.all(info["grad_norm"] <= 1e-12 * info["initial_grad_norm"])

    dec = Decomposer(net, damping=LAM, warm_start_fraction=150, random_state=0).fit(X, y)
    terms = dec.transform(X[REMOVED])
    assert np.all(terms[:, 2] > 50 * terms[:, 3])  # non-convergence gap dominates
    assert np.all(terms[:, 2] > 0.1)


def test_over_parameterised_warm_start_gap():
    rng = np.random.default_rng(2)
    N, d = 8, 20
    X = rng.normal(size=(N, d))
    y = rng.normal(size=N)
    net = recipe(X, 0.0, max_epochs=400, rank_deficient=True)
    cold = LOOEstimator(net, random_state=0).fit(X, y)
    warm = LOOEstimator(net, warm_start=True, random_state=0).fit(X, y)
    theta_s, theta_0 = theta_of(cold.net_), cold.initial_params_.numpy()
    Phi = design(X)
    assert np.abs(Phi @ theta_s - y).max() < 1e-10  # trained to interpolation
    for m in (0, 5):
        keep = np.arange(N) != m
        Pm = Phi[keep]
        projection = theta_0 + np.linalg.pinv(Pm) @ (y[keep] - Pm @ theta_0)
        delta_cold = cold.param_change(X[m:m + 1])[0]
        _close(delta_cold, projection - theta_s, rtol=1e-7)
        # θ_warm − θ_cold = (I − Φ₋ₘ⁺Φ₋ₘ)(θˢ − θ⁰), the null-space part
        null = np.eye(d + 1) - np.linalg.pinv(Pm) @ Pm
        delta_warm = warm.param_change(X[m:m + 1])[0]
        assert np.abs(delta_warm).max() < 1e-9 * np.abs(delta_cold).max()
        _close(delta_warm - delta_cold, null @ (theta_s - theta_0), rtol=1e-7)
        # outputs on the remaining rows do not move; only the removed row's does
        assert np.abs(Pm @ delta_cold).max() < 1e-9 * np.abs(Phi[m] @ delta_cold)

    dec = Decomposer(net, damping=LAM, random_state=0).fit(X, y)
    terms = dec.transform(X[:1])
    delta_cold = cold.param_change(X[:1])[0]
    _close(terms[0, 0], np.abs(Phi @ delta_cold).mean(), rtol=1e-7)  # warm-start gap
    assert np.all(np.abs(terms[0, 1:]) < 1e-9 * terms[0, 0])  # r = 0: every other rung at θˢ


def test_signed_loss_terms_are_loss_changes_between_closed_form_rungs(converged):
    """``metric="loss"``: each term is ``Q(θ_{k+1}) − Q(θ_k)``, ``Q`` the mean training
    loss, recomputed here with numpy at the closed-form parameters of every rung,
    and the five terms telescope to ``Q(θ_5) − Q(θ_0)``."""
    X, y, cold = converged
    dec = Decomposer(cold.net, damping=LAM, metric="loss", warm_start_fraction=1.0,
                     pbrf_tol=1e-12, random_state=0).fit(X, y)
    theta_s = theta_of(dec.net_)
    terms = dec.transform(X[REMOVED])
    q = dec.rung_losses(X[REMOVED])
    for row, m in enumerate(REMOVED):
        Q = mean_loss(_converged_rungs(X, y, theta_s, m), X, y)  # Q(θ_0), ..., Q(θ_5)
        atol = LOSS_AT_RUNGS_ATOL_REL * np.abs(Q).max()
        assert np.abs(np.diff(Q)[1:4]).min() > 1e4 * atol  # the terms tested are not ~0
        assert_allclose(q[row], Q, rtol=0, atol=atol)
        assert_allclose(terms[row], np.diff(Q), rtol=0, atol=atol)
        assert_allclose(terms[row].sum(), Q[-1] - Q[0], rtol=0, atol=atol)
    # telescoping: the five terms sum to the change between the ends, to rounding
    assert_allclose(terms.sum(axis=1), q[:, -1] - q[:, 0], rtol=0, atol=1e-15 * np.abs(q).max())


def test_solver_error_is_zero_for_exact_and_grows_when_cg_is_cut_short(converged):
    X, y, cold = converged
    exact = Decomposer(cold.net, damping=LAM, warm_start_fraction=0.2, random_state=0).fit(X, y)
    assert np.all(exact.transform(X[REMOVED])[:, 4] == 0.0)
    errors = []
    for max_iter in (1, 2):  # one column per block: a block of P columns solves at once
        short = Decomposer(cold.net, damping=LAM, solver="cg", max_iter=max_iter,
                           solver_params={"block_size": 1},
                           warm_start_fraction=0.2, random_state=0).fit(X, y)
        with pytest.warns(ConvergenceWarning, match="CG stopped"):
            errors.append(short.transform(X[REMOVED])[:, 4])
    assert np.all(errors[0] > errors[1]) and np.all(errors[1] > 0)
