"""Influence vs actual leave-one-out refits on an L2-regularised logistic regression.

The net is a bias-free ``Linear`` on ``[x, 1]`` with ``BCEWithLogitsLoss`` and
weight decay ``μ``, whose objective ``(1/N) Σ L_i + (μ/2)‖θ‖²`` is scikit-learn's
``LogisticRegression(fit_intercept=False, C=1/(Nμ))`` objective divided by
``CN``. Its parameters are scikit-learn's solution (adopted with
``FrozenEstimator``); every leave-one-out model is a scikit-learn refit of the
same recipe on the N−1 remaining rows (``C = 1/((N−1)μ)``).
"""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from skorch import NeuralNetBinaryClassifier
from sklearn.datasets import load_breast_cancer
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression

from sklinfluence import InfluenceEstimator
from tolerances import IF_LOO_MIN_CORRELATION

N_TRAIN, N_EVAL, C = 200, 100, 0.1


def _logloss(w, X, y):
    z = X @ w
    return np.logaddexp(0, z) - y * z


def _fit(X, y, mu):
    clf = LogisticRegression(C=1.0 / (X.shape[0] * mu), fit_intercept=False, tol=1e-12,
                             max_iter=10_000)
    return clf.fit(X, y).coef_[0]


@pytest.fixture(scope="module")
def problem():
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    rng = np.random.default_rng(0)
    order = rng.permutation(X.shape[0])
    tr, ev = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_EVAL]
    mu = 1.0 / (C * N_TRAIN)
    w = _fit(X[tr], y[tr], mu)
    loo = np.array([_fit(np.delete(X[tr], m, 0), np.delete(y[tr], m), mu)
                    for m in range(N_TRAIN)])
    return X[tr], y[tr], X[ev], y[ev], mu, w, loo


def test_influence_tracks_leave_one_out_refits(problem):
    X, y, X_ev, y_ev, mu, w, loo = problem
    net = NeuralNetBinaryClassifier(torch.nn.Linear(X.shape[1], 1, bias=False).double(),
                                    optimizer__weight_decay=mu, verbose=0).initialize()
    with torch.no_grad():
        net.module_.weight.copy_(torch.as_tensor(w)[None])
    est = InfluenceEstimator(FrozenEstimator(net), damping=0.0).fit(X, y)

    actual_self = np.array([_logloss(loo[m], X[m], y[m]) - _logloss(w, X[m], y[m])
                            for m in range(N_TRAIN)])
    estimated_self = est.score_samples(X)
    actual_eval = np.array([_logloss(v, X_ev, y_ev).mean() for v in loo]) - _logloss(w, X_ev, y_ev).mean()
    estimated_eval = est.loss_change(X, y, X_ev, y_ev).mean(axis=1)

    for name, a, b in [("self", actual_self, estimated_self), ("held-out", actual_eval, estimated_eval)]:
        pearson, spearman = pearsonr(a, b)[0], spearmanr(a, b)[0]
        print(f"IF vs LOO ({name}): Pearson {pearson:.4f}, Spearman {spearman:.4f}")
        assert pearson > IF_LOO_MIN_CORRELATION and spearman > IF_LOO_MIN_CORRELATION
    # ε gᵀ(C + λI)⁻¹g > 0; the refits' self-effect can dip below 0 for samples of
    # ~zero influence, since the N−1 recipe also rescales the penalty.
    assert np.all(estimated_self > 0)
