"""TracIn-CP under a learning-rate schedule, against its closed form on linear least
squares: ``Σ_k (η_k/B) ∇L_m(θ_k)ᵀ ∇L_z(θ_k)`` with ``θ_k`` the parameters after epoch
``k`` and ``η_k`` the step size of that epoch's own steps (Pruthi et al.'s step size
between checkpoints ``k − 1`` and ``k``), all computed here without the library."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from skorch.callbacks import LRScheduler

from linear_problems import grads, recipe, replay_recipe, well_conditioned_data
from sklinfluence import TracInCP
from tolerances import CLOSED_FORM_RTOL

MU, EPOCHS = 0.1, 5
#: Step-size factors, far from monotone: pairing them with the wrong checkpoints shows.
FACTORS = (1.0, 0.2, 0.7, 0.05, 0.5, 0.3, 0.9, 0.15, 0.6, 0.4, 0.8, 0.25, 0.35, 0.45, 0.55,
           0.65, 0.75)


def factor(step):
    return FACTORS[step]


def _scheduled(X, **kwargs):
    net = recipe(X, MU, max_epochs=EPOCHS)
    return net.set_params(callbacks=[("schedule", LRScheduler(policy="LambdaLR",
                                                              lr_lambda=factor, **kwargs))])


@pytest.fixture(scope="module")
def fitted():
    X, y = well_conditioned_data()
    net = _scheduled(X)  # stepped at each epoch's end
    return X, y, net, TracInCP(net, random_state=0).fit(X, y)


def test_each_checkpoint_carries_the_step_size_of_its_own_epoch(fitted):
    X, y, net, est = fitted
    lr = net.get_params()["lr"]
    rates = lr * np.array(FACTORS[:EPOCHS])  # epoch k trains at lr·FACTORS[k]
    assert_allclose(est.learning_rates_, rates, rtol=1e-15)
    theta_0 = est.initial_params_.numpy()
    for k in range(EPOCHS):
        assert_allclose(est.checkpoints_[k].numpy(),
                        replay_recipe(net, X, y, theta_0, k + 1, learning_rates=rates),
                        rtol=1e-12)


def test_scores_are_the_step_weighted_gradient_products_at_the_checkpoints(fitted):
    X, y, net, est = fitted
    lr, B = net.get_params()["lr"], len(X)
    theta_0 = est.initial_params_.numpy()
    rates = lr * np.array(FACTORS[:EPOCHS])
    thetas = [replay_recipe(net, X, y, theta_0, k + 1, learning_rates=rates)
              for k in range(EPOCHS)]
    train, evals = slice(0, 5), slice(20, 23)
    expected = sum(rates[k] / B * grads(X[train], y[train], th) @ grads(X[evals], y[evals], th).T
                   for k, th in enumerate(thetas))
    assert_allclose(est.loss_change(X[train], y[train], X[evals], y[evals]), expected,
                    rtol=CLOSED_FORM_RTOL)
    self_expected = sum(rates[k] / B * (grads(X[train], y[train], th) ** 2).sum(axis=1)
                        for k, th in enumerate(thetas))
    assert_allclose(est.score_samples(X[train]), self_expected, rtol=CLOSED_FORM_RTOL)
    # the pairing matters here: the same sums with the rates reversed are far off
    reversed_pairing = sum(rates[::-1][k] / B * (grads(X[train], y[train], th) ** 2).sum(axis=1)
                           for k, th in enumerate(thetas))
    assert np.abs(reversed_pairing / self_expected - 1).max() > 0.1


def test_a_schedule_stepping_per_batch_gives_each_epoch_the_mean_of_its_steps():
    X, y = well_conditioned_data()
    net = _scheduled(X, step_every="batch").set_params(batch_size=10)  # 3 steps an epoch
    est = TracInCP(net, random_state=0).fit(X, y)
    lr = net.get_params()["lr"]
    steps = lr * np.array(FACTORS[:3 * EPOCHS]).reshape(EPOCHS, 3)
    assert_allclose(est.learning_rates_, steps.mean(axis=1), rtol=1e-15)
    assert est.train_batch_size_ == 10
