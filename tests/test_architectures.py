"""The architecture matrix: every estimator, every rung and the Decomposer on the nets
users bring — MLP, MLP with Dropout, LayerNorm MLP, CNN with and without BatchNorm, an
embedding bag and a small transformer encoder — at a few hundred parameters, each
against references computed here without the library:

- the exact influence (rung 4 and ``InfluenceEstimator(solver="exact")``) against a
  dense Gauss–Newton matrix built from ``torch.func`` Jacobians, ``ε ∇Qᵀ(G + λI)⁻¹∇L``;
- the PBRF (rung 3, alone and for a group) by its stationarity: the gradient of the
  PBRF objective, written out here, vanishes at the library's answer;
- retraining (rungs 0–2) by determinism and, where the recipe can be replayed as a
  vectorised ensemble, by the one-at-a-time path.

Nets with Dropout, BatchNorm or attention cannot be replayed as an ensemble
(``ensemble_supported``): their retraining takes the one-at-a-time path.
"""

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits
from skorch import NeuralNetClassifier
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator
from sklinfluence.response.cache import RESPONSE_CACHE
from sklinfluence.model.ensemble import ensemble_supported
from tolerances import CG_VS_EXACT_RTOL

MU, LAMBDA = 1e-3, 0.3


class MLP(nn.Module):
    def __init__(self, dropout=0.0, layernorm=False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 10), *([nn.LayerNorm(10)] if layernorm else []), nn.Tanh(),
            *([nn.Dropout(dropout)] if dropout else []), nn.Linear(10, 3))
        self.double()

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """8×8 digits (flattened) → Conv2d–[BatchNorm2d]–Tanh–Conv2d–Tanh–Linear.

    Tanh, not ReLU: a ReLU net's PBRF objective has kinks wherever a unit's input
    crosses 0, and its minimiser can sit on one, where no gradient vanishes — the
    stationarity reference below needs a smooth objective (the library reports such
    solves as stopped short)."""

    def __init__(self, batchnorm=False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 2, 3),
            *([nn.BatchNorm2d(2)] if batchnorm else []), nn.Tanh(), nn.Conv2d(2, 2, 3),
            nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
        self.double()

    def forward(self, x):
        return self.net(x)


class EmbeddingBag(nn.Module):
    """Token ids (as floats) → Embedding → mean over tokens → Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.out = nn.Linear(6, 3)
        self.double()

    def forward(self, x):
        return self.out(self.embed(x.long()).mean(dim=1))


class Transformer(nn.Module):
    """Token ids → Embedding → TransformerEncoderLayer (dropout, GELU: smooth, see
    :class:`CNN`) → mean over tokens → Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1,
                                                  activation="gelu", batch_first=True)
        self.out = nn.Linear(8, 3)
        self.double()

    def forward(self, x):
        return self.out(self.encoder(self.embed(x.long())).mean(dim=1))


def _tabular(n=48):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 8))
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)


def _digits(n=48):
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    return X[keep][:n] / 16.0, y[keep][:n]


def _tokens(n=48):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 12, size=(n, 5))
    return X.astype(np.float64), (X % 3 == 0).sum(1).clip(0, 2)


ARCHITECTURES = {
    "mlp": (MLP, _tabular),
    "mlp_dropout": (lambda: MLP(dropout=0.2), _tabular),
    "layernorm_mlp": (lambda: MLP(layernorm=True), _tabular),
    "cnn": (CNN, _digits),
    "cnn_batchnorm": (lambda: CNN(batchnorm=True), _digits),
    "embedding_bag": (EmbeddingBag, _tokens),
    "transformer": (Transformer, _tokens),
}
REPLAYABLE = {"mlp", "layernorm_mlp", "cnn", "embedding_bag"}


def _net(name, **kwargs):
    make, _ = ARCHITECTURES[name]
    return NeuralNetClassifier(make, criterion=nn.CrossEntropyLoss, max_epochs=6, lr=0.1,
                               batch_size=16, optimizer__weight_decay=MU, train_split=None,
                               iterator_train__shuffle=True, verbose=0, **kwargs)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def fitted(request):
    name = request.param
    X, y = ARCHITECTURES[name][1]()
    RESPONSE_CACHE.clear()
    dec = Decomposer(_net(name), damping=LAMBDA, random_state=0).fit(X, y)
    return name, X, y, dec


# --------------------------------------------------------- references, without the library
@contextmanager
def _math_attention():
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class Reference:
    """The trained module as a function of its flat parameters, in eval mode."""

    def __init__(self, module, X, y):
        self.module = copy.deepcopy(module).eval()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.buffers = dict(self.module.named_buffers())
        self.X, self.T = torch.as_tensor(X), torch.as_tensor(y)

    def output(self, theta, x):
        params = dict(zip(self.names, (c.reshape(s) for c, s in zip(
            theta.split([s.numel() for s in self.shapes]), self.shapes))))
        with _math_attention():
            return functional_call(self.module, {**params, **self.buffers}, (x[None],))[0]

    def loss(self, theta, x, t):
        return F.cross_entropy(self.output(theta, x)[None], t[None])

    def grads(self, theta, X, T):
        return vmap(grad(self.loss), in_dims=(None, 0, 0))(theta, X, T)

    def damped_ggn(self):
        J = vmap(jacrev(self.output), in_dims=(None, 0))(self.theta, self.X)  # (N, K, P)
        p = torch.softmax(vmap(self.output, in_dims=(None, 0))(self.theta, self.X), dim=1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # cross-entropy's Hessian
        G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / len(self.X)
        return G + (MU + LAMBDA) * torch.eye(len(self.theta), dtype=G.dtype)

    def pbrf_gradient(self, theta, rows, epsilon):
        """∇ of (1/N) Σ D_L(f(θ,x_i), f(θˢ,x_i)) + ((μ+λ)/2)‖θ−θˢ‖² − ε Σ_rows L_m(θ)."""
        def objective(th):
            out = vmap(self.output, in_dims=(None, 0))(th, self.X)
            ref = vmap(self.output, in_dims=(None, 0))(self.theta, self.X).detach()
            ce = lambda o: F.cross_entropy(o, self.T, reduction="none")  # noqa: E731
            slope = torch.softmax(ref, 1) - F.one_hot(self.T, ref.shape[1])
            bregman = ce(out) - ce(ref) - (slope * (out - ref)).sum(1)
            diff = th - self.theta
            removed = sum(self.loss(th, self.X[m], self.T[m]) for m in rows)
            return bregman.mean() + 0.5 * (MU + LAMBDA) * diff @ diff - epsilon * removed
        return grad(objective)(theta)


# ---------------------------------------------------------------------------- tests
def test_exact_influence_and_rung_4_equal_the_dense_gauss_newton_solve(fitted):
    name, X, y, dec = fitted
    ref = Reference(dec.net_.module_, X, y)
    assert_array_equal(ref.theta.numpy(), dec.model_.params.numpy())  # same layout
    A = ref.damped_ggn()
    rows, evals = np.arange(4), np.arange(10, 15)
    G_rows = ref.grads(ref.theta, ref.X[rows], ref.T[rows])
    G_eval = ref.grads(ref.theta, ref.X[evals], ref.T[evals])
    eps = dec.epsilon_
    expected = eps * torch.linalg.solve(A, G_rows.T).T  # (rows, P)
    assert_allclose(dec.rung_responses(X[rows], y[rows])["exact_influence"], expected.numpy(),
                    rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    est = InfluenceEstimator(_net(name), damping=LAMBDA, solver="exact", random_state=0).fit(X, y)
    matrix = (expected @ G_eval.T).numpy()
    assert_allclose(est.loss_change(X[rows], y[rows], X[evals], y[evals]), matrix, rtol=1e-9,
                    atol=1e-12 * np.abs(matrix).max())
    assert_allclose(est.score_samples(X[rows], y[rows]),
                    (expected * G_rows).sum(1).numpy(), rtol=1e-9)
    cg = InfluenceEstimator(_net(name), damping=LAMBDA, solver="cg", tol=1e-12,
                            random_state=0).fit(X, y)
    assert_allclose(cg.loss_change(X[rows], y[rows], X[evals], y[evals]), matrix,
                    rtol=CG_VS_EXACT_RTOL, atol=CG_VS_EXACT_RTOL * np.abs(matrix).max())
    # the attention's parameters get their kernel rows from autograd
    kernel = InfluenceEstimator(_net(name), damping=LAMBDA, solver="kernel", random_state=0)
    assert_allclose(kernel.fit(X, y).loss_change(X[rows], y[rows], X[evals], y[evals]), matrix,
                    rtol=1e-9, atol=1e-12 * np.abs(matrix).max())
    assert kernel.diagnostics_["solver"] == "kernel" and kernel.diagnostics_["converged"]


def test_the_kronecker_solvers_factor_every_layer(fitted):
    name, X, y, _ = fitted
    for solver in ("ekfac", "kfac"):
        est = InfluenceEstimator(_net(name), damping=LAMBDA, solver=solver, random_state=0)
        scores = est.fit(X, y).score_samples(X[:5], y[:5])
        assert np.all(np.isfinite(scores)) and est.diagnostics_["approximate"]
        assert est.diagnostics_["max_relative_residual"] > 0  # measured, not assumed


def test_pbrf_of_a_row_and_of_a_group_is_a_stationary_point_of_its_objective(fitted):
    name, X, y, dec = fitted
    ref = Reference(dec.net_.module_, X, y)
    eps = dec.epsilon_
    single = dec.rung_responses(X[:2], y[:2])["pbrf"]
    group = dec.rung_responses(X[:2], y[:2], groups=[0, 0])["pbrf"][0]
    for rows, delta in (([0], single[0]), ([1], single[1]), ([0, 1], group)):
        start = ref.pbrf_gradient(ref.theta, rows, eps).norm()
        at = ref.pbrf_gradient(ref.theta + torch.as_tensor(delta), rows, eps).norm()
        assert float(at) <= 1e-7 * float(start), (rows, float(at), float(start))
    pbrf = PBRFEstimator(_net(name), damping=LAMBDA, random_state=0).fit(X, y)
    assert_allclose(pbrf.param_change(X[:2], y[:2]), single, rtol=1e-12, atol=1e-15)


def test_retraining_rungs_and_the_five_terms(fitted):
    name, X, y, dec = fitted
    net = _net(name)
    module = net.initialize().module_
    assert ensemble_supported(net, module)[0] == (name in REPLAYABLE)
    responses = dec.rung_responses(X[:2], y[:2])
    for rung in ("cold_start_loo", "warm_start", "proximal"):
        assert np.all(np.isfinite(responses[rung])) and np.abs(responses[rung]).max() > 0
    terms = dec.transform(X[:2], y[:2])
    assert terms.shape == (2, 5) and np.all(np.isfinite(terms)) and np.all(terms >= 0)
    # retraining is seeded: a second run (cache cleared) is the same to the last bit;
    # where the ensemble applies, training several at once equals one at a time
    def loo(batch):
        RESPONSE_CACHE.clear()
        return LOOEstimator(_net(name), removal_batch_size=batch, random_state=0).fit(X, y) \
            .param_change(X[:3], y[:3])

    one = loo(1)
    assert_array_equal(loo(1), one)
    scale = np.abs(one).max()
    assert_allclose(loo(3), one, rtol=0, atol=1e-12 * scale)
    assert_allclose(responses["cold_start_loo"], one[:2], rtol=0, atol=1e-12 * scale)


class ReLUCNN(CNN):
    def __init__(self):
        super().__init__()
        self.net[2] = self.net[4] = nn.ReLU()


def _relu_pbrf():
    X, y = _digits()
    net = NeuralNetClassifier(ReLUCNN, criterion=nn.CrossEntropyLoss, max_epochs=6, lr=0.1,
                              batch_size=16, optimizer__weight_decay=MU, train_split=None,
                              iterator_train__shuffle=True, verbose=0)
    return PBRFEstimator(net, damping=LAMBDA, random_state=0).fit(X, y), X, y


def test_a_relu_nets_pbrf_solves_stalled_on_kinks_are_continued_to_the_minimum():
    """The same CNN with ReLU: its PBRF objective has kinks and the chord/Newton
    solves stall short of ``tol`` at this damping; the L-BFGS continuation takes them
    to the minimum (no warning) and reports how it stopped."""
    est, X, y = _relu_pbrf()
    est.score_samples(X[:4], y[:4])  # a ConvergenceWarning would fail the test
    info = est.responder_.last_info
    assert info["converged"].all() and "lbfgs" in set(info["method"])


@pytest.mark.parametrize("lanczos", ["tried", "too large"])
def test_a_relu_nets_stalled_pbrf_solve_says_why(lanczos, monkeypatch):
    """Where the continuation cannot finish (capped at 2 iterations here) the warning
    names the layer type — also when the net is too large for the Lanczos convexity
    check (lowered limit here)."""
    from sklearn.exceptions import ConvergenceWarning

    from sklinfluence.response import kinks, pbrf

    monkeypatch.setattr(kinks, "LBFGS_MAX_ITER", 2)
    expected = r"piecewise-linear layers \(ReLU\).*kinks"
    if lanczos == "too large":
        monkeypatch.setattr(pbrf, "LOWEST_CURVATURE_MAX_PARAMS", 0)
        expected = "too large to try.*" + expected
    est, X, y = _relu_pbrf()
    with pytest.warns(ConvergenceWarning, match=expected):
        est.score_samples(X[:4], y[:4])
