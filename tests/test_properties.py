"""Property tests (Hypothesis): what must hold on every random problem, not just one.

- every solver meets its residual bound on random SPD least-squares systems;
- influence scores do not depend on ``batch_size`` nor on the order of the
  training rows;
- the Decomposer's signed loss terms and distances equal those of every rung
  recomputed without the library (a numpy replay of the training recipe for
  the retraining rungs, the closed forms for the others); the loss terms
  telescope to (influence − cold-start LOO) and the distances obey the
  triangle inequality;
- every supported loss's Bregman divergence is ≥ 0, exactly 0 at its centre
  with zero gradient and Hessian ``H`` there.

Examples are derandomised (the same examples on every run, no example
database), and few, so the file stays fast on two cores.
"""

import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from torch.func import grad, hessian

from linear_problems import (Linear, curvature, design, grads, mean_loss, recipe,
                             replay_recipe, well_conditioned_data)
from nets import CRITERIA, make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator
from sklinfluence.curvature.operator import Curvature
from sklinfluence.model.functional import FunctionalModel
from sklinfluence.model.losses import output_loss_from_criterion
from sklinfluence.response.responder import RESPONSE_CACHE
from sklinfluence.solvers import make_solver
from tolerances import (CLOSED_FORM_RTOL, INVARIANCE_RTOL, LOSS_AT_RUNGS_ATOL_REL,
                        SOLVE_RESIDUAL_PER_CONDITION)

EPS = np.finfo(np.float64).eps


def _settings(n: int, *, shrink: bool = True):
    """Derandomised, no example database; ``shrink=False`` for examples that retrain
    (shrinking a failure would take minutes: the first failing example is reported)."""
    phases = [p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=phases, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- solvers
def _exact_bound(tol: float, cond: float) -> float:
    """Backward-stable direct solve: the residual is rounding times the condition."""
    return SOLVE_RESIDUAL_PER_CONDITION * cond


def _iterative_bound(tol: float, cond: float) -> float:
    """An iterative solver stops at ``tol`` on its recursive residual; the true
    residual recomputed from the answer differs from it by rounding."""
    return tol + SOLVE_RESIDUAL_PER_CONDITION * cond


#: ``(id, name, solver_params, bound(tol, condition number))`` of every solver with a
#: residual guarantee; a new one adds a row. (EK-FAC, K-FAC and Arnoldi alone are
#: approximations with no residual bound; LiSSA needs ~κ iterations, so it does
#: not belong on systems with κ up to 1e8.)
SOLVERS_UNDER_TEST = (
    ("exact", "exact", {}, _exact_bound),
    ("cg", "cg", {}, _iterative_bound),
    ("cg_ekfac", "cg", {"preconditioner": "ekfac"}, _iterative_bound),
    ("cg_kfac", "cg", {"preconditioner": "kfac"}, _iterative_bound),
    ("cg_arnoldi", "cg", {"preconditioner": "arnoldi", "rank": 2}, _iterative_bound),
    ("cg_mixed_precision", "cg", {"mixed_precision": True}, _iterative_bound),
)


@st.composite
def spd_least_squares(draw):
    """A random damped least-squares curvature: ``(2/N) ΦᵀΦ + (μ + λ) I``.

    Column scales spread over four decades and the damping over six, so condition
    numbers range from about 1 to 1e8 (median ~1e3).
    """
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 25))
    d = draw(st.integers(1, 6))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-2, 2, size=d)
    y = rng.normal(size=n)
    mu = draw(st.sampled_from([0.0, 1e-3]))
    damping = draw(st.floats(1e-6, 1.0))
    kind = draw(st.sampled_from(["ggn", "hessian"]))
    module = Linear(d)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.as_tensor(rng.normal(size=tuple(p.shape))))
    model = FunctionalModel(module, output_loss_from_criterion(torch.nn.MSELoss()), [mu, mu])
    curvature = Curvature(model, torch.as_tensor(X), torch.as_tensor(y).reshape(-1, 1),
                          kind=kind, damping=damping, batch_size=draw(st.sampled_from([None, 4])))
    B = torch.as_tensor(rng.normal(size=(draw(st.integers(1, 5)), d + 1))
                        * 10.0 ** rng.uniform(-3, 3))
    return curvature, B


@pytest.mark.parametrize("name, params, bound", [s[1:] for s in SOLVERS_UNDER_TEST],
                         ids=[s[0] for s in SOLVERS_UNDER_TEST])
@_settings(30)
@given(problem=spd_least_squares(), tol=st.sampled_from([1e-4, 1e-8, 1e-12]))
def test_solvers_meet_their_residual_bound_on_random_spd_systems(name, params, bound, problem,
                                                                 tol):
    curvature, B = problem
    A = curvature.dense().numpy()
    cond = np.linalg.cond(A)
    assert np.all(np.linalg.eigvalsh(A) > 0)  # the system is SPD
    solver = make_solver(name, curvature, tol=tol, max_iter=50 * curvature.n_params,
                         solver_params=params)
    # Below rounding times the condition, tol can be out of float64's reach (even
    # numpy's LU solve misses 1e-12 at cond 6e5): a solver that checks its true
    # residual may then say it fell short, with a ConvergenceWarning.
    reachable = tol >= SOLVE_RESIDUAL_PER_CONDITION * cond
    with warnings.catch_warnings():
        if not reachable:
            warnings.simplefilter("ignore", ConvergenceWarning)
        X = solver.solve(B)
    assert X.shape == B.shape and X.dtype == torch.float64
    assert bool(torch.isfinite(X).all())
    residual = (B - curvature.matmat(X)).norm(dim=1) / B.norm(dim=1)
    assert float(residual.max()) <= bound(tol, cond), (float(residual.max()), cond)
    info = solver.last_solve
    assert info.n_rhs == B.shape[0] and (info.converged or not reachable)
    if info.max_relative_residual is None:
        return
    slack = SOLVE_RESIDUAL_PER_CONDITION * cond
    if params.get("mixed_precision"):  # a float32 residual plus its margin: an upper bound
        assert float(residual.max()) <= info.max_relative_residual + slack
        assert info.max_relative_residual <= (tol if info.converged else bound(tol, cond))
    else:  # what the solver reports is the truth
        assert_allclose(info.max_relative_residual, float(residual.max()), rtol=1e-6, atol=slack)


# ------------------------------------------------------ scores: invariance
@lru_cache(maxsize=None)
def _trained(criterion: str):
    """A tiny MLP trained a few epochs (not converged), and its data."""
    X, y = toy_data(criterion, n=24, d=3)
    y_net = y.astype(np.float64) if criterion == "BCEWithLogitsLoss" else y
    torch.manual_seed(0)
    net = make_net(criterion, 3, hidden=4, max_epochs=3, batch_size=8).fit(X, y_net)
    return net, X, y


#: (solver, batch_size) pairs. CG makes a pass over the batches per iteration, so it
#: gets batches that split the 24 rows unevenly (9, 9, 6) rather than one-row ones.
SOLVER_BATCHES = (("exact", 1), ("exact", 7), ("exact", 23), ("cg", 9), ("cg", 23))


@pytest.mark.slow
@_settings(12, shrink=False)
@given(criterion=st.sampled_from(CRITERIA), seed=st.integers(0, 2**31 - 1),
       solver_batch=st.sampled_from(SOLVER_BATCHES), damping=st.sampled_from([1e-3, 0.1]))
def test_scores_do_not_depend_on_batch_size_or_row_order(criterion, seed, solver_batch, damping):
    net, X, y = _trained(criterion)
    solver, batch_size = solver_batch
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    rows = np.sort(rng.choice(len(X), 6, replace=False))
    options = dict(damping=damping, solver=solver, tol=1e-13)
    reference = InfluenceEstimator(FrozenEstimator(net), **options).fit(X, y)
    other = InfluenceEstimator(FrozenEstimator(net), batch_size=batch_size,
                               **options).fit(X[perm], y[perm])
    assert not np.array_equal(other.X_train_.numpy(), reference.X_train_.numpy()) or \
        np.array_equal(perm, np.arange(len(X)))

    def close(actual, expected):
        assert_allclose(actual, expected, rtol=INVARIANCE_RTOL,
                        atol=INVARIANCE_RTOL * np.abs(expected).max())

    scores = reference.score_samples(X[rows])
    assert np.all(scores > 0)  # a PSD curvature: every sample helps itself
    close(other.score_samples(X[rows]), scores)  # rows looked up among the permuted ones
    close(other.score_samples(X[rows], y[rows]), scores)
    evaluate = X[:4], y[:4]
    close(other.loss_change(X[rows], None, *evaluate),
          reference.loss_change(X[rows], None, *evaluate))
    close(other.param_change(X[rows]), reference.param_change(X[rows]))


# ------------------------------------------------------ decomposer: telescoping
def _independent_rungs(net, X, y, theta_0, removed, mu, damping, epochs):
    """The six rungs' parameters for removing each row of ``removed``, computed here
    without the library: the retraining rungs (0–2) by replaying the recipe in numpy
    (cold start from ``θ⁰``; warm and proximal from ``θˢ`` for the default
    ``warm_start_fraction`` 0.5 of the epochs, the proximal term ``λN/(N−1)``),
    the PBRF and influence (3–5) by their closed forms for any ``θˢ``."""
    N = len(X)
    theta_s = replay_recipe(net, X, y, theta_0, epochs)
    warm_epochs = max(1, int(round(0.5 * epochs)))
    A_lam = curvature(X, mu) + damping * np.eye(len(theta_s))
    rungs = []
    for m in removed:
        keep = np.arange(N) != m
        x, g = design(X[m:m + 1])[0], grads(X[m:m + 1], y[m:m + 1], theta_s)[0]
        influence = theta_s + np.linalg.solve(A_lam, g / N)
        rungs.append([
            replay_recipe(net, X[keep], y[keep], theta_0, epochs),
            replay_recipe(net, X[keep], y[keep], theta_s, warm_epochs),
            replay_recipe(net, X[keep], y[keep], theta_s, warm_epochs,
                          proximity=damping * N / (N - 1), anchor=theta_s),
            theta_s + np.linalg.solve(A_lam - 2 * np.outer(x, x) / N, g / N),
            influence, influence])
    return theta_s, np.array(rungs)  # (len(removed), 6, P)


@pytest.mark.slow
@_settings(8, shrink=False)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(6, 14), d=st.integers(1, 3),
       mu=st.sampled_from([0.0, 0.05]), damping=st.sampled_from([0.0, 1e-2, 0.3]),
       epochs=st.integers(3, 30), random_state=st.integers(0, 1000),
       own_eval_set=st.booleans())
def test_signed_terms_telescope_to_influence_minus_cold_start_loo(
        seed, n, d, mu, damping, epochs, random_state, own_eval_set):
    X, y = well_conditioned_data(n=n, d=d, seed=seed % 10_000)
    rng = np.random.default_rng(seed)
    removed = np.sort(rng.choice(n, 2, replace=False))
    X_ev, y_ev = (rng.normal(size=(4, d)), rng.normal(size=4)) if own_eval_set else (X, y)
    net = recipe(X, mu, max_epochs=epochs)
    dec = Decomposer(net, damping=damping, metric="loss", pbrf_tol=1e-12,
                     random_state=random_state)
    dec.fit(X, y, *((X_ev, y_ev) if own_eval_set else ()))
    terms = dec.transform(X[removed])
    q = dec.rung_losses(X[removed])
    assert terms.shape == (2, 5)
    # every rung recomputed without the library: Q at each rung, term by term
    theta_s, thetas = _independent_rungs(net, X, y, dec.initial_params_.numpy(), removed, mu,
                                         damping, epochs)
    assert_allclose(dec.model_.params.numpy(), theta_s, rtol=1e-13, atol=1e-14)
    Q = np.array([mean_loss(rungs, X_ev, y_ev) for rungs in thetas])  # (2, 6)
    atol = LOSS_AT_RUNGS_ATOL_REL * np.abs(Q).max()
    # the PBRF is solved to a gradient norm ≤ pbrf_tol × its initial one, ‖∇L_m/N‖: its
    # parameters are off by at most ‖K⁻¹‖ times that, its loss by ‖∇Q‖ times that
    N, Phi_ev = len(X), design(X_ev)
    K_inv = [np.linalg.norm(np.linalg.inv(curvature(X, mu) + damping * np.eye(d + 1)
                                          - 2 * np.outer(design(X[[m]])[0], design(X[[m]])[0]) / N),
                            2) for m in removed]
    pbrf_slack = np.array([
        1e-12 * K_inv[i] * np.linalg.norm(grads(X[[m]], y[[m]], theta_s)[0] / N)
        * np.linalg.norm(2 / len(X_ev) * Phi_ev.T @ (Phi_ev @ thetas[i, 3] - y_ev))
        for i, m in enumerate(removed)])
    slack = np.zeros((2, 6))
    slack[:, 3] = pbrf_slack
    assert np.all(np.abs(q - Q) <= atol + slack), (q - Q, atol + slack)
    slack_terms = slack[:, 1:] + slack[:, :-1]
    assert np.all(np.abs(terms - np.diff(Q, axis=1)) <= atol + slack_terms)
    # telescoping: the five terms sum to influence minus cold-start LOO ...
    assert_allclose(terms.sum(axis=1), Q[:, -1] - Q[:, 0], rtol=0, atol=atol)
    assert_allclose(terms.sum(axis=1), q[:, -1] - q[:, 0], rtol=0, atol=1e-15 * np.abs(q).max())
    # ... which the two ends' own estimators give too
    RESPONSE_CACHE.clear()
    loo = LOOEstimator(net, random_state=random_state).fit(X, y)
    influence = InfluenceEstimator(net, damping=damping, random_state=random_state).fit(X, y)
    assert np.array_equal(loo.model_.params.numpy(), dec.model_.params.numpy())
    q_loo = mean_loss(dec.model_.params.numpy() + loo.param_change(X[removed]), X_ev, y_ev)
    q_if = mean_loss(dec.model_.params.numpy() + influence.param_change(X[removed]), X_ev, y_ev)
    assert_allclose(q[:, 0], q_loo, rtol=1e-12, atol=1e-13 * np.abs(Q).max())
    assert_allclose(q[:, -1], q_if, rtol=1e-12, atol=1e-13 * np.abs(Q).max())

    # the function-space distances: each rung pair's ‖Δf‖, and the triangle inequality
    dist = Decomposer(net, damping=damping, pbrf_tol=1e-12, random_state=random_state).fit(X, y)
    distances = dist.transform(X[removed])
    out = design(X) @ thetas.transpose(0, 2, 1)  # (2, N, 6): each rung's outputs
    expected = np.abs(np.diff(out, axis=2)).mean(axis=1)  # (2, 5)
    out_scale = np.abs(out).max()
    assert_allclose(distances, expected, rtol=1e-9, atol=1e-13 * out_scale)
    end_to_end = np.abs(out[:, :, -1] - out[:, :, 0]).mean(axis=1)
    assert np.all(end_to_end <= distances.sum(axis=1) * (1 + 1e-12) + 1e-15)


# ------------------------------------------------------------ Bregman
def _kl_softmax(y, y_ref):  # KL(softmax(y') ‖ softmax(y)), label smoothing or not
    p_ref = torch.softmax(y_ref, -1)
    return (p_ref * (torch.log_softmax(y_ref, -1) - torch.log_softmax(y, -1))).sum(-1)


def _kl_bernoulli(y, y_ref):  # mean over outputs of KL(σ(y') ‖ σ(y)), stable in the logits
    q = torch.sigmoid(y_ref)
    return (q * (F.logsigmoid(y_ref) - F.logsigmoid(y))
            + (1 - q) * (F.logsigmoid(-y_ref) - F.logsigmoid(-y))).mean(-1)


#: Every supported loss and option: ``(id, criterion for K outputs,
#: nll_takes_probabilities, outputs, targets, closed form or None)``. Outputs are
#: "logits" (any real; log-probabilities for NLL) or "probabilities"; targets
#: "real", "index", "binary" or "fraction" (soft labels). A closed form is
#: target-free: the divergence does not depend on the targets; with
#: ``pos_weight`` or on probabilities it does.
LOSSES = (
    ("mse", lambda K: torch.nn.MSELoss(), False, "logits", "real",
     lambda y, r: ((y - r) ** 2).mean(-1)),
    ("cross_entropy", lambda K: torch.nn.CrossEntropyLoss(), False, "logits", "index",
     _kl_softmax),
    ("cross_entropy_smoothed", lambda K: torch.nn.CrossEntropyLoss(label_smoothing=0.2),
     False, "logits", "index", _kl_softmax),
    ("nll_log_probabilities", lambda K: torch.nn.NLLLoss(), False, "logits", "index",
     lambda y, r: torch.zeros(y.shape[0], dtype=y.dtype)),  # linear in y
    ("nll_probabilities", lambda K: torch.nn.NLLLoss(), True, "probabilities", "index", None),
    ("bce", lambda K: torch.nn.BCEWithLogitsLoss(), False, "logits", "fraction",
     _kl_bernoulli),
    ("bce_pos_weight", lambda K: torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.linspace(0.5, 3.0, K, dtype=torch.float64)),
     False, "logits", "binary", None),
)


@st.composite
def loss_problem(draw):
    case = draw(st.sampled_from(LOSSES))
    _, make, on_probabilities, inputs, targets, closed_form = case
    K = 1 if case[0].startswith("bce") and draw(st.booleans()) else draw(st.integers(2, 4))
    n = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([1e-6, 1e-2, 1.0, 8.0, 20.0]))
    g = torch.Generator().manual_seed(seed)
    y_ref = torch.randn(n, K, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 6.0]))
    y = y_ref + spread * torch.randn(n, K, generator=g, dtype=torch.float64)

    def target():
        if targets == "real":
            return torch.randn(n, K, generator=g, dtype=torch.float64)
        if targets == "index":
            return torch.randint(0, K, (n,), generator=g)
        if targets == "binary":
            return (torch.rand(n, K, generator=g) > 0.5).double()
        return torch.rand(n, K, generator=g, dtype=torch.float64)  # soft labels

    if inputs == "probabilities":
        y, y_ref = torch.softmax(y, -1), torch.softmax(y_ref, -1)
    loss = output_loss_from_criterion(make(K), nll_takes_probabilities=on_probabilities)
    return case[0], loss, y, y_ref, target(), target(), closed_form


def _rounding_slack(loss, y, y_ref, t):
    """What the three terms of ``L(y) − L(y') − ∇L(y')ᵀ(y − y')`` can lose to rounding.

    A loss computed from logits errs by rounding times the logits' size, not its
    own (log-sum-exp subtracts numbers that large: cross-entropy at logits ±6 is
    1e-5, with errors of 1e-16), so the outputs' size counts too."""
    linear = (loss.output_grad(y_ref, t) * (y - y_ref)).abs().sum(-1)
    size = y.abs().amax(-1) + y_ref.abs().amax(-1)
    return 64 * EPS * (loss(y, t).abs() + loss(y_ref, t).abs() + linear + size)


@_settings(80)
@given(problem=loss_problem())
def test_bregman_is_nonnegative_and_zero_with_curvature_h_at_its_centre(problem):
    name, loss, y, y_ref, t, t_other, closed_form = problem
    d = loss.bregman(y, y_ref, t)
    slack = _rounding_slack(loss, y, y_ref, t)
    assert d.shape == (y.shape[0],) and bool(torch.isfinite(d).all())
    assert bool((d >= -slack).all()), (name, d, slack)
    centre = loss.bregman(y_ref, y_ref, t)
    assert bool((centre == 0).all()), (name, centre)
    if closed_form is not None:
        expected = closed_form(y, y_ref)
        assert_allclose(d, expected, rtol=CLOSED_FORM_RTOL, atol=float(slack.max()) + 1e-300)
        # ... so it does not depend on the targets
        assert_allclose(loss.bregman(y, y_ref, t_other), d, rtol=CLOSED_FORM_RTOL,
                        atol=float(torch.maximum(slack, _rounding_slack(loss, y, y_ref,
                                                                        t_other)).max()))
    # gradient 0 and Hessian H = ∂²L/∂y² at y = y', sample by sample
    H = loss.output_hessian(y_ref, t)
    for i in range(y.shape[0]):
        def one(v, i=i):
            return loss.bregman(v[None], y_ref[i:i + 1], t[i:i + 1])[0]

        g = grad(one)(y_ref[i])
        scale = float(loss.output_grad(y_ref[i:i + 1], t[i:i + 1]).abs().max()) + 1.0
        assert float(g.abs().max()) <= 16 * EPS * scale
        assert_allclose(hessian(one)(y_ref[i]), H[i], rtol=CLOSED_FORM_RTOL,
                        atol=1e-12 * (float(H[i].abs().max()) + 1e-300))
