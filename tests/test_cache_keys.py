"""Cache keys: each rung's key (:meth:`Responder.rung_key`, from
:meth:`~sklinfluence.response.rungs.Rung.key_parts`) changes with every setting that changes
its responses and with none that does not; a removal's key with its rows and
targets; stored digests keep their values; and a new damping recomputes the
proximal rung instead of reusing the old one's responses (a closed form on linear
least squares)."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.linear_model import Ridge

from linear_problems import curvature, design, grads, recipe, theta_of, well_conditioned_data
from sklinfluence import Decomposer, LOOEstimator
from sklinfluence.response.cache import CacheOwner
from sklinfluence.utils.execution import DiskStore
from sklinfluence.model.removal import Removal, group_removals, sample_key
from sklinfluence.response.responder import Responder, rung
from sklinfluence.model.skorch_adapter import SkorchAdapter

MU = 0.1
COMMON = {"params", "weight_decay", "X", "T", "epsilon"}
#: What changes each rung's responses (besides the data, θˢ, ε, loss and architecture).
MATTERS = {
    "cold_start_loo": COMMON | {"seed", "max_epochs", "recipe", "theta_0"},
    "warm_start": COMMON | {"seed", "warm_start_epochs", "recipe"},
    "proximal": COMMON | {"damping", "seed", "warm_start_epochs", "recipe"},
    "pbrf": COMMON | {"damping", "pbrf_tol", "pbrf_max_iter"},
    # above the dense size the exact rung is solved by CG or the kernel, to tol
    "exact_influence": COMMON | {"damping", "tol", "max_iter"},
    "influence": COMMON | {"damping", "curvature", "solver", "solver_params", "tol", "max_iter"},
}
#: The exact rung's key also names the configured solver, which does not change its
#: answer: harmless, as closed-form rungs are never cached (not checked either way).
OVER_KEYED = {"exact_influence": {"curvature", "solver", "solver_params"}}


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    X, y = well_conditioned_data()
    net = recipe(X, MU, max_epochs=3)
    dec = Decomposer(net, damping=0.05, random_state=0).fit(X, y)
    ctx = dec.responder_.context
    store = DiskStore(tmp_path_factory.mktemp("store"))
    other_recipe = SkorchAdapter(clone(net).set_params(lr=0.5 * net.get_params()["lr"]))
    return ctx, {
        "params": lambda c: _model(c, params=c.model.params + 1e-3),
        "weight_decay": lambda c: _model(c, weight_decay=c.model.weight_decay + 1e-3),
        "X": lambda c: replace(c, X=c.X + 1e-3),
        "T": lambda c: replace(c, T=c.T + 1e-3),
        "epsilon": lambda c: replace(c, epsilon=-c.epsilon),
        "damping": lambda c: replace(c, damping=2 * c.damping),
        "curvature": lambda c: replace(c, curvature="hessian"),
        "solver": lambda c: replace(c, solver="cg"),
        "solver_params": lambda c: replace(c, solver_params={"mixed_precision": True}),
        "tol": lambda c: replace(c, tol=1e-5),
        "max_iter": lambda c: replace(c, max_iter=7),
        "pbrf_tol": lambda c: replace(c, pbrf_tol=1e-4),
        "pbrf_max_iter": lambda c: replace(c, pbrf_max_iter=3),
        "seed": lambda c: replace(c, seed=c.seed + 1),
        "max_epochs": lambda c: replace(c, max_epochs=c.max_epochs + 1),
        "warm_start_epochs": lambda c: replace(c, warm_start_epochs=c.warm_start_epochs + 1),
        "recipe": lambda c: replace(c, recipe=other_recipe),
        "theta_0": lambda c: replace(c, theta_0=c.theta_0 + 1e-3),
        # how the work is done, not its answer
        "batch_size": lambda c: replace(c, batch_size=5),
        "n_jobs": lambda c: replace(c, n_jobs=2),
        "verbose": lambda c: replace(c, verbose=2),
        "store": lambda c: replace(c, store=store),
        "removal_batch_size": lambda c: replace(c, removal_batch_size=7),
        "cache_owner": lambda c: replace(c, cache_owner=CacheOwner()),
    }


def _model(ctx, **attributes):
    model = copy.copy(ctx.model)
    for name, value in attributes.items():
        setattr(model, name, value)
    return replace(ctx, model=model)


@pytest.mark.parametrize("name", list(MATTERS))
def test_a_rungs_key_changes_with_what_changes_its_answer_and_nothing_else(context, name):
    ctx, changes = context
    r = rung(name)
    key = Responder(ctx).rung_key(r)
    assert Responder(replace(ctx)).rung_key(r) == key  # a fresh responder, the same key
    changed = {field for field, change in changes.items()
               if Responder(change(ctx)).rung_key(r) != key}
    assert changed - OVER_KEYED.get(name, set()) == MATTERS[name]


def test_a_convex_baselines_proximal_key_names_its_minimiser_settings():
    """A Ridge's proximal rung is minimised exactly (to ``pbrf_tol``, within
    ``pbrf_max_iter``), not retrained: those settings enter its key."""
    X, y = well_conditioned_data()
    ctx = LOOEstimator(Ridge(alpha=1.0), warm_start=True, proximal=True, damping=0.1,
                       random_state=0).fit(X, y).responder_.context
    assert ctx.recipe.exact_proximal
    r = rung("proximal")
    key = Responder(ctx).rung_key(r)
    for change in ({"pbrf_tol": 1e-4}, {"pbrf_max_iter": 3}, {"damping": 0.2}):
        assert Responder(replace(ctx, **change)).rung_key(r) != key, change
    for change in ({"tol": 1e-4}, {"solver": "cg"}, {"verbose": 1}, {"n_jobs": 2}):
        assert Responder(replace(ctx, **change)).rung_key(r) == key, change


def test_a_removals_key_is_its_rows_and_targets_only():
    X = torch.arange(6, dtype=torch.float64).reshape(3, 2) / 7
    T = torch.tensor([[0.5], [-1.25], [2.0]], dtype=torch.float64)
    single = Removal(X[:1], T[:1], (0,))
    # one row: the row's own digest, fixed (stored responses of earlier versions)
    assert single.key == sample_key(X[0], T[0]) == "8f2f5f22a296f75e7a3b121c8d68f814"
    group = Removal(X, T, (0, 1, 2))
    assert group.key == "6067671ab71fdabccbac60d387d9608c"
    labels = torch.tensor([2, 0, 1])
    assert Removal(X[1:2], labels[1:2], (1,)).key == "b74200180f0fb3b3d0a8a3f02b5c7ce5"
    assert Removal(X, labels, (0, 1, 2)).key == "5669473df2ed0de16c6edf4b6aea24b1"
    # the rows and the targets count; the position and the group label do not
    assert Removal(X[:1] + 1e-9, T[:1], (0,)).key != single.key
    assert Removal(X[:1], T[:1] + 1e-9, (0,)).key != single.key
    assert Removal(X[:1], T[:1], (-1,), label="a").key == single.key
    assert Removal(X[:2], T[:2], (0, 1)).key not in (single.key, group.key)
    assert Removal(X, T + 1e-9, (0, 1, 2)).key != group.key
    removals, _ = group_removals(X, T, np.arange(3), ["b", "a", "b"])
    assert [r.key for r in removals] == [Removal(X[1:2], T[1:2], (1,)).key,
                                         Removal(X[[0, 2]], T[[0, 2]], (0, 2)).key]


def test_a_new_damping_recomputes_the_proximal_rung():
    """Clones share their cache owner, so a damping missing from the key would
    hand the second estimator the first one's responses. Each equals its own
    closed form, ``−(A + λI − ε∇²L_m)⁻¹(∇J − ε∇L_m)`` (the recipe run to convergence
    from θˢ on the remaining rows with the proximity term)."""
    X, y = well_conditioned_data(seed=1)
    N = len(X)
    net = recipe(X, 0.0, max_epochs=2)  # μ = 0, θˢ not converged: a large response
    first = LOOEstimator(net, warm_start=True, proximal=True, damping=0.05,
                         warm_start_fraction=150, random_state=0).fit(X, y)
    second = clone(first).set_params(damping=0.5).fit(X, y)
    assert second._cache_owner is first._cache_owner
    rows = [0, 7]
    got = {lam: est.param_change(X[rows]) for lam, est in ((0.05, first), (0.5, second))}
    theta_s = theta_of(first.net_)
    A = curvature(X, 0.0)
    grad_J = A @ theta_s - 2.0 / N * design(X).T @ y
    for lam, delta in got.items():
        for row, m in enumerate(rows):
            x = design(X[m:m + 1])[0]
            g = grads(X[m:m + 1], y[m:m + 1], theta_s)[0]
            K = A + lam * np.eye(len(theta_s)) - 2 * np.outer(x, x) / N
            expected = -np.linalg.solve(K, grad_J - g / N)
            assert_allclose(delta[row], expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    assert np.abs(got[0.05] - got[0.5]).max() > 0.1 * np.abs(got[0.5]).max()
