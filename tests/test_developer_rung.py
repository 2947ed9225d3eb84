"""The developer guide's examples (``docs/developers.rst`` includes this file): a new
configuration of the objective is a row, a new kind of computation is one small class."""

from dataclasses import dataclass

import numpy as np
from numpy.testing import assert_allclose

from linear_problems import curvature, design, grads, recipe, theta_of, well_conditioned_data
from sklinfluence import LOOEstimator
from sklinfluence.model.removal import group_removals, single_removals
from sklinfluence.response.responder import Responder
from sklinfluence.response.rungs import Minimize, Rung, removal_forces
from tolerances import CLOSED_FORM_RTOL

# -- a new configuration: one row -------------------------------------------------------
#: The minimiser of J − εL_m itself (no Bregman divergence, no proximity), solved
#: full batch from θˢ: what warm-start retraining reaches when it converges.
CONVERGED_LOO = Minimize("converged_loo")


# -- a new computation: one class -------------------------------------------------------
@dataclass(frozen=True)
class GradDot(Rung):
    """Grad-dot as a response: ``ε Σ_S w_m ∇L_m(θˢ) / λ``, the influence rung
    with the curvature replaced by 0."""

    closed_form = True  # all removals at once, no cache

    def key_parts(self, ctx):
        return [ctx.damping]

    def responses(self, responder, removals):
        ctx = responder.context
        return ctx.epsilon * removal_forces(ctx.model, removals, ctx.batch_size) / ctx.damping
# -- end of the examples ----------------------------------------------------------------


MU, LAM = 0.1, 0.05


def _fitted():
    X, y = well_conditioned_data()
    est = LOOEstimator(recipe(X, MU, max_epochs=120), damping=LAM, random_state=0).fit(X, y)
    return X, y, est, Responder(est._context())


def test_a_new_row_converged_loo_is_sherman_morrison():
    X, y, est, responder = _fitted()
    N = len(X)
    theta_s = theta_of(est.net_)
    A = curvature(X, MU)
    removals = single_removals(est.X_train_[:3], est.T_train_[:3], np.arange(3))
    delta = responder.param_change(CONVERGED_LOO, removals).numpy()
    for m in range(3):
        x, g = design(X[m:m + 1])[0], grads(X[m:m + 1], y[m:m + 1], theta_s)[0]
        h = x @ np.linalg.solve(A, x)
        expected = np.linalg.solve(A, g) / N / (1 - 2 * h / N)  # closed form, θˢ converged
        assert_allclose(delta[m], expected, rtol=1e-7)


def test_a_new_class_grad_dot_is_the_gradient_over_the_damping():
    X, y, est, responder = _fitted()
    theta_s = theta_of(est.net_)
    removals, _ = group_removals(est.X_train_[:5], est.T_train_[:5], np.arange(5),
                                 [0, 0, 1, 2, 2])
    delta = responder.param_change(GradDot("grad_dot"), removals).numpy()
    g = grads(X[:5], y[:5], theta_s)
    expected = np.stack([g[:2].sum(0), g[2], g[3:].sum(0)]) / len(X) / LAM
    assert_allclose(delta, expected, rtol=CLOSED_FORM_RTOL)
