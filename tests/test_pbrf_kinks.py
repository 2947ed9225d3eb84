"""The PBRF at its minimum on nets with kinks (ReLU, max pooling).

The library's answer is checked the way an outsider would: the PBRF objective is
written here from its definition — the mean KL divergence of the softmax outputs to
``θˢ``'s, ``(μ + λ)/2 ‖θ − θˢ‖²`` and ``−ε Σ_S L_m`` — on a float64 copy of the
trained module (no library code), and a long float64 L-BFGS run (scipy) started from
the library's answer must find nothing lower: the response moves by less than 1% and
the self-influence by less than 0.5%, and the library's objective is no higher than
the reference's up to rounding. Single rows and a group, on a ReLU MLP and a CNN with
max pooling, both float32 as skorch trains them."""

import copy
import time

import numpy as np
import pytest
import scipy.optimize
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

from sklinfluence import PBRFEstimator
from sklinfluence.response import kinks

MU, LAMBDA = 1e-4, 1e-2
ROWS = [0, 1, 2, 3, 4, 5]
GROUP = [6, 7, 8]


def _mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def _pooled_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def _digits(n):
    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))[:n]
    return (X[idx] / 16.0).astype(np.float32), y[idx]


class Reference:
    """The PBRF objective of removing rows ``S``, written from its definition, float64."""

    def __init__(self, module, X, y, rows):
        self.module = copy.deepcopy(module).double().eval()
        self.names = [name for name, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.theta_s = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).double()
        self.X, self.T = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
        self.rows = list(rows)
        with torch.no_grad():
            self.reference = torch.log_softmax(self.f(self.theta_s, self.X), dim=1)
            self.loss_s = self.removed_loss(self.theta_s)

    def f(self, theta, X):
        params, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            params[name] = theta[start:start + size].reshape(shape)
            start += size
        return functional_call(self.module, params, (X,))

    def removed_loss(self, theta):
        """``Σ_{m∈S} L_m(θ)``: the cross-entropy of each removed row, summed."""
        logits = self.f(theta, self.X[self.rows])
        return nn.functional.cross_entropy(logits, self.T[self.rows], reduction="sum")

    def objective(self, theta):
        """``F(θ) − F(θˢ)``."""
        log_p = torch.log_softmax(self.f(theta, self.X), dim=1)
        kl = (self.reference.exp() * (self.reference - log_p)).sum(dim=1).mean()
        diff = theta - self.theta_s
        eps = 1.0 / self.X.shape[0]
        return kl + 0.5 * (MU + LAMBDA) * (diff @ diff) - eps * (self.removed_loss(theta)
                                                                   - self.loss_s)

    def minimise(self, delta):
        """Long L-BFGS from ``θˢ + delta``; returns (its response, F there, F at start)."""
        def fun(v):
            theta = torch.tensor(v, requires_grad=True)
            value = self.objective(theta)
            value.backward()
            return float(value.detach()), theta.grad.numpy()

        start = self.theta_s.numpy() + delta
        result = scipy.optimize.minimize(fun, start, jac=True, method="L-BFGS-B",
                                         options=dict(maxiter=3000, maxfun=6000, maxcor=50,
                                                      ftol=1e-15, gtol=1e-13))
        return result.x - self.theta_s.numpy(), result.fun, fun(start)[0]

    def self_influence(self, delta):
        with torch.no_grad():
            theta = self.theta_s + torch.as_tensor(delta)
            return float(self.removed_loss(theta) - self.loss_s)


@pytest.fixture(scope="module", params=["relu_mlp", "maxpool_cnn"])
def fitted(request):
    make, n = {"relu_mlp": (_mlp, 200), "maxpool_cnn": (_pooled_cnn, 150)}[request.param]
    X, y = _digits(n)
    net = NeuralNetClassifier(make, criterion=nn.CrossEntropyLoss, max_epochs=20, lr=0.05,
                              optimizer__momentum=0.9, optimizer__weight_decay=MU,
                              batch_size=32, train_split=None, verbose=0)
    est = PBRFEstimator(net, damping=LAMBDA, random_state=0).fit(X, y)
    assert est.model_.dtype == torch.float32  # as skorch trains it
    return est, X, y


def _check(est, X, y, rows, delta):
    ref = Reference(est.net_.module_, X, y, rows)
    delta = delta.astype(np.float64)
    moved, f_ref, f_lib = ref.minimise(delta)
    assert f_lib <= f_ref + 1e-6 * abs(f_ref) + 1e-15, (rows, f_lib, f_ref)  # rounding
    move = np.linalg.norm(moved - delta) / np.linalg.norm(moved)
    assert move <= 1e-2, (rows, move)
    s_ref, s_lib = ref.self_influence(moved), ref.self_influence(delta)
    assert abs(s_ref - s_lib) <= 5e-3 * abs(s_ref), (rows, s_lib, s_ref)


def test_single_rows_reach_the_minimum(fitted):
    est, X, y = fitted
    start = time.perf_counter()
    deltas = est.param_change(X[ROWS])
    wall = time.perf_counter() - start
    info = est.responder_.last_info
    assert info["seconds"].sum() <= wall  # the chord's share and each continuation, once
    assert info["converged"].all()
    assert "lbfgs" in set(info["method"])  # some solve stopped on a kink and was continued
    continued = info["method"] == "lbfgs"
    assert (info["objective_decrease"][continued] <= kinks.LBFGS_FTOL).all()  # the stop rule
    d = est.diagnostics_
    assert d["n_removals"] == len(ROWS) and d["converged"]
    assert d["methods"]["lbfgs"] == int(continued.sum())
    assert d["max_objective_decrease"] <= kinks.LBFGS_FTOL and d["max_relative_step"] is not None
    for row, delta in zip(ROWS, deltas):
        _check(est, X, y, [row], delta)


def test_a_group_reaches_the_minimum(fitted):
    est, X, y = fitted
    groups = np.zeros(len(GROUP), dtype=int)
    delta = est.param_change(X[GROUP], groups=groups)[0]
    assert est.responder_.last_info["converged"].all()
    _check(est, X, y, GROUP, delta)
