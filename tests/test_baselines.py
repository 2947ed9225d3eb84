"""Baselines (docs/theory.rst, "Baselines") against closed forms on linear least squares."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import Ridge

from linear_problems import grads, recipe, replay_recipe, theta_of, well_conditioned_data
from sklinfluence import InfluenceEstimator, TracInCP, training_loss
from tolerances import CLOSED_FORM_RTOL

MU, EPOCHS = 0.1, 6


@pytest.fixture(scope="module")
def fitted():
    X, y = well_conditioned_data()
    net = recipe(X, MU, max_epochs=EPOCHS)
    return X, y, net, TracInCP(net, random_state=0).fit(X, y)


def test_tracin_checkpoints_are_the_recipe_after_each_epoch(fitted):
    X, y, net, est = fitted
    theta_0 = est.initial_params_.numpy()
    for k in range(EPOCHS):
        assert_allclose(est.checkpoints_[k].numpy(), replay_recipe(net, X, y, theta_0, k + 1),
                        rtol=1e-12)
    assert_allclose(est.learning_rates_, net.get_params()["lr"])
    assert est.train_batch_size_ == len(X)
    # the checkpoints do not change the fit
    assert torch.equal(est.model_.params,
                       InfluenceEstimator(net, random_state=0).fit(X, y).model_.params)
    assert est.net_.callbacks is None


def test_tracin_is_the_step_weighted_sum_of_gradient_dot_products(fitted):
    X, y, net, est = fitted
    lr, B = net.get_params()["lr"], len(X)
    expected = sum(lr / B * grads(X[:5], y[:5], th.numpy()) @ grads(X[20:23], y[20:23],
                                                                    th.numpy()).T
                   for th in est.checkpoints_)
    assert_allclose(est.loss_change(X[:5], y[:5], X[20:23], y[20:23]), expected,
                    rtol=CLOSED_FORM_RTOL)
    self_expected = sum(lr / B * (grads(X[:5], y[:5], th.numpy()) ** 2).sum(axis=1)
                        for th in est.checkpoints_)
    assert_allclose(est.score_samples(X[:5]), self_expected, rtol=CLOSED_FORM_RTOL)
    group = sum(lr / B * (grads(X[:3], y[:3], th.numpy()).sum(axis=0) ** 2).sum()
                for th in est.checkpoints_)
    assert_allclose(est.score_samples(X[:5], groups=[0, 0, 0, 1, 2])[0], group,
                    rtol=CLOSED_FORM_RTOL)


def test_training_loss_is_the_loss_at_the_trained_parameters(fitted):
    X, y, _, est = fitted
    theta = theta_of(est.net_)
    r = np.hstack([X[:4], np.ones((4, 1))]) @ theta - y[:4]
    assert_allclose(training_loss(est, X[:4]), r ** 2, rtol=CLOSED_FORM_RTOL)


def test_tracin_needs_the_training_run(fitted):
    X, y, net, est = fitted
    with pytest.raises(ValueError, match="FrozenEstimator net was trained elsewhere"):
        TracInCP(FrozenEstimator(est.net_)).fit(X, y)
    with pytest.raises(ValueError, match="no epochs to checkpoint"):
        TracInCP(Ridge()).fit(X, y)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_grad_dot_is_the_gradient_dot_product_over_decay_plus_damping(fitted, damping):
    X, y, net, _ = fitted
    est = InfluenceEstimator(net, solver="identity", damping=damping, random_state=0).fit(X, y)
    theta = theta_of(est.net_)
    g_train, g_eval = grads(X[:5], y[:5], theta), grads(X[20:23], y[20:23], theta)
    expected = g_train @ g_eval.T / len(X) / (MU + damping)
    assert_allclose(est.loss_change(X[:5], y[:5], X[20:23], y[20:23]),
                    expected, rtol=CLOSED_FORM_RTOL)
    assert_allclose(est.score_samples(X[:5]), (g_train ** 2).sum(axis=1) / len(X) /
                    (MU + damping), rtol=CLOSED_FORM_RTOL)
    # an approximation, and it says how far it is from the damped Gauss–Newton solve
    assert est.diagnostics_["approximate"] is True
    assert est.diagnostics_["converged"] is None
    assert est.diagnostics_["max_relative_residual"] > 1e-2


def test_grad_dot_needs_damping_or_weight_decay():
    X, y = well_conditioned_data()
    with pytest.raises(ValueError, match="needs damping > 0"):
        InfluenceEstimator(recipe(X, 0.0, max_epochs=2), solver="identity", damping=0.0,
                           random_state=0).fit(X, y)
