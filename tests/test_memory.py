"""No dense P × P matrix unless it fits: the memory limit, the clear refusal before
allocating, and the matrix-free paths that take over above it.

A limit just below ``16 P²`` bytes makes a small net "too large", so that the
paths a large net takes are run to values and compared with the dense ones."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from nets import make_net, toy_data
from sklinfluence import (Decomposer, InfluenceEstimator, PBRFEstimator, config_context,
                          get_config, set_config)
from sklinfluence.response.cache import RESPONSE_CACHE
from sklinfluence.curvature import operator as curvature_module
from sklinfluence.curvature.operator import Curvature
from sklinfluence.curvature.dense_ggn import linear_ggn
from sklinfluence.curvature.lowrank import top_eigenpairs
from sklinfluence.exceptions import NotEnoughMemoryError
from sklinfluence.utils.memory import (available_bytes, check_dense, chunk_rows, dense_bytes,
                                       dense_fits_memory, format_bytes, holding, memory_limit,
                                       working_memory)
from sklinfluence.solvers import CGSolver, ExactSolver

DAMPING = 0.3


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=50)
    net = make_net("CrossEntropyLoss", X.shape[1], hidden=8, max_epochs=20,
                   optimizer__weight_decay=1e-3)
    return X, y, net


def _n_params(net, X):
    return InfluenceEstimator(net, random_state=0).fit(X[:10], np.arange(10) % 3).model_.n_params


def test_the_limit_is_half_the_available_memory_unless_set():
    available = available_bytes()
    assert available is not None and available > 2**26  # /proc/meminfo on Linux
    assert get_config()["memory_limit_bytes"] is None
    assert abs(memory_limit() - available // 2) < 2**28  # other processes allocate meanwhile
    with config_context(memory_limit_bytes=12345):
        assert memory_limit() == 12345
        assert dense_fits_memory(27) and not dense_fits_memory(28)  # 16·27² = 11,664
    assert dense_bytes(71_754) == 16 * 71_754**2
    assert format_bytes(dense_bytes(71_754)) == "82.4 GB"
    assert format_bytes(999) == "999 B" and format_bytes(1_500_000) == "1.5 MB"
    for bad in (0, -1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="memory_limit_bytes must be None"):
            set_config(memory_limit_bytes=bad)


def test_exact_beyond_the_limit_is_refused_before_allocating(data, monkeypatch):
    X, y, net = data
    est = InfluenceEstimator(net, damping=DAMPING, solver="exact", random_state=0)
    P = _n_params(net, X)
    built = []  # any dense build would pass through one of these
    for name in ("_jacobian_ggn", "_diagonal"):
        original = getattr(Curvature, name)
        monkeypatch.setattr(Curvature, name, lambda self, *a, _o=original, _n=name, **k: (
            built.append(_n), _o(self, *a, **k))[1])
    monkeypatch.setattr(curvature_module, "linear_ggn", lambda *a, _o=linear_ggn, **k: (
        built.append("linear_ggn"), _o(*a, **k))[1])
    with config_context(memory_limit_bytes=dense_bytes(P) - 1):
        with pytest.raises(NotEnoughMemoryError) as caught:
            est.fit(X, y)
    message = str(caught.value)
    assert f"dense {P:,} × {P:,} matrix: {format_bytes(dense_bytes(P))}" in message
    assert f"limit of {format_bytes(dense_bytes(P) - 1)}" in message
    assert "solver='cg'" in message and "Nothing was allocated" in message
    assert isinstance(caught.value, MemoryError) and not built
    with config_context(memory_limit_bytes=dense_bytes(P)):  # exactly enough
        check_dense(P)
        assert isinstance(est.fit(X, y).solver_, ExactSolver)
    assert "linear_ggn" in built  # the probe sees the build when it happens


def test_auto_rung_4_and_the_pbrf_go_matrix_free_above_the_limit(data):
    """Above the limit ``"auto"`` is block CG, the Decomposer's exact rung is block CG
    to ``tol`` and the batched PBRF's shared factor is CG; every answer equals the
    dense one to what the solves' tolerances allow."""
    X, y, net = data
    rows = X[:5]
    RESPONSE_CACHE.clear()
    dense_dec = Decomposer(net, damping=DAMPING, solver="auto", tol=1e-12,
                           random_state=0).fit(X, y)
    dense_losses = dense_dec.rung_losses(rows)
    dense_pbrf = PBRFEstimator(net, damping=DAMPING, removal_batch_size=5,
                               random_state=0).fit(X, y).param_change(rows)
    assert isinstance(dense_dec.responder_.solver(exact=True), ExactSolver)
    P = dense_dec.model_.n_params
    RESPONSE_CACHE.clear()
    with config_context(memory_limit_bytes=dense_bytes(P) - 1):
        dec = Decomposer(net, damping=DAMPING, solver="auto", tol=1e-12,
                         random_state=0).fit(X, y)
        losses = dec.rung_losses(rows)
        exact_rung = dec.responder_.solver(exact=True)
        assert isinstance(exact_rung, CGSolver) and exact_rung.last_solve.converged
        assert exact_rung is dec.responder_.solver()  # "auto" resolves to the same CG
        pbrf = PBRFEstimator(net, damping=DAMPING, removal_batch_size=5,
                             random_state=0).fit(X, y)
        matrix_free = pbrf.param_change(rows)
        assert isinstance(pbrf.responder_.chord_solver(), CGSolver)
        assert pbrf.responder_.last_info["converged"].all()
        est = InfluenceEstimator(net, damping=DAMPING, tol=1e-12, random_state=0).fit(X, y)
        assert est.diagnostics_["solver"] == "cg"
    assert_allclose(losses, dense_losses, rtol=1e-9)
    scale = np.abs(dense_pbrf).max()
    assert_allclose(matrix_free, dense_pbrf, rtol=0, atol=1e-7 * scale)
    RESPONSE_CACHE.clear()


def test_low_rank_eigenpairs_use_lanczos_instead_of_a_dense_matrix_beyond_the_limit(data):
    """``top_eigenpairs`` takes the dense ``eigh`` for a rank above a third of ``P``;
    beyond the limit it runs Lanczos (``eigsh``) instead, with the same answer."""
    X, y, net = data
    est = InfluenceEstimator(net, damping=DAMPING, random_state=0).fit(X, y)
    curvature = Curvature(est.model_, est.X_train_, est.T_train_, damping=DAMPING)
    P = curvature.n_params
    rank = P // 2
    dense_values, dense_vectors = top_eigenpairs(curvature, rank)
    with config_context(memory_limit_bytes=dense_bytes(P) - 1):
        with pytest.raises(NotEnoughMemoryError):
            curvature.dense()
        values, vectors = top_eigenpairs(curvature, rank, tol=1e-12)
    assert_allclose(values, dense_values, rtol=1e-9)
    overlap = (vectors * dense_vectors).sum(dim=1).abs()  # eigenvectors up to sign
    assert_allclose(overlap, np.ones(rank), atol=1e-6)


def test_what_a_caller_holds_counts_against_the_working_memory():
    with config_context(working_memory_bytes=1000):
        assert working_memory() == 1000 and chunk_rows(10) == 100
        with holding(300):
            assert working_memory() == 700 and chunk_rows(10) == 70
            with holding(200):  # nested blocks add up
                assert working_memory() == 500
            with holding(10**6):  # never below a quarter of the setting
                assert working_memory() == 250 and chunk_rows(10, 7) == 7
        assert working_memory() == 1000  # released on leaving
        with pytest.raises(RuntimeError), holding(900):
            raise RuntimeError
        assert working_memory() == 1000
