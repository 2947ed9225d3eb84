"""The fast tier: EK-FAC / K-FAC self-influence and influence matrices from the layers'
captures, streamed within ``working_memory_bytes``.

- on conv (several positions), BatchNorm, Linear (one position), Embedding and
  LayerNorm layers, in float64, the streamed self-influence (the quadratic form
  read off the rotated factors) and the streamed products with preconditioned
  queries equal what the same solver's generic path gives — a solve per force
  and flat per-sample gradients from ``torch.func`` — for single rows and groups;
- on a float32 net the products are taken in float32 and stay within float32
  rounding of the float64 answer;
- lowering ``working_memory_bytes`` splits the rows into many passes and changes
  nothing beyond rounding;
- the residual check is made once per call and skipped above
  ``RESIDUAL_CHECK_MAX_WORK`` training rows × parameters.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier
from torch import nn

import sklinfluence
from sklinfluence import InfluenceEstimator, config_context
from sklinfluence.curvature import capture
from sklinfluence.model.removal import (Removal, RowRemovals, group_removals, removal_chunks,
                                        removal_rows, single_removals, single_rows,
                                        stacked_rows)
from sklinfluence.response.rungs import removal_forces
from sklinfluence.solvers import base as solver_base
from sklinfluence.solvers.base import Solver

#: Float64 streamed vs generic: both are sums of the same products in another order.
RTOL = 1e-11


class ConvNet(nn.Module):
    """8×8 digits → Conv2d (36 positions) → BatchNorm2d → ReLU → Conv2d → Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(144, 10))

    def forward(self, x):
        return self.body(x)


class TokenNet(nn.Module):
    """Float token ids → Embedding (with padding) → mean → LayerNorm → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.emb(x.long()).mean(1)))


def _digits(n):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    return X[:n] / 16.0, y[:n]


def _tokens(n):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 12, size=(n, 6))
    return X.astype(np.float64), (X % 3 == 0).sum(1).clip(0, 2)


NETS = {"conv_batchnorm": (ConvNet, _digits), "embedding_layernorm": (TokenNet, _tokens)}


def _fitted(name, solver="ekfac", dtype=torch.float64, n=90):
    module, data = NETS[name]
    X, y = data(n)
    torch.manual_seed(0)
    net = NeuralNetClassifier(module().to(dtype), criterion=nn.CrossEntropyLoss, max_epochs=4,
                              lr=0.1, batch_size=32, optimizer__weight_decay=1e-3,
                              train_split=None, verbose=0).fit(X.astype(np.float32)
                                                               if dtype == torch.float32 else X, y)
    X = X.astype(np.float32) if dtype == torch.float32 else X
    est = InfluenceEstimator(FrozenEstimator(net), solver=solver, damping=0.05).fit(X, y)
    return est, X, y


def _removals(est, n, groups=None):
    X, T = est.X_train_[:n], est.T_train_[:n]
    if groups is None:
        return single_removals(X, T, np.arange(n))
    return group_removals(X, T, np.arange(n), groups)[0]


@pytest.fixture(scope="module", params=[(name, solver) for name in NETS
                                        for solver in ("ekfac", "kfac")])
def fitted(request):
    return _fitted(*request.param)


@pytest.mark.parametrize("grouped", [False, True])
def test_streamed_self_influence_is_the_solvers_own_quadratic_form(fitted, grouped):
    est, X, y = fitted
    groups = np.arange(40) % 7 if grouped else None
    removals = _removals(est, 40, groups)
    forces = partial(removal_forces, est.model_)
    got = est.solver_.self_products(removals, forces)
    reference = Solver.self_products(est.solver_, removals, forces)
    assert got.shape == (len(removals),) and bool((got > 0).all())
    assert_allclose(got.numpy(), reference.numpy(), rtol=RTOL)


@pytest.mark.parametrize("grouped", [False, True])
def test_streamed_products_with_queries_are_the_solvers_own(fitted, grouped):
    est, X, y = fitted
    groups = np.arange(50) % 9 if grouped else None
    removals = _removals(est, 50, groups)
    Xq, Tq = est.X_train_[60:66], est.T_train_[60:66]
    B = est.model_.per_sample_grads(est.model_.params, Xq, Tq)
    forces = partial(removal_forces, est.model_)
    got = est.solver_.query_products(B, Xq, Tq, forces)(removals)
    reference = Solver.query_products(est.solver_, B, Xq, Tq, forces)(removals)
    assert got.shape == (len(removals), 6)
    assert_allclose(got.numpy(), reference.numpy(), rtol=RTOL,
                    atol=RTOL * float(reference.abs().max()))
    # the queries as rows: their gradients read off their own captures, no B formed
    rows = est.solver_.query_products(None, Xq, Tq, forces)(removals)
    assert_allclose(rows.numpy(), reference.numpy(), rtol=RTOL,
                    atol=RTOL * float(reference.abs().max()))


def test_the_estimator_takes_the_fast_tier_and_matches_its_dense_checks(fitted):
    """Through the public methods: self-influence equals the diagonal of the
    influence matrix of the training rows with themselves."""
    est, X, y = fitted
    M = est.loss_change(X[:12], y[:12], X[:12], y[:12])
    assert_allclose(est.score_samples(X[:12], y[:12]), np.diag(M), rtol=1e-10)


def test_a_float32_net_streams_in_float32_within_its_rounding():
    est, X, y = _fitted("conv_batchnorm", dtype=torch.float32)
    removals = _removals(est, 40)
    Xq, Tq = est.X_train_[60:66], est.T_train_[60:66]
    B = est.model_.per_sample_grads(est.model_.params, Xq, Tq)
    forces = partial(removal_forces, est.model_)
    got = est.solver_.query_products(B, Xq, Tq, forces)(removals)
    reference = Solver.query_products(est.solver_, B, Xq, Tq, forces)(removals)
    scale = float(reference.abs().max())
    error = float((got - reference).abs().max()) / scale
    assert 0 < error < 1e-5  # float32 products (not float64: then the error is ~1e-15)
    forms = est.solver_.self_products(removals, forces)
    exact = Solver.self_products(est.solver_, removals, forces)
    assert_allclose(forms.numpy(), exact.numpy(), rtol=1e-5)


def test_a_lower_working_memory_streams_more_passes_with_the_same_answer(monkeypatch):
    est, X, y = _fitted("conv_batchnorm", n=150)
    whole_self = est.score_samples(X, y)
    whole = est.loss_change(X, y, X[:12], y[:12])
    sizes = []
    original = capture._batch_captures
    monkeypatch.setattr(capture, "_batch_captures",
                        lambda model, theta, layers, xb, *a, **k: (
                            sizes.append(len(xb)), original(model, theta, layers, xb, *a, **k))[1])
    with config_context(working_memory_bytes=200_000):
        streamed_self = est.score_samples(X, y)
        streamed = est.loss_change(X, y, X[:12], y[:12])  # queries in chunks too
    assert_allclose(streamed_self, whole_self, rtol=RTOL)
    assert_allclose(streamed, whole, rtol=RTOL, atol=RTOL * np.abs(whole).max())
    passes = [s for s in sizes if s > 1]  # not the one-row probes that size the passes
    assert len(passes) >= 6 and max(passes) < 150 / 3
    queries = []  # the 12 queries' solutions do not fit at once either
    factors = est.solver_.factors
    original_rows = factors.solve_rows
    monkeypatch.setattr(factors, "solve_rows", lambda Xq, *a: (queries.append(len(Xq)),
                                                              original_rows(Xq, *a))[1])
    with config_context(working_memory_bytes=2 * 5 * 8 * est.model_.n_params):  # 5 at once
        assert_allclose(est.loss_change(X, y, X[:12], y[:12]), whole, rtol=RTOL,
                        atol=RTOL * np.abs(whole).max())
    assert queries == [5, 5, 2]


def test_the_residual_is_measured_once_per_call_and_not_above_the_row_limit(monkeypatch):
    est, X, y = _fitted("conv_batchnorm")
    calls = []
    original = type(est.solver_)._relative_residual
    monkeypatch.setattr(type(est.solver_), "_relative_residual",
                        lambda self, *a: (calls.append(1), original(self, *a))[1])
    with config_context(working_memory_bytes=200_000):  # several passes, one check
        est.score_samples(X, y)
    assert len(calls) == 1
    assert est.diagnostics_["n_measured"] == solver_base.RESIDUAL_CHECKS
    assert 0 < est.diagnostics_["max_relative_residual"] < np.inf
    est.loss_change(X, y, X[:3], y[:3])  # the queries solved from captures: measured too
    assert len(calls) == 2 and est.diagnostics_["n_measured"] == 3
    assert 0 < est.diagnostics_["max_relative_residual"] < np.inf
    calls.clear()
    monkeypatch.setattr(solver_base, "RESIDUAL_CHECK_MAX_WORK",
                        len(X) * est.model_.n_params - 1)
    est.score_samples(X[:5], y[:5])
    est.loss_change(X, y, X[:3], y[:3])
    assert len(calls) == 0
    assert est.diagnostics_["max_relative_residual"] is None
    assert est.diagnostics_["n_measured"] == 0


def test_working_memory_bytes_is_a_checked_setting():
    assert sklinfluence.get_config()["working_memory_bytes"] == 64 * 2**20
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="working_memory_bytes must be"):
            sklinfluence.set_config(working_memory_bytes=bad)


# ----------------------------------------------------------------------- top-k
@pytest.mark.parametrize("solver", ["ekfac", "exact"])
def test_most_influential_is_the_top_of_the_full_matrix(solver):
    """Proponents and opponents per evaluation row equal the largest and smallest
    entries of each column of ``loss_change`` (for a streaming solver and one that
    solves), whatever ``working_memory_bytes`` splits the candidates into."""
    est, X, y = _fitted("conv_batchnorm", solver=solver, n=120)
    M = est.loss_change(X, y, X[:4], y[:4])  # (120, 4)
    with config_context(working_memory_bytes=700):  # a few candidates per chunk
        top = est.most_influential(X[:4], y[:4], n_top=5)
    order = np.argsort(-M, axis=0, kind="stable")
    assert top.proponents.shape == top.opponents.shape == (4, 5)
    assert_array_equal(top.proponents, order[:5].T)
    assert_array_equal(top.opponents, order[::-1][:5].T)
    assert_allclose(top.proponent_scores, np.take_along_axis(M, order[:5], 0).T, rtol=1e-10)
    assert_allclose(top.opponent_scores, np.take_along_axis(M, order[::-1][:5], 0).T,
                    rtol=1e-10)
    self_top = est.most_self_influential(n_top=7)
    s = est.score_samples(X, y)
    assert_array_equal(self_top.indices, np.argsort(-s, kind="stable")[:7])
    assert_allclose(self_top.scores, np.sort(s)[::-1][:7], rtol=1e-12)


def test_most_influential_ranks_given_candidates_and_groups():
    est, X, y = _fitted("conv_batchnorm", n=90)
    groups = np.arange(30) % 6
    M = est.loss_change(X[30:60], y[30:60], X[:3], y[:3], groups=groups)  # (6, 3)
    top = est.most_influential(X[:3], y[:3], n_top=10, X=X[30:60], y=y[30:60], groups=groups)
    assert top.proponents.shape == (3, 6)  # fewer candidates than n_top
    assert_array_equal(top.proponents, np.argsort(-M, axis=0, kind="stable").T)
    with pytest.raises(ValueError, match="n_top must be an integer >= 1"):
        est.most_influential(X[:3], y[:3], n_top=0)
    with pytest.raises(ValueError, match="pass X with them"):
        est.most_self_influential(y=y)


def test_row_chunks_on_joblib_workers_equal_the_sequential_answer():
    est, X, y = _fitted("conv_batchnorm", n=90)
    sequential = (est.score_samples(X, y), est.loss_change(X, y, X[:3], y[:3]),
                  est.most_influential(X[:3], y[:3], n_top=4).proponents)
    est.set_params(n_jobs=2)
    parallel = (est.score_samples(X, y), est.loss_change(X, y, X[:3], y[:3]),
                est.most_influential(X[:3], y[:3], n_top=4).proponents)
    for a, b in zip(sequential, parallel):
        assert_allclose(b, a, rtol=1e-12)


@pytest.mark.slow
def test_row_chunks_run_on_a_dask_local_cluster():
    distributed = pytest.importorskip("distributed")
    import joblib
    est, X, y = _fitted("conv_batchnorm", n=90)
    sequential = est.score_samples(X, y), est.loss_change(X, y, X[:3], y[:3])
    est.set_params(n_jobs=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            on_dask = est.score_samples(X, y), est.loss_change(X, y, X[:3], y[:3])
        assert len(client.scheduler_info()["workers"]) == 2
    for a, b in zip(sequential, on_dask):
        assert_allclose(b, a, rtol=1e-12)


def test_the_fast_tier_on_attention_projections():
    """The attention layer type (in-projection in three blocks, out_proj a Linear)
    through the default methods: streamed forms and products equal the generic path."""
    from sklinfluence.zoo import load_zoo_data, make_zoo_net
    X, y = load_zoo_data("transformer")
    X, y = X[:60].astype(np.float64), y[:60]
    net = make_zoo_net("transformer", max_epochs=2).initialize()
    net.module_.double().position.requires_grad_(False)
    net.partial_fit(X, y)
    est = InfluenceEstimator(FrozenEstimator(net), solver="ekfac", damping=0.1).fit(X, y)
    removals = _removals(est, 30)
    forces = partial(removal_forces, est.model_)
    assert_allclose(est.solver_.self_products(removals, forces).numpy(),
                    Solver.self_products(est.solver_, removals, forces).numpy(), rtol=RTOL)
    Xq, Tq = est.X_train_[40:44], est.T_train_[40:44]
    B = est.model_.per_sample_grads(est.model_.params, Xq, Tq)
    got = est.solver_.query_products(B, Xq, Tq, forces)(removals)
    reference = Solver.query_products(est.solver_, B, Xq, Tq, forces)(removals)
    assert_allclose(got.numpy(), reference.numpy(), rtol=RTOL,
                    atol=RTOL * float(reference.abs().max()))


# ------------------------------------------------------------- row removals
def test_row_removals_read_like_a_list_of_removals_without_copies():
    X = torch.arange(30.0, dtype=torch.float64).reshape(10, 3)
    T = torch.arange(10.0, dtype=torch.float64)[:, None]
    index = np.arange(10) + 5
    rows = single_removals(X, T, index)
    listed = [Removal(X[i:i + 1], T[i:i + 1], (int(index[i]),)) for i in range(10)]
    assert isinstance(rows, RowRemovals) and len(rows) == 10
    assert rows[-1].index == (14,) and rows[3].key == listed[3].key
    assert [r.index for r in rows] == [r.index for r in listed]
    with pytest.raises(IndexError):
        rows[10]
    for got, expected in zip(stacked_rows(rows, X), stacked_rows(listed, X)):
        assert_array_equal(got.numpy(), expected.numpy())
    assert stacked_rows(rows, X)[0] is X  # the rows themselves
    chunks = removal_chunks(rows, 4)
    assert [len(c) for c in chunks] == [len(c) for c in removal_chunks(listed, 4)] == [4, 4, 2]
    assert isinstance(chunks[1], RowRemovals) and chunks[1][0].index == (9,)
    assert [len(c) for c in removal_chunks(rows, None)] == [10]
    assert removal_chunks(rows[:0], 4) == [] == removal_chunks([], 4)
    assert single_rows(rows) and single_rows(listed) and removal_rows(rows) == 10
    assert not single_rows(group_removals(X, T, index, np.arange(10) // 2)[0])
    with pytest.raises(ValueError, match="one target and index per row"):
        RowRemovals(X, T[:9], index)
