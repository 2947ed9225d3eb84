"""Removing groups of rows (``groups=``) against their closed forms (docs/theory.rst,
"Removing groups of rows").

Linear least squares as in ``test_ladder.py``: ``L_i = (φ_iᵀθ − t_i)²``, so
``∇L_i = 2 r_i φ_i``, ``∇²L_i = 2 φ_i φ_iᵀ`` and ``A = (2/N) ΦᵀΦ + μI``.
Removing the set ``S`` is ``J − (1/N) Σ_S L_m``.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from linear_problems import (curvature, design, grads, minimiser, recipe, theta_of,
                             well_conditioned_data)
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator
from tolerances import CLOSED_FORM_RTOL, LADDER_ATOL_REL, RETRAIN_RTOL

MU, LAM = 0.1, 0.05
#: Rows 0–8 in groups of sizes 1, 2, 3 and 3 (labels deliberately unsorted), the rest kept.
ROWS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
LABELS = np.array(["d", "b", "b", "c", "c", "c", "a", "a", "a"])
GROUPS = {"a": [6, 7, 8], "b": [1, 2], "c": [3, 4, 5], "d": [0]}  # np.unique order


def _close(actual, expected, rtol=RETRAIN_RTOL):
    scale = np.abs(expected).max()
    assert_allclose(actual, expected, rtol=rtol, atol=LADDER_ATOL_REL * max(scale, 1e-300))


@pytest.fixture(scope="module")
def converged():
    X, y = well_conditioned_data()
    net = recipe(X, MU, max_epochs=120)
    return X, y, LOOEstimator(net, random_state=0).fit(X, y)


def _force(X, y, theta, rows):
    """``Σ_S ∇L_m(θ)`` and ``Σ_S ∇²L_m``."""
    Phi = design(X[rows])
    g = grads(X[rows], y[rows], theta).sum(axis=0)
    return g, 2 * Phi.T @ Phi


def test_group_loo_equals_woodbury_with_the_n_minus_s_weight_decay(converged):
    X, y, cold = converged
    N = len(X)
    theta_s = theta_of(cold.net_)
    deltas = cold.param_change(X[ROWS], groups=LABELS)
    one_at_a_time = LOOEstimator(cold.net, removal_batch_size=1, random_state=0).fit(X, y)
    assert_array_equal(one_at_a_time.param_change(X[ROWS], groups=LABELS), deltas)
    for row, (label, rows) in enumerate(GROUPS.items()):
        k = len(rows)
        keep = np.setdiff1d(np.arange(N), rows)
        mu_ = MU * (N - k) / N  # the recipe on N − |S| rows minimises J − ΣL_m/N with μ(N−|S|)/N
        direct = minimiser(X[keep], y[keep], mu_, extra=N)
        # Woodbury around the minimiser θ' of J with μ', ε = 1/N:
        # θ' + ε A'⁻¹ Φ_Sᵀ (I − 2εK)⁻¹ 2 r_S,  K = Φ_S A'⁻¹ Φ_Sᵀ
        theta_ = minimiser(X, y, mu_)
        A_ = curvature(X, mu_)
        Phi_S = design(X[rows])
        r_S = Phi_S @ theta_ - y[rows]
        K = Phi_S @ np.linalg.solve(A_, Phi_S.T)
        woodbury = theta_ + np.linalg.solve(A_, Phi_S.T @ np.linalg.solve(
            np.eye(k) - 2 * K / N, 2 * r_S)) / N
        _close(direct, woodbury, rtol=1e-12)
        _close(deltas[row], direct - theta_s)


def test_non_converged_group_pbrf_and_proximal_equal_their_closed_forms():
    X, y = well_conditioned_data(seed=1)
    N = len(X)
    net = recipe(X, 0.0, max_epochs=2)  # μ = 0: the closed forms verbatim
    batched = PBRFEstimator(net, damping=LAM, random_state=0, tol=1e-12).fit(X, y)
    single = PBRFEstimator(net, damping=LAM, random_state=0, tol=1e-12,
                           removal_batch_size=1).fit(X, y)
    prox = LOOEstimator(net, warm_start=True, proximal=True, damping=LAM,
                        warm_start_fraction=150, random_state=0).fit(X, y)
    theta_s = theta_of(batched.net_)
    A_lam = curvature(X, 0.0) + LAM * np.eye(len(theta_s))
    grad_J = curvature(X, 0.0) @ theta_s - 2.0 / N * design(X).T @ y
    assert np.linalg.norm(grad_J) > 1e-2  # genuinely not converged
    pbrf_b = batched.param_change(X[ROWS], groups=LABELS)
    pbrf_1 = single.param_change(X[ROWS], groups=LABELS)
    proximal = prox.param_change(X[ROWS], groups=LABELS)
    for row, rows in enumerate(GROUPS.values()):
        g, H = _force(X, y, theta_s, rows)
        K = A_lam - H / N  # A_λ − ε Σ_S ∇²L_m
        expected = np.linalg.solve(K, g / N)
        _close(pbrf_b[row], expected, rtol=CLOSED_FORM_RTOL)
        _close(pbrf_1[row], expected, rtol=CLOSED_FORM_RTOL)
        _close(proximal[row], -np.linalg.solve(K, grad_J - g / N))
    assert batched.responder_.last_info["converged"].all()


def test_group_influence_is_the_sum_of_its_members(converged):
    X, y, cold = converged
    N = len(X)
    est = InfluenceEstimator(cold.net, damping=LAM, solver="exact", random_state=0).fit(X, y)
    theta_s = theta_of(est.net_)
    A_lam = curvature(X, MU) + LAM * np.eye(len(theta_s))
    groups = est.param_change(X[ROWS], groups=LABELS)
    singles = est.param_change(X[ROWS])
    scores = est.score_samples(X[ROWS], groups=LABELS)
    matrix = est.loss_change(X[ROWS], None, X[20:24], y[20:24], groups=LABELS)
    for row, (label, rows) in enumerate(GROUPS.items()):
        g, _ = _force(X, y, theta_s, rows)
        expected = np.linalg.solve(A_lam, g / N)
        _close(groups[row], expected, rtol=CLOSED_FORM_RTOL)
        members = [int(np.flatnonzero(ROWS == m)[0]) for m in rows]
        _close(groups[row], singles[members].sum(axis=0), rtol=1e-13)
        _close(scores[row], g @ expected, rtol=CLOSED_FORM_RTOL)  # ε gᵀ(A+λ)⁻¹g
        eval_grads = grads(X[20:24], y[20:24], theta_s)
        _close(matrix[row], eval_grads @ expected, rtol=CLOSED_FORM_RTOL)


def test_groups_of_one_row_are_the_single_rows_bit_for_bit(converged):
    X, y, cold = converged
    rows = X[:5]
    labels = np.array([4, 3, 2, 1, 0])  # one row each, in reverse label order
    order = np.argsort(labels)
    for est in (InfluenceEstimator(cold.net, damping=LAM, random_state=0),
                InfluenceEstimator(cold.net, damping=LAM, measure="loss", random_state=0),
                PBRFEstimator(cold.net, damping=LAM, random_state=0),
                LOOEstimator(cold.net, warm_start=True, random_state=0)):
        est.fit(X, y)
        assert_array_equal(est.param_change(rows, groups=labels), est.param_change(rows)[order])
        assert_array_equal(est.score_samples(rows, groups=labels),
                           est.score_samples(rows)[order])
    dec = Decomposer(cold.net, damping=LAM, random_state=0).fit(X, y)
    assert_array_equal(dec.transform(rows, groups=labels), dec.transform(rows)[order])


def test_decomposer_on_groups_telescopes_and_matches_the_closed_forms(converged):
    X, y, cold = converged
    N = len(X)
    dec = Decomposer(cold.net, damping=LAM, metric="loss", warm_start_fraction=1.0,
                     random_state=0).fit(X, y)
    terms = dec.transform(X[ROWS], groups=LABELS)
    q = dec.rung_losses(X[ROWS], groups=LABELS)
    assert terms.shape == (4, 5)
    assert_allclose(terms.sum(axis=1), q[:, -1] - q[:, 0], rtol=0,
                    atol=1e-15 * np.abs(q).max())
    responses = dec.rung_responses(X[ROWS], groups=LABELS)
    theta_s = theta_of(dec.net_)
    A_lam = curvature(X, MU) + LAM * np.eye(len(theta_s))
    Phi = design(X)
    for row, rows in enumerate(GROUPS.values()):
        k = len(rows)
        keep = np.setdiff1d(np.arange(N), rows)
        mu_ = MU * (N - k) / N
        loo = minimiser(X[keep], y[keep], mu_, extra=N)
        prox = minimiser(X[keep], y[keep], mu_, extra=N, lam=LAM, anchor=theta_s)
        g, H = _force(X, y, theta_s, rows)
        pbrf = theta_s + np.linalg.solve(A_lam - H / N, g / N)
        influence = theta_s + np.linalg.solve(A_lam, g / N)
        expected = [loo, loo, prox, pbrf, influence, influence]
        for j, name in enumerate(responses):
            _close(responses[name][row], expected[j] - theta_s)
        # rung losses recomputed independently from the closed-form parameters
        mean_loss = [np.mean((Phi @ th - y) ** 2) for th in expected]
        _close(q[row], np.array(mean_loss), rtol=1e-9)


def test_bad_groups_are_refused(converged):
    X, y, cold = converged
    with pytest.raises(ValueError, match="one label per row"):
        cold.param_change(X[:4], groups=[0, 1])
    with pytest.raises(ValueError, match="can only remove training rows"):
        cold.param_change(np.vstack([X[:2], X[:1] + 7.0]), np.r_[y[:2], 0.0],
                          groups=[0, 0, 1])


def test_non_additivity_is_zero_for_influence_and_the_closed_form_gap_for_loo(converged):
    X, y, cold = converged
    N = len(X)
    dec = Decomposer(cold.net, damping=LAM, warm_start_fraction=1.0, random_state=0).fit(X, y)
    gaps = dec.non_additivity(X[ROWS], groups=LABELS)
    assert gaps.shape == (4, 6)
    theta_s = theta_of(dec.net_)
    Phi = design(X)
    for row, rows in enumerate(GROUPS.values()):
        k = len(rows)
        keep = np.setdiff1d(np.arange(N), rows)
        group = minimiser(X[keep], y[keep], MU * (N - k) / N, extra=N)
        members = sum(minimiser(np.delete(X, m, 0), np.delete(y, m), MU * (N - 1) / N, extra=N)
                      - theta_s for m in rows)
        expected = np.abs(Phi @ (group - theta_s - members)).mean()
        if k == 1:
            assert np.all(gaps[row] == 0.0)
        else:
            _close(gaps[row, 0], expected, rtol=1e-6)
            assert gaps[row, 0] > 1e-3 * np.abs(Phi @ (group - theta_s)).mean()
        assert np.all(gaps[row, 4:] <= 1e-13 * np.abs(Phi @ members).mean())  # additive
    with pytest.raises(ValueError, match="pass groups"):
        dec.non_additivity(X[ROWS], groups=None)


def test_groups_reach_the_decomposer_through_a_pipeline(converged):
    from sklearn import config_context
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, cold = converged
    with config_context(enable_metadata_routing=True):
        pipe = make_pipeline(StandardScaler(), Decomposer(cold.net, damping=LAM, random_state=0)
                             .set_transform_request(groups=True)).fit(X, y)
        through = pipe.transform(X[ROWS], groups=LABELS)
    scaled = StandardScaler().fit(X)
    direct = Decomposer(cold.net, damping=LAM, random_state=0).fit(scaled.transform(X), y)
    assert_array_equal(through, direct.transform(scaled.transform(X[ROWS]), groups=LABELS))
    assert through.shape == (4, 5)
