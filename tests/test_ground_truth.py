"""PBRFEstimator, LOOEstimator and Decomposer: the user contract."""

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_array_equal
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator

from nets import make_net, toy_data
from sklinfluence import Decomposer, LOOEstimator, PBRFEstimator
from sklinfluence.response.responder import TERMS


@pytest.fixture(scope="module")
def data():
    return toy_data("CrossEntropyLoss", n=30)


def _net(**kw):
    return make_net("CrossEntropyLoss", 4, max_epochs=4, **kw)


def test_cold_start_needs_the_unfitted_net_warm_start_does_not(data):
    X, y = data
    trained = _net().fit(X, y)
    with pytest.raises(ValueError, match="θ⁰.*FrozenEstimator.*warm_start=True"):
        LOOEstimator(FrozenEstimator(trained)).fit(X, y).score_samples(X[:1])
    warm = LOOEstimator(FrozenEstimator(trained), warm_start=True).fit(X, y)
    assert warm.param_change(X[:2]).shape == (2, warm.model_.n_params)


def test_loo_removes_only_training_rows(data):
    X, y = data
    loo = LOOEstimator(_net(), random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="can only remove training rows"):
        loo.score_samples(X[:2] + 0.5, y[:2])
    wrong = (y[:1] + 1) % 3
    with pytest.raises(ValueError, match="1 of the given rows are not training rows"):
        loo.score_samples(X[:1], wrong)


def test_responses_are_memoised_and_timed(data):
    X, y = data
    loo = LOOEstimator(_net(), random_state=0).fit(X, y)
    first = loo.score_samples(X[[3, 5]])
    assert len(loo.responder_.timings["cold_start_loo"]) == 2
    again = loo.loss_change(X[[5, 3]], None, X[:4])
    assert len(loo.responder_.timings["cold_start_loo"]) == 2  # nothing retrained
    assert again.shape == (2, 4)
    assert_array_equal(loo.score_samples(X[[5]]), first[[1]])


def test_pbrf_records_convergence_and_warns_when_cut_short(data):
    X, y = data
    pbrf = PBRFEstimator(_net(), damping=0.5, random_state=0).fit(X, y)
    pbrf.score_samples(X[:3])
    info = pbrf.responder_.last_info
    assert info["converged"].all() and (info["grad_norm"] <= 1e-9 * info["initial_grad_norm"]).all()
    short = PBRFEstimator(_net(), damping=0.5, max_iter=1, tol=1e-15, random_state=0).fit(X, y)
    with pytest.warns(ConvergenceWarning, match=r"stopped short.*after 1 iterations with gradient norm"):
        short.score_samples(X[:1])
    # a sample that is not a training row can still be down-weighted
    assert np.isfinite(pbrf.score_samples(X[:1] + 0.3, y[:1])).all()


def test_the_convexity_diagnostic_of_a_failed_solve_is_bounded(data, monkeypatch):
    """A stopped PBRF solve is explained by the smallest eigenvalue of its Hessian,
    estimated by Lanczos within ``LOWEST_CURVATURE_RESTARTS``: the estimate is that
    eigenvalue where Lanczos settles, and where it does not, NaN and a warning that
    says so (on a 100,000-parameter net an unbounded Lanczos took minutes)."""
    import torch

    from sklinfluence.response import pbrf as pbrf_module

    X, y = data
    short = PBRFEstimator(_net(), damping=0.5, max_iter=1, tol=1e-15, random_state=0).fit(X, y)
    objective = pbrf_module.ResponseObjective(
        short.model_, short.X_train_, short.T_train_, short.model_.params, short.X_train_[:1],
        short.T_train_[:1], torch.ones(1, dtype=torch.float64), short.epsilon_, 0.5, True)
    hessian = torch.func.hessian(objective)(short.model_.params.detach())
    assert abs(objective.lowest_curvature() - float(torch.linalg.eigvalsh(hessian)[0])) <= \
        1e-3 * float(torch.linalg.eigvalsh(hessian).abs().max())
    monkeypatch.setattr(pbrf_module, "LOWEST_CURVATURE_RESTARTS", 1)
    monkeypatch.setattr(pbrf_module, "eigsh", lambda *a, **k: (_ for _ in ()).throw(
        pbrf_module.ArpackNoConvergence("no convergence", np.empty(0), np.empty((0, 0)))))
    assert np.isnan(objective.lowest_curvature())
    with pytest.warns(ConvergenceWarning, match="could not be settled cheaply"):
        short.score_samples(X[2:3])


def test_decomposer_pandas_output_and_rung_views(data):
    X, y = data
    dec = Decomposer(_net(), damping=0.5, random_state=0).set_output(transform="pandas")
    frame = dec.fit(X, y).transform(X[:3])
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(TERMS)
    assert (frame.to_numpy() >= 0).all()
    assert_array_equal(dec.get_feature_names_out(), TERMS)
    responses = dec.rung_responses(X[:3])
    assert list(responses) == dec.rungs_ and responses["pbrf"].shape == (3, dec.model_.n_params)
    scores = dec.rung_scores(X[:3])
    assert scores.shape == (3, 6) and np.all(scores[:, -1] > 0)
    # the terms are distances between consecutive rungs' outputs on the training inputs
    import torch

    model, Xt = dec.model_, torch.as_tensor(X)
    for i in range(3):
        out = [model.forward(model.params + torch.as_tensor(responses[r][i]), Xt).detach().numpy()
               for r in dec.rungs_]
        expected = [np.linalg.norm(out[k + 1] - out[k], axis=1).mean() for k in range(5)]
        np.testing.assert_allclose(frame.iloc[i].to_numpy(), expected, rtol=1e-12, atol=1e-15)


def test_decomposer_evaluation_set(data):
    X, y = data
    X_new = X[:5] + 0.1
    dec = Decomposer(_net(), damping=0.5, random_state=0).fit(X, y, X_eval=X_new)
    assert dec.transform(X[:2]).shape == (2, 5)
    with pytest.raises(ValueError, match="needs evaluation targets"):
        dec.rung_losses(X[:2])
    with pytest.raises(ValueError, match="not training rows"):
        Decomposer(_net(), metric="loss", random_state=0).fit(X, y, X_eval=X_new)
    signed = Decomposer(_net(), damping=0.5, metric="loss", random_state=0)
    terms = signed.fit(X, y, X_eval=X_new, y_eval=y[:5]).transform(X[:2])
    q = signed.rung_losses(X[:2])
    np.testing.assert_allclose(terms.sum(1), q[:, -1] - q[:, 0], rtol=0, atol=1e-14)
