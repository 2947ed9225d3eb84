"""scikit-learn linear models as ``net``: closed forms, refits and IF–LOO agreement."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator

ALPHA = 10.0


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X[:342], y[:342], X[342:], y[342:]


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:300]], y[order[:300]], X[order[300:450]], y[order[300:450]]


def _flat(model):
    return np.concatenate([np.ravel(model.coef_), np.atleast_1d(model.intercept_)])


def test_ridge_model_matches_scikit_learn_and_loo_matches_the_closed_form(diabetes):
    X, y, _, _ = diabetes
    N = len(X)
    loo = LOOEstimator(Ridge(alpha=ALPHA), random_state=0).fit(X, y)
    theta = _flat(loo.net_)
    assert_allclose(loo.model_.params.numpy(), theta, rtol=1e-12)
    # J = (1/N)Σ r² + (μ/2)‖w‖² with μ = 2α/N and an unpenalised intercept
    Phi = np.hstack([X, np.ones((N, 1))])
    mu = np.r_[np.full(X.shape[1], 2 * ALPHA / N), 0.0]
    A = 2.0 / N * Phi.T @ Phi + np.diag(mu)
    assert_allclose(loo.model_.weight_decay.numpy(), mu, rtol=1e-15)
    removed = [0, 17, 123]
    got = loo.param_change(X[removed])
    for row, m in enumerate(removed):
        x, r = Phi[m], Phi[m] @ theta - y[m]
        h = x @ np.linalg.solve(A, x)
        closed = np.linalg.solve(A, 2 * r * x) / N / (1 - 2 * h / N)  # Sherman–Morrison
        refit = _flat(Ridge(alpha=ALPHA).fit(np.delete(X, m, 0), np.delete(y, m))) - theta
        assert_allclose(got[row], closed, rtol=1e-6, atol=1e-9 * np.abs(closed).max())
        assert_allclose(got[row], refit, rtol=1e-10, atol=1e-12)


def test_linear_regression_influence_is_loo_without_the_leverage_factor(diabetes):
    X, y, _, _ = diabetes
    N = len(X)
    est = InfluenceEstimator(LinearRegression(), damping=0.0).fit(X, y)
    loo = LOOEstimator(LinearRegression()).fit(X, y)
    Phi = np.hstack([X, np.ones((N, 1))])
    leverage = np.einsum("ij,ji->i", Phi, np.linalg.solve(Phi.T @ Phi, Phi.T))
    removed = np.arange(10)
    # undamped influence and LOO differ by the factor 1/(1 − leverage)
    assert_allclose(loo.param_change(X[removed]),
                    est.param_change(X[removed]) / (1 - leverage[removed])[:, None],
                    rtol=1e-8, atol=1e-10)


def _agreement(est, loo, X, y, X_ev, y_ev):
    out = {}
    out["self"] = (est.score_samples(X, y), loo.score_samples(X, y))
    out["held-out"] = (est.loss_change(X, y, X_ev, y_ev).mean(1),
                       loo.loss_change(X, y, X_ev, y_ev).mean(1))
    return {k: (pearsonr(*v)[0], spearmanr(*v)[0]) for k, v in out.items()}


def test_ridge_influence_agrees_with_loo(diabetes):
    X, y, X_ev, y_ev = diabetes
    est = InfluenceEstimator(Ridge(alpha=ALPHA), damping=0.0).fit(X, y)
    loo = LOOEstimator(Ridge(alpha=ALPHA)).fit(X, y)
    for name, (pearson, spearman) in _agreement(est, loo, X, y, X_ev, y_ev).items():
        print(f"Ridge IF vs LOO ({name}): Pearson {pearson:.4f}, Spearman {spearman:.4f}")
        assert pearson > 0.95 and spearman > 0.95


@pytest.mark.parametrize("C, floor", [(0.1, 0.9), (1.0, None)])
def test_logistic_influence_agrees_with_loo(cancer, C, floor):
    X, y, X_ev, y_ev = cancer
    model = LogisticRegression(C=C, tol=1e-10, max_iter=10_000)
    est = InfluenceEstimator(model, damping=0.0).fit(X, y)
    loo = LOOEstimator(model).fit(X, y)
    for name, (pearson, spearman) in _agreement(est, loo, X, y, X_ev, y_ev).items():
        print(f"LogisticRegression(C={C}) IF vs LOO ({name}): "
              f"Pearson {pearson:.4f}, Spearman {spearman:.4f}")
        if floor is not None:
            assert pearson > floor and spearman > floor
        else:  # C=1: reported; a few high-leverage samples bend the first-order estimate
            assert spearman > 0.9


def test_logistic_decomposition_on_a_convex_model(cancer):
    X, y, _, _ = cancer
    model = LogisticRegression(C=0.1, solver="newton-cholesky", tol=1e-14)  # converged
    dec = Decomposer(model, damping=1e-2, metric="output_l2").fit(X, y)
    terms = dec.transform(X[:5])
    assert np.all(terms[:, 0] == 0.0)  # warm start = cold start: the same convex refit
    assert np.all(terms[:, 1] > 0)  # the proximity that damping adds
    assert np.all(terms[:, 2] < 1e-6 * terms[:, 1])  # converged: no non-convergence gap
    # linearization error: O(ε²), small next to the response itself (O(ε))
    responses = dec.rung_responses(X[:5])["exact_influence"]
    Xt = dec.X_train_
    size = np.array([np.linalg.norm((dec.model_.forward(dec.model_.params + torch.as_tensor(d), Xt)
                                     - dec.model_.forward(dec.model_.params, Xt)).detach().numpy(),
                                    axis=1).mean() for d in responses])
    print("linearization error / response size:", terms[:, 3] / size)
    assert np.all(terms[:, 3] < 0.1 * size)


def test_multinomial_and_frozen_models():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    model = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(X, names)
    # softmax logits shifted by a constant change nothing and the intercept is not
    # penalised: the GGN is singular along that direction, which a tiny damping fixes
    # (gradients have no component along it, so the responses do not change)
    with pytest.raises(ValueError, match="not positive definite"):
        InfluenceEstimator(FrozenEstimator(model), damping=0.0).fit(X, names)
    est = InfluenceEstimator(FrozenEstimator(model), damping=1e-9).fit(X, names)
    assert est.net_ is model and list(est.classes_) == list(model.classes_)
    assert est.model_.n_params == 3 * 4 + 3
    pbrf = PBRFEstimator(FrozenEstimator(model), damping=1e-3).fit(X, names)
    loo = LOOEstimator(FrozenEstimator(model)).fit(X, names)
    rows = np.arange(0, 150, 10)
    scores = [e.score_samples(X[rows]) for e in (est, pbrf, loo)]
    print("iris multinomial: IF–PBRF Spearman %.3f, IF–LOO Spearman %.3f"
          % (spearmanr(scores[0], scores[1])[0], spearmanr(scores[0], scores[2])[0]))
    assert spearmanr(scores[0], scores[1])[0] > 0.9 and spearmanr(scores[0], scores[2])[0] > 0.9


@pytest.mark.parametrize("model, fragment", [
    (LogisticRegression(solver="liblinear"), "penalises the intercept"),
    (LogisticRegression(class_weight="balanced"), "class_weight"),
    (LogisticRegression(l1_ratio=1.0, solver="saga"), "L2-penalised"),
    (LinearRegression(positive=True), "positive=True"),
    (FrozenEstimator(Ridge()), "needs a fitted model"),
])
def test_unsupported_linear_models_are_refused(model, fragment, diabetes):
    X, y, _, _ = diabetes
    with pytest.raises(ValueError, match=fragment):
        InfluenceEstimator(model).fit(X, (y > 140).astype(int))
