"""The linear datamodeling score on linear least squares, where every subset's
model is a closed form."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.stats import rankdata
from sklearn.model_selection import GridSearchCV

from skorch import NeuralNetRegressor

from linear_problems import (Linear, curvature, design, minimiser, recipe, theta_of,
                             well_conditioned_data)
from sklinfluence import (InfluenceEstimator, LinearDatamodelingScore, RemovalSplit,
                          lds_scorer)
from tolerances import RETRAIN_RTOL

MU = 0.1
N_SUBSETS = 12


@pytest.fixture(scope="module")
def problem():
    X, y = well_conditioned_data(n=30)
    net = recipe(X, MU, max_epochs=120)
    X_eval, y_eval = X[:6] + 0.1, y[:6]
    lds = LinearDatamodelingScore(net, n_subsets=N_SUBSETS, random_state=0).fit(
        X, y, X_eval, y_eval)
    return X, y, X_eval, y_eval, net, lds


def test_each_subset_model_is_the_recipe_on_that_subset(problem):
    X, y, X_eval, y_eval, _, lds = problem
    N = len(X)
    assert lds.subsets_.shape == (N_SUBSETS, N)
    assert np.all(lds.subsets_.sum(axis=1) == N // 2)
    assert len({row.tobytes() for row in lds.subsets_}) == N_SUBSETS
    theta_s = theta_of(lds.net_)
    for j, kept in enumerate(lds.subsets_):
        # the recipe on the kept rows minimises J − Σ_C L_m/N with μ(N−|C|)/N
        theta = minimiser(X[kept], y[kept], MU * kept.sum() / N, extra=N)
        scale = np.abs(theta - theta_s).max()
        assert_allclose(lds.param_changes_[j], theta - theta_s, rtol=RETRAIN_RTOL,
                        atol=1e-9 * scale)
        expected = (design(X_eval) @ theta - y_eval) ** 2
        assert_allclose(lds.measurements_[j], expected, rtol=1e-7)
    assert_allclose(lds.base_losses_, (design(X_eval) @ theta_s - y_eval) ** 2, rtol=1e-12)


def test_score_is_the_mean_rank_correlation_of_the_additive_predictions(problem):
    X, _, _, _, _, lds = problem
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(len(X), 6))
    result = lds.score_attributions(scores)
    removed = ~lds.subsets_
    for z in range(6):
        prediction = lds.base_losses_[z] + np.array([scores[c, z].sum() for c in removed])
        ranks = np.corrcoef(rankdata(prediction), rankdata(lds.measurements_[:, z]))[0, 1]
        assert_allclose(result.per_point[z], ranks, rtol=1e-12)
        assert_allclose(result.predictions[:, z], prediction, rtol=1e-12)
    assert_allclose(result.mean, result.per_point.mean(), rtol=1e-12)
    assert abs(result.mean) < 0.5 and result.bootstrap_std > 0


def test_influence_on_a_linear_model_predicts_the_subsets_and_noise_does_not(problem):
    X, y, X_eval, y_eval, net, lds = problem
    est = InfluenceEstimator(net, damping=1e-6, solver="exact", measure="loss",
                             random_state=0).fit(X, y)
    good = lds.score_attributions(est.loss_change(X, y, X_eval, y_eval))
    assert good.mean > 0.8, good.per_point
    shuffled = lds.score_attributions(
        np.random.default_rng(0).permutation(est.loss_change(X, y, X_eval, y_eval)))
    assert shuffled.mean < good.mean - 0.4


def test_same_subsets_give_the_same_models_and_batching_changes_nothing(problem):
    X, y, X_eval, y_eval, net, lds = problem
    again = LinearDatamodelingScore(net, subsets=lds.subsets_, removal_batch_size=1,
                                    random_state=0).fit(X, y, X_eval, y_eval)
    assert_array_equal(again.subsets_, lds.subsets_)
    scale = np.abs(lds.param_changes_).max()
    assert_allclose(again.param_changes_, lds.param_changes_, rtol=0, atol=1e-13 * scale)


def test_seeds_average_the_recipes_noise_and_reach_every_retraining_path(problem):
    X, y, X_eval, y_eval, _, lds = problem
    # mini-batches in a shuffled order: the seed changes each subset's model
    noisy = NeuralNetRegressor(Linear, module__n_in=X.shape[1], max_epochs=6, batch_size=8,
                               lr=0.05, iterator_train__shuffle=True, optimizer__weight_decay=MU,
                               train_split=None, verbose=0)
    subsets = lds.subsets_[:5]
    one = LinearDatamodelingScore(noisy, subsets=subsets, random_state=0).fit(
        X, y, X_eval, y_eval)
    three = LinearDatamodelingScore(noisy, subsets=subsets, n_seeds=3, random_state=0).fit(
        X, y, X_eval, y_eval)
    assert three.seeds_[0] == one.seeds_[0] == one.seed_ and len(set(three.seeds_)) == 3
    assert three.seed_measurements_.shape == (3, 5, len(X_eval))
    assert_array_equal(three.seed_measurements_[0], one.measurements_)
    assert_array_equal(three.param_changes_, one.param_changes_)
    spread = np.abs(three.seed_measurements_[1:] - three.seed_measurements_[0]).max()
    assert spread > 1e-3 * np.abs(one.measurements_).max()
    assert_allclose(three.measurements_, three.seed_measurements_.mean(axis=0), rtol=1e-15)
    # the one-at-a-time path sees the same seeds as the vectorised ensemble
    sequential = LinearDatamodelingScore(noisy, subsets=subsets, n_seeds=3,
                                         removal_batch_size=1, random_state=0).fit(
        X, y, X_eval, y_eval)
    assert_allclose(sequential.seed_measurements_, three.seed_measurements_, rtol=1e-12)
    with pytest.raises(ValueError, match="needs reference='retrain'"):
        LinearDatamodelingScore(noisy, subsets=subsets, n_seeds=2, reference="pbrf",
                                random_state=0).fit(X, y, X_eval, y_eval)


def test_lds_scorer_picks_the_damping_in_a_grid_search(problem):
    X, y, _, _, net, lds = problem
    search = GridSearchCV(InfluenceEstimator(net, solver="exact", random_state=0),
                          {"damping": [1e-6, 10.0]}, cv=RemovalSplit(n_remove=5, n_splits=1),
                          scoring=lds_scorer(lds)).fit(X, y)
    assert search.best_params_ == {"damping": 1e-6}
    scores = search.cv_results_["mean_test_score"]
    assert scores[0] > scores[1]


def test_pbrf_reference_and_bad_input(problem):
    X, y, X_eval, y_eval, net, lds = problem
    pbrf = LinearDatamodelingScore(net, subsets=lds.subsets_[:4], reference="pbrf",
                                   damping=1e-2, random_state=0).fit(X, y, X_eval, y_eval)
    theta_s = theta_of(pbrf.net_)
    N = len(X)
    A_lam = curvature(X, MU) + 1e-2 * np.eye(len(theta_s))
    for j, kept in enumerate(lds.subsets_[:4]):
        Phi_C = design(X[~kept])
        g = (2 * (Phi_C @ theta_s - y[~kept])[:, None] * Phi_C).sum(axis=0)
        H = A_lam - 2 * Phi_C.T @ Phi_C / N  # the objective's Hessian
        expected = np.linalg.solve(H, g / N)  # closed form of a group, not converged
        # the solve stops at ‖∇‖ ≤ pbrf_tol ‖∇ at θˢ‖ = 1e-9 ‖g/N‖, so the parameters err
        # by at most ‖H⁻¹‖ times that (κ(H) ≈ 3.7 here), plus rounding
        bound = 1e-9 * np.linalg.norm(g / N) / np.linalg.eigvalsh(H)[0]
        error = np.linalg.norm(pbrf.param_changes_[j] - expected)
        assert error <= bound + 1e-13 * np.linalg.norm(expected)
    with pytest.raises(ValueError, match="must have shape"):
        lds.score_attributions(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="NaN"):
        lds.score_attributions(np.full((len(X), 6), np.nan))
    with pytest.raises(ValueError, match="boolean mask"):
        LinearDatamodelingScore(net, subsets=np.zeros((3, 5)), random_state=0).fit(
            X, y, X_eval, y_eval)


def test_column_rank_correlation_is_scipys_spearman_with_ties_and_constant_columns():
    from scipy.stats import spearmanr

    from sklinfluence.datamodeling import _spearman_columns

    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(15, 5)).astype(float)  # many ties
    b = rng.normal(size=(15, 5))
    b[:, 1] = b[:, 0]
    a[:, 2] = 1.0  # constant: undefined
    got = _spearman_columns(a, b)
    for z in range(5):
        if z == 2:
            assert np.isnan(got[z])
        else:
            assert_allclose(got[z], spearmanr(a[:, z], b[:, z])[0], rtol=1e-13)
