"""The divergence guard of the PBRF solves.

A PBRF answer whose gradient norm ended above its value at ``θˢ``, or whose
objective rose above ``F(θˢ)``, is never returned as it is: it is solved again
from ``θˢ`` and, if that diverges too, reported not converged (``method
"diverged"``) at the best point that had not diverged, with a warning naming
exactly those removals. The failures are forced here by replacing what the
chord iteration returns (``sklinfluence.response.batched._solve_batch``) with a
point far from ``θˢ``, as the L-BFGS continuation produced on a ReLU ResNet with
BatchNorm before its steps were bounded.
"""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from skorch import NeuralNetClassifier
from torch import nn
from torch.func import grad

from sklinfluence import PBRFEstimator
from sklinfluence.response import batched, kinks
from sklinfluence.response.pbrf import MinimizeResult, response_failure
from sklinfluence.response.rungs import _objective

from nets import MLP

ROWS = 8
BAD = (2, 5)


def _digits(n):
    X, y = load_digits(return_X_y=True)
    return X[:n] / 16.0, y[:n]


def _tanh_pbrf():
    X, y = _digits(150)
    net = NeuralNetClassifier(MLP, module__n_in=64, module__n_out=10, module__hidden=8,
                              criterion=nn.CrossEntropyLoss, lr=0.1, optimizer__momentum=0.9,
                              optimizer__weight_decay=1e-3, batch_size=50, max_epochs=10,
                              train_split=None, verbose=0)
    return PBRFEstimator(net, damping=1e-2, random_state=0).fit(X, y), X


class ReLUBatchNorm(nn.Sequential):
    """``Linear → BatchNorm1d → ReLU → Linear`` in float64."""

    def __init__(self):
        super().__init__(nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))
        self.double()


def _relu_bn_pbrf():
    X, y = _digits(150)
    net = NeuralNetClassifier(ReLUBatchNorm, criterion=nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=50, max_epochs=10, train_split=None, verbose=0)
    return PBRFEstimator(net, damping=1e-2, random_state=0).fit(X, y), X


def _diverging(monkeypatch, rows=BAD, converged=True):
    """Make the chord iteration return, for ``rows``, a point 30 away from ``θˢ`` with
    its true gradient norm (reported ``converged``, as the unguarded continuation did);
    the others as computed. Returns the list the chord's best points are put in."""
    solve_batch = batched._solve_batch
    seen = []

    def patched(objective, xs, ts, ws, *args, **kwargs):
        results, best = solve_batch(objective, xs, ts, ws, *args, **kwargs)
        seen.append(best.clone())
        generator = torch.Generator().manual_seed(0)
        for b in rows:
            single = batched._single(objective, xs[b], ts[b], ws[b])
            away = torch.randn(objective.theta_s.shape, generator=generator,
                               dtype=objective.theta_s.dtype)
            theta = objective.theta_s + 30 * away / away.norm()
            results[b] = MinimizeResult(theta, float(grad(single)(theta).norm()),
                                        results[b].initial_grad_norm, 7, converged, 0.0,
                                        method="lbfgs")
        return results, best

    monkeypatch.setattr(batched, "_solve_batch", patched)
    return seen


def _objective_at(est, X, row, delta):
    removal = est._removals(X[[row]], None)[0][0]
    objective = _objective(est.responder_.context, removal, est.damping, True)
    theta = objective.theta_s + torch.as_tensor(delta, dtype=objective.theta_s.dtype)
    return objective, theta


def test_weak_wolfe_stops_expanding_at_max_t():
    """``f(t) = −t − t²`` decreases without end and never flattens to the curvature
    condition: unbounded, the expansion doubles ``t`` to 2²⁹ in 30 evaluations; with
    ``max_t`` it stops there."""
    def value(t):
        return -t - t * t

    def phi(t):
        return value(t), torch.zeros(1), -1.0 - 2.0 * t

    t, f, _ = kinks._weak_wolfe(value, phi, 0.0, -1.0)
    assert t == 2.0 ** 29 and f == value(2.0 ** 29)
    t, f, _ = kinks._weak_wolfe(value, phi, 0.0, -1.0, max_t=3.0)
    assert t == 3.0 and f == -12.0
    t, _, _ = kinks._weak_wolfe(value, phi, 0.0, -1.0, max_t=0.25)
    assert t == 0.25


def test_response_failure_says_what_is_wrong():
    """At the PBRF minimiser ``θ*`` nothing is wrong; at ``θˢ + 3(θ* − θˢ)`` the objective
    is above ``F(θˢ)`` (as two plain evaluations of it say; a quadratic would have it
    at ``−3 F(θ*)``), whatever gradient norm is claimed; a gradient norm above the
    initial one and non-finite values are failures too."""
    est, X = _tanh_pbrf()
    delta = est.param_change(X[[3]])[0]
    objective, theta = _objective_at(est, X, 3, delta)
    g0 = float(grad(objective)(objective.theta_s).norm())
    g = float(grad(objective)(theta).norm())
    assert g <= 1e-8 * g0 and objective.change(theta) < 0
    assert response_failure(objective, theta, g, g0) is None
    far = objective.theta_s + 3 * (theta - objective.theta_s)
    rise = float(objective(far) - objective(objective.theta_s))
    assert rise > 0 and math.isclose(objective.change(far), rise, rel_tol=1e-6)
    assert "objective rose" in response_failure(objective, far, 0.5 * g0, g0)
    assert "gradient norm grew" in response_failure(objective, theta, 2 * g0, g0)
    nan = theta.clone()
    nan[0] = float("nan")
    assert "non-finite" in response_failure(objective, nan, g, g0)


def test_a_diverged_batched_answer_is_solved_again_from_theta_s(monkeypatch):
    """Rows 2 and 5 come back from the chord 30 away from ``θˢ``, reported converged: the
    guard solves them again from ``θˢ`` (Newton on this smooth net) and returns the
    answers the unpatched batch gives, to 1e-7, without a warning."""
    est, X = _tanh_pbrf()
    clean = est.param_change(X[:ROWS])
    assert est.responder_.last_info["converged"].all()
    est, X = _tanh_pbrf()
    _diverging(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        guarded = est.param_change(X[:ROWS])
    info = est.responder_.last_info
    assert info["converged"].all() and not est.diagnostics_["not_converged"]
    assert set(info["method"][list(BAD)]) == {"newton"}
    assert (info["grad_norm"] <= 1e-9 * info["initial_grad_norm"]).all()
    scale = np.linalg.norm(clean, axis=1).min()
    assert np.abs(guarded - clean).max() <= 1e-7 * scale


def test_diverged_twice_is_flagged_and_named(monkeypatch):
    """When the retry from ``θˢ`` diverges too, exactly the two removals are flagged:
    one ConvergenceWarning, "2 of 8", naming training rows 2 and 5 and no other;
    ``method="diverged"`` and not converged for those two only; their answers are the
    chord iteration's best points (sound: objective below ``F(θˢ)``, gradient norm below
    the initial one), never the diverged ones."""
    est, X = _relu_bn_pbrf()
    seen = _diverging(monkeypatch)

    def diverged_retry(single, **kwargs):
        theta = single.theta_s + 40.0
        return MinimizeResult(theta, float(grad(single)(theta).norm()), 1.0, 3, False, 0.0,
                              method="lbfgs", failure="the gradient norm grew (forced)")

    monkeypatch.setattr(batched, "minimize_from_start", diverged_retry)
    with pytest.warns(ConvergenceWarning) as record:
        deltas = est.param_change(X[:ROWS])
    messages = [str(w.message) for w in record if w.category is ConvergenceWarning]
    assert len(messages) == 1, messages
    message = messages[0]
    assert message.startswith("2 of 8 pbrf solves diverged")
    assert re.findall(r"training row (\d+)", message) == ["2", "5"]
    info = est.responder_.last_info
    flagged = np.flatnonzero(info["method"] == "diverged")
    assert flagged.tolist() == list(BAD)
    assert np.flatnonzero(~info["converged"].astype(bool)).tolist() == list(BAD)
    assert (info["grad_norm"][flagged] < info["initial_grad_norm"][flagged]).all()
    for b in BAD:
        objective, theta = _objective_at(est, X, b, deltas[b])
        assert torch.allclose(theta, seen[0][b].to(theta.dtype), rtol=0, atol=1e-12)
        assert objective.change(theta) < 0
        assert float(grad(objective)(theta).norm()) < info["initial_grad_norm"][b]
        assert np.linalg.norm(deltas[b]) < 1.0  # nothing like the 30 of the diverged point
    d = est.diagnostics_
    assert d["n_diverged"] == 2 and d["methods"]["diverged"] == 2 and not d["converged"]
    assert [e["removal"] for e in d["not_converged"]] == ["training row 2", "training row 5"]
    assert all(e["method"] == "diverged" for e in d["not_converged"])
    assert all("the gradient norm grew (forced)" in e["failure"] for e in d["not_converged"])
    assert "The first: " in message and "the gradient norm grew (forced)" in message


def test_a_diverged_one_at_a_time_solve_is_flagged_at_theta_s(monkeypatch):
    """One removal at a time (``removal_batch_size=1``) on a net without kinks: Newton
    starts at ``θˢ`` itself, so a diverged answer has nothing to be retried from; it
    is flagged ``"diverged"`` and named, and the response is 0 (``θˢ``), never the
    diverged point."""
    from sklinfluence.response import rungs

    est, X = _tanh_pbrf()
    est.set_params(removal_batch_size=1).fit(*_digits(150))
    solve = rungs.minimize_response

    def diverging(objective, **kwargs):
        result = solve(objective, **kwargs)
        if torch.equal(objective.X_S[0], est.X_train_[3].to(objective.X_S.dtype)):
            return MinimizeResult(objective.theta_s + 30.0, 1e9, result.initial_grad_norm, 5,
                                  False, 0.0, failure="the gradient norm grew (forced)")
        return result

    monkeypatch.setattr(rungs, "minimize_response", diverging)
    with pytest.warns(ConvergenceWarning, match=r"1 of 5 pbrf solves diverged") as record:
        deltas = est.param_change(X[:5])
    assert [re.findall(r"training row (\d+)", str(w.message)) for w in record
            if "diverged" in str(w.message)] == [["3"]]
    assert np.abs(deltas[3]).max() == 0 and np.abs(deltas[[0, 1, 2, 4]]).max() > 0
    assert est.responder_.last_info["method"][3] == "diverged"


def test_the_stopped_short_warning_names_every_such_removal(monkeypatch):
    """Removals that stopped short (not diverged) are counted and each named with its
    relative gradient norm — not only the worst."""
    est, X = _tanh_pbrf()
    solve_batch = batched._solve_batch

    def stopped(objective, xs, ts, ws, *args, **kwargs):
        results, best = solve_batch(objective, xs, ts, ws, *args, **kwargs)
        for b, shrink in ((1, 0.5), (6, 0.8)):  # part of the way, with the true gradient
            single = batched._single(objective, xs[b], ts[b], ws[b])
            theta = objective.theta_s + shrink * (results[b].theta - objective.theta_s)
            results[b] = MinimizeResult(theta, float(grad(single)(theta).norm()),
                                        results[b].initial_grad_norm, 2, False, 0.0,
                                        method="chord")
        return results, best

    monkeypatch.setattr(batched, "_solve_batch", stopped)
    with pytest.warns(ConvergenceWarning) as record:
        est.param_change(X[:ROWS])
    message, = [str(w.message) for w in record if w.category is ConvergenceWarning]
    assert message.startswith("2 of 8 pbrf solves stopped short")
    info = est.responder_.last_info
    named = message.split("Not converged: ")[1]
    assert re.findall(r"training row (\d+)", named) == ["1", "6"]
    for b in (1, 6):
        relative = info["grad_norm"][b] / info["initial_grad_norm"][b]
        assert f"training row {b} (relative gradient norm {relative:.3e})" in named
    assert [e["removal"] for e in est.diagnostics_["not_converged"]] == [
        "training row 1", "training row 6"]


def test_the_continuation_retries_a_diverged_start_from_theta_s():
    """:func:`~sklinfluence.response.kinks.minimize_kinked` started far from ``θˢ`` on a
    ReLU + BatchNorm net is still far after 100 iterations (its gradient norm above
    the initial one): without ``retry`` it says so, not converged; with it, it answers
    with its own solve from ``θˢ`` (converged in fewer), which passes the guard."""
    est, X = _relu_bn_pbrf()
    removal = est._removals(X[[4]], None)[0][0]
    objective = _objective(est.responder_.context, removal, est.damping, True)
    g0 = float(grad(objective)(objective.theta_s).norm())
    start = objective.theta_s + 30 * torch.ones_like(objective.theta_s) / math.sqrt(
        objective.theta_s.numel())
    bare = kinks.minimize_kinked(objective, start, initial_grad_norm=g0, max_iter=100,
                                 retry=False)
    assert not bare.converged and "gradient norm grew" in bare.failure
    retried = kinks.minimize_kinked(objective, start, initial_grad_norm=g0, max_iter=100)
    direct = kinks.minimize_kinked(objective, objective.theta_s, initial_grad_norm=g0,
                                   max_iter=100)
    assert retried.failure is None and direct.failure is None and direct.converged
    assert torch.equal(retried.theta, direct.theta) and retried.converged
    assert retried.grad_norm < g0 and objective.change(retried.theta) < 0


def test_list_in_words():
    from sklinfluence.utils._warnings import list_in_words

    assert list_in_words([]) == ""
    assert list_in_words(["a"]) == "a"
    assert list_in_words(["a", "b"]) == "a and b"
    assert list_in_words(["a", "b", "c"]) == "a, b and c"
    assert list_in_words(list("abcde"), limit=3) == "a, b, c and 2 more"
