"""Parallel (joblib, Dask), resumable (memory, SIGKILL) and verbose ground-truth runs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from nets import make_net, toy_data
from sklinfluence import Decomposer, LOOEstimator, PBRFEstimator
from sklinfluence.utils.execution import DiskStore
from sklinfluence.response.responder import RESPONSE_CACHE
from tolerances import ENSEMBLE_VS_ONE_AT_A_TIME_REL

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data():
    return toy_data("CrossEntropyLoss", n=40)


def _loo(**kw):
    return LOOEstimator(make_net("CrossEntropyLoss", 4, max_epochs=6), random_state=0, **kw)


def test_n_jobs_gives_identical_results(data):
    X, y = data
    rows = X[:8]
    groups = [3, 3, 2, 1, 1, 1, 0, 4]
    sequential = _loo(n_jobs=1).fit(X, y)
    sequential = sequential.param_change(rows), sequential.param_change(rows, groups=groups)
    RESPONSE_CACHE.clear()
    parallel = _loo(n_jobs=2).fit(X, y)
    assert_array_equal(parallel.param_change(rows), sequential[0])
    assert_array_equal(parallel.param_change(rows, groups=groups), sequential[1])
    RESPONSE_CACHE.clear()
    pbrf_1 = PBRFEstimator(make_net("CrossEntropyLoss", 4), damping=0.5, random_state=0)
    pbrf_2 = PBRFEstimator(make_net("CrossEntropyLoss", 4), damping=0.5, random_state=0,
                           n_jobs=2)
    a = pbrf_1.fit(X, y).score_samples(rows)
    RESPONSE_CACHE.clear()
    assert_array_equal(pbrf_2.fit(X, y).score_samples(rows), a)


def test_a_backend_without_result_generators_gives_identical_results(data):
    """joblib's ``multiprocessing`` backend cannot stream results as they finish:
    the workers' results then come back as one list, the same answers."""
    X, y = data
    rows = X[:4]
    sequential = _loo(n_jobs=1).fit(X, y).param_change(rows)
    RESPONSE_CACHE.clear()
    with joblib.parallel_config(backend="multiprocessing"):
        parallel = _loo(n_jobs=2).fit(X, y).param_change(rows)
    assert_array_equal(parallel, sequential)


@pytest.mark.slow
def test_dask_local_cluster_gives_identical_results(data):
    distributed = pytest.importorskip("distributed")
    X, y = data
    rows = X[:6]
    dec = Decomposer(make_net("CrossEntropyLoss", 4, max_epochs=6), damping=0.5,
                     random_state=0, n_jobs=2)
    groups = [0, 0, 1, 2, 2, 2]
    sequential = dec.fit(X, y).transform(rows)
    sequential_groups = dec.transform(rows, groups=groups)
    RESPONSE_CACHE.clear()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            on_dask = dec.fit(X, y).transform(rows)
            on_dask_groups = dec.transform(rows, groups=groups)
        assert len(client.scheduler_info()["workers"]) == 2
    assert_array_equal(on_dask, sequential)
    assert_array_equal(on_dask_groups, sequential_groups)


def test_memory_persists_each_sample_and_detects_corruption(data, tmp_path):
    X, y = data
    rows = X[:5]
    first = _loo(memory=str(tmp_path)).fit(X, y)
    reference = first.param_change(rows)
    key = first.responder_.rung_key(first._rung())
    store = DiskStore(tmp_path)
    assert store.count(key) == 5
    RESPONSE_CACHE.clear()
    second = _loo(memory=joblib.Memory(str(tmp_path), verbose=0)).fit(X, y)
    assert_array_equal(second.param_change(rows), reference)
    assert "cold_start_loo" not in second.responder_.timings  # all loaded, none retrained
    # a truncated file is detected, removed and recomputed, never returned
    victim = sorted(store.location.rglob("*.npz"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    RESPONSE_CACHE.clear()
    third = _loo(memory=str(tmp_path)).fit(X, y)
    assert_array_equal(third.param_change(rows), reference)
    assert len(third.responder_.timings["cold_start_loo"]) == 1
    assert not list(store.location.rglob("*.tmp"))


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from nets import make_net, toy_data
    from sklinfluence import LOOEstimator
    X, y = toy_data("CrossEntropyLoss", n=40)
    est = LOOEstimator(make_net("CrossEntropyLoss", 4, max_epochs={epochs}), random_state=0,
                       memory={memory!r}, removal_batch_size=1)
    est.fit(X, y).param_change(X[:{n}], groups={groups})
    print("finished")
""")


@pytest.mark.slow
@pytest.mark.parametrize("groups", [None, [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 10, 11, 11,
                                           12, 13, 14, 15, 16, 17]], ids=["rows", "groups"])
def test_killed_run_resumes_without_redoing_finished_work(data, tmp_path, groups):
    X, y = data
    n, epochs = (12, 60) if groups is None else (24, 60)
    n_removals = n if groups is None else len(set(groups))
    memory = tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(HERE), epochs=epochs, memory=str(memory), n=n,
                                    groups=groups))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store_files = lambda: list((memory / "sklinfluence-responses").rglob("*.npz"))  # noqa: E731
    deadline = time.time() + 120
    while len(store_files()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(store_files())
    assert 3 <= done < n_removals, \
        f"the run was not interrupted mid-way ({done} of {n_removals} finished)"

    resumed = LOOEstimator(make_net("CrossEntropyLoss", 4, max_epochs=epochs), random_state=0,
                           memory=str(memory), removal_batch_size=1).fit(X, y)
    result = resumed.param_change(X[:n], groups=groups)
    assert len(resumed.responder_.timings["cold_start_loo"]) == n_removals - done
    RESPONSE_CACHE.clear()
    fresh = LOOEstimator(make_net("CrossEntropyLoss", 4, max_epochs=epochs), random_state=0,
                         removal_batch_size=1).fit(X, y).param_change(X[:n], groups=groups)
    assert_array_equal(result, fresh)


def test_verbose_shows_a_progress_bar_and_quiet_shows_nothing(data, capsys):
    X, y = data
    _loo(verbose=1).fit(X, y).score_samples(X[:3])
    err = capsys.readouterr().err
    assert "cold_start_loo" in err and "3/3" in err
    RESPONSE_CACHE.clear()
    _loo().fit(X, y).score_samples(X[:3])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def _digits_mlp_pbrf(damping, batch):
    from sklearn.datasets import load_digits
    from skorch import NeuralNetClassifier
    import torch

    from test_mlp_ladder import MLP

    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16.0, y[:300]
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=50, max_epochs=20, iterator_train__shuffle=True,
                              verbose=0)
    RESPONSE_CACHE.clear()
    return PBRFEstimator(net, damping=damping, removal_batch_size=batch,
                         random_state=0).fit(X, y), X


def test_batched_pbrf_equals_one_at_a_time():
    one, X = _digits_mlp_pbrf(1e-2, 1)
    rows = X[:20]
    single = one.param_change(rows)
    assert one.responder_.last_info["converged"].all()
    many, _ = _digits_mlp_pbrf(1e-2, 8)
    batched = many.param_change(rows)
    info = many.responder_.last_info
    assert info["converged"].all() and (info["grad_norm"] <= 1e-9 * info["initial_grad_norm"]).all()
    scale = np.linalg.norm(single, axis=1, keepdims=True)
    assert np.abs(batched - single).max() / scale.min() < 1e-7


def _pbrf_hessian_at_the_optimum(est, row):
    """``H₀`` and the PBRF objective's Hessian ``H₀ − ε ∇²L_m`` at ``θˢ``, dense."""
    from torch.func import hessian

    from sklinfluence.curvature.operator import Curvature

    model, Xt, Tt = est.model_, est.X_train_, est.T_train_
    H0 = Curvature(model, Xt, Tt, damping=est.damping).dense()
    removed = hessian(lambda th: model.losses(th, Xt[row:row + 1], Tt[row:row + 1])[0])(
        model.params)
    return H0, H0 - est.epsilon_ * removed


def test_anderson_mixing_converges_where_the_plain_chord_diverges(monkeypatch):
    """At damping 1e-4 the plain chord iteration ``θ ← θ − H₀⁻¹∇F`` diverges for row 3
    (spectral radius of ``I − H₀⁻¹H`` above 1, computed densely here) and crawls for
    rows 4 and 7; mixed with its last steps it converges for every row in the batch
    without handing any to Newton, to the one-at-a-time Newton answers."""
    import torch

    from sklinfluence.response import batched as batched_module

    rows = [0, 1, 2, 3, 4, 6, 7]
    many, X = _digits_mlp_pbrf(1e-4, 8)
    H0, H = _pbrf_hessian_at_the_optimum(many, 3)
    assert float((1 - torch.linalg.eigvals(torch.linalg.solve(H0, H)).real).abs().max()) > 1
    newton = []
    minimize = batched_module.minimize_response
    monkeypatch.setattr(batched_module, "minimize_response",
                        lambda *a, **k: (newton.append(1), minimize(*a, **k))[1])
    batched = many.param_change(X[rows])
    info = many.responder_.last_info
    assert not newton and info["converged"].all()
    assert (info["grad_norm"] <= 1e-9 * info["initial_grad_norm"]).all()
    monkeypatch.setattr(batched_module, "minimize_response", minimize)
    one, _ = _digits_mlp_pbrf(1e-4, 1)
    single = one.param_change(X[rows])
    assert one.responder_.last_info["converged"].all()
    scale = np.linalg.norm(single, axis=1, keepdims=True)
    assert np.abs(batched - single).max() / scale.min() < 1e-7


def test_a_removal_whose_objective_is_not_convex_is_certified_without_newton(monkeypatch):
    """At damping 1e-3 row 5's PBRF objective is not convex at ``θˢ`` (its Hessian's
    lowest eigenvalue, computed densely here, is negative): the batched iteration
    stalls, finds negative curvature in the span of its own steps and reports it — a
    Ritz value, so between the true lowest eigenvalue and 0 — without a Newton solve;
    the warning says what damping convexity needs at least."""
    import torch
    from sklearn.exceptions import ConvergenceWarning

    from sklinfluence.response import batched as batched_module

    est, X = _digits_mlp_pbrf(1e-3, 8)
    _, H = _pbrf_hessian_at_the_optimum(est, 5)
    lowest = float(torch.linalg.eigvalsh(H)[0])
    assert lowest < 0
    newton = []
    minimize = batched_module.minimize_response
    monkeypatch.setattr(batched_module, "minimize_response",
                        lambda *a, **k: (newton.append(1), minimize(*a, **k))[1])
    with pytest.warns(ConvergenceWarning, match="at most -.*at least to be convex"):
        est.param_change(X[:8])
    info = est.responder_.last_info
    assert not newton
    assert not info["converged"][5] and np.delete(info["converged"], 5).all()
    assert lowest <= info["lowest_curvature"][5] < 0


@pytest.mark.slow
def test_batched_pbrf_above_the_threshold_uses_the_cg_chord_factor(data, monkeypatch):
    """Above :data:`~sklinfluence.solvers.EXACT_MAX_PARAMS` (lowered below this net's
    size: ``plan_solvers`` reads it at call time) the batched PBRF's shared factor
    ``(G + μI + λI)⁻¹`` is batched CG, not the dense Cholesky. Its answers equal the
    one-at-a-time Newton solves and the dense-factor chord solves: each stops at a
    gradient norm ``tol`` times the initial one, so each errs by at most about
    ``κ(H) tol`` relative, ``H = H₀ − ε ∇²L_m`` the objective's Hessian: with
    ``ε ‖∇²L_m‖ ≤ λ_min(H₀)/2`` (checked) ``κ(H) ≤ 3 κ(H₀)``. The chord iteration
    must answer every sample itself: a wrong factor would hand them to Newton."""
    import torch
    from torch.func import hessian

    from sklinfluence.response import batched as batched_module

    from sklinfluence import solvers
    from sklinfluence.solvers import policy
    from sklinfluence.curvature.operator import Curvature

    X, y = data
    rows, tol, damping = X[:6], 1e-9, 0.3
    net = make_net("CrossEntropyLoss", 4, max_epochs=6, optimizer__weight_decay=1e-3)

    def pbrf_est(batch):
        RESPONSE_CACHE.clear()
        return PBRFEstimator(net, damping=damping, tol=tol, removal_batch_size=batch,
                             random_state=0).fit(X, y)

    def met_tol(est):
        info = est.responder_.last_info
        return info["converged"].all() and (info["grad_norm"] <= tol * info["initial_grad_norm"]).all()

    one = pbrf_est(1)
    single = one.param_change(rows)
    dense = pbrf_est(6)
    dense_chord = dense.param_change(rows)
    model = one.model_
    assert isinstance(dense.responder_.chord_solver(), solvers.ExactSolver)
    assert met_tol(one) and met_tol(dense)

    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", model.n_params - 1)
    monkeypatch.setattr(policy, "memory_limit", lambda: 16 * model.n_params ** 2 - 1)
    newton = []  # samples the chord iteration handed to one-at-a-time Newton
    minimize = batched_module.minimize_response
    monkeypatch.setattr(batched_module, "minimize_response",
                        lambda *a, **k: (newton.append(1), minimize(*a, **k))[1])
    cg = pbrf_est(6)
    cg_chord = cg.param_change(rows)
    chord = cg.responder_.chord_solver()
    assert isinstance(chord, solvers.CGSolver) and chord.last_solve is not None
    assert ("ggn", "exact") not in cg.responder_._solvers  # no dense factor was built
    assert not newton
    assert met_tol(cg)

    eigenvalues = torch.linalg.eigvalsh(
        Curvature(model, one.X_train_, one.T_train_, damping=damping).dense())
    Xt, Tt = one.X_train_[:6], one.T_train_[:6]
    removed = max(float(torch.linalg.matrix_norm(hessian(
        lambda th: model.losses(th, Xt[i:i + 1], Tt[i:i + 1])[0])(model.params), ord=2))
        for i in range(6))
    assert one.epsilon_ * removed <= float(eigenvalues[0]) / 2
    bound = 2 * 3 * float(eigenvalues[-1] / eigenvalues[0]) * tol  # two solves, 3 κ(H₀) tol each
    scale = np.linalg.norm(single, axis=1, keepdims=True)
    for other in (cg_chord, dense_chord):
        assert np.all(np.linalg.norm(other - single, axis=1, keepdims=True) <= bound * scale)


@pytest.mark.parametrize("kind", ["MSELoss", "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_vectorised_loo_ensemble_equals_one_at_a_time(kind, optimizer):
    import torch

    X, y = toy_data(kind, n=40)
    net = make_net(kind, 4, max_epochs=6, lr=0.05, optimizer=getattr(torch.optim, optimizer),
                   optimizer__weight_decay=1e-2)
    for options in ({}, {"warm_start": True}, {"proximal": True, "damping": 0.1}):
        RESPONSE_CACHE.clear()
        one = LOOEstimator(net, removal_batch_size=1, random_state=0, **options).fit(X, y)
        single = one.param_change(X[:5])
        RESPONSE_CACHE.clear()
        many = LOOEstimator(net, removal_batch_size=4, random_state=0, **options).fit(X, y)
        assert many.responder_.context.recipe.can_retrain_batch(many.model_)
        batched = many.param_change(X[:5])
        np.testing.assert_allclose(batched, single, rtol=0,
                                   atol=ENSEMBLE_VS_ONE_AT_A_TIME_REL * np.abs(single).max())


def test_nets_the_ensemble_cannot_replay_retrain_one_at_a_time(data):
    from skorch.callbacks import LRScheduler

    X, y = data
    net = make_net("CrossEntropyLoss", 4, max_epochs=4, callbacks=[LRScheduler()])
    loo = LOOEstimator(net, random_state=0).fit(X, y)
    assert not loo.responder_.context.recipe.can_retrain_batch(loo.model_)
    assert loo.param_change(X[:2]).shape == (2, loo.model_.n_params)
