"""One definition of each score: ``measure="linear"`` and ``measure="loss"`` everywhere."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, PBRFEstimator
from sklinfluence.base import RungViewMixin
from sklinfluence.model.functional import FunctionalModel
from tolerances import CLOSED_FORM_RTOL

X, Y = toy_data("CrossEntropyLoss", n=40)
NET = make_net("CrossEntropyLoss", 4, max_epochs=6)
ROWS = X[:6]


@pytest.fixture(scope="module")
def fitted():
    kw = dict(damping=0.1, solver="exact", random_state=0)
    return (InfluenceEstimator(NET, **kw).fit(X, Y),
            InfluenceEstimator(NET, measure="loss", **kw).fit(X, Y),
            Decomposer(NET, measure="linear", **kw).fit(X, Y),
            Decomposer(NET, **kw).fit(X, Y))


def _independent_scores(est):
    """``ε gᵀ(G + λI)⁻¹ g`` and ``L(θˢ + Δ) − L(θˢ)`` from a dense GGN built by hand."""
    model: FunctionalModel = est.model_
    theta = model.params
    N = len(X)
    Xt, Tt = est.X_train_, est.T_train_
    J = torch.func.vmap(lambda x: torch.func.jacrev(
        lambda p: model.forward(p, x[None])[0])(theta))(Xt)  # (N, K, P)
    p = torch.softmax(model.forward(theta, Xt), dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / N + torch.diag(model.weight_decay)
    A = G + 0.1 * torch.eye(len(theta), dtype=G.dtype)
    g = model.per_sample_grads(theta, Xt[:6], Tt[:6])
    delta = torch.linalg.solve(A, g.T).T / N
    linear = (g * delta).sum(dim=1)
    loss = torch.stack([model.losses(theta + d, Xt[i:i + 1], Tt[i:i + 1])[0]
                        for i, d in enumerate(delta)]) - model.losses(theta, Xt[:6], Tt[:6])
    return linear.detach().numpy(), loss.detach().numpy()


def test_both_measures_have_one_meaning_across_estimators_and_the_decomposer(fitted):
    linear_est, loss_est, linear_dec, loss_dec = fitted
    linear, loss = _independent_scores(linear_est)
    assert np.abs(linear - loss).max() > 1e-3 * np.abs(linear).max()  # genuinely different
    assert_allclose(linear_est.score_samples(ROWS), linear, rtol=CLOSED_FORM_RTOL)
    assert_allclose(loss_est.score_samples(ROWS), loss, rtol=CLOSED_FORM_RTOL)
    assert_allclose(linear_dec.rung_scores(ROWS)[:, 5], linear, rtol=CLOSED_FORM_RTOL)
    assert_allclose(loss_dec.rung_scores(ROWS)[:, 5], loss, rtol=CLOSED_FORM_RTOL)


def test_the_linear_loss_change_matrix_is_the_classic_influence_matrix(fitted):
    linear_est, loss_est, _, _ = fitted
    classic = linear_est.loss_change(ROWS, None, X[30:33], Y[30:33])  # solves the small side
    generic = RungViewMixin.loss_change(linear_est, ROWS, None, X[30:33], Y[30:33])  # ∇Qᵀ Δθ
    assert_allclose(generic, classic, rtol=1e-10)
    exact = loss_est.loss_change(ROWS, None, X[30:33], Y[30:33])
    gap = np.linalg.norm(exact - classic) / np.linalg.norm(classic)
    assert 1e-3 < gap < 0.1  # the same to first order (ε = 1/40 here), not equal


def test_pbrf_measured_linearly_is_its_first_order_loss_change():
    est = PBRFEstimator(NET, damping=0.1, measure="linear", random_state=0).fit(X, Y)
    delta = torch.as_tensor(est.param_change(ROWS))
    g = est.model_.per_sample_grads(est.model_.params, est.X_train_[:6], est.T_train_[:6])
    assert_allclose(est.score_samples(ROWS), (g * delta).sum(dim=1).numpy(), rtol=1e-12)


def test_bad_measure_is_refused():
    with pytest.raises(ValueError, match="'measure' parameter"):
        InfluenceEstimator(NET, measure="l2").fit(X, Y)
