"""float32 nets, as skorch trains them: ``tol=None`` means a float32-sized tolerance,
``"auto"`` takes the mixed-precision kernel for them, an explicit mixed-precision
request is honoured (kernel) or refused with a warning (CG, whose products are float32
already), and the answers match the same weights in float64 to what float32 carries."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from torch import nn

from sklinfluence import InfluenceEstimator
from sklinfluence.solvers import policy


def _module():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(108, 3))


@pytest.fixture(scope="module")
def nets():
    """A float32 CNN (357 parameters) trained on 60 digits of 3 classes, and a
    float64 net holding the same weights."""
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    X, y = (X[keep][:60] / 16.0).astype(np.float32), y[keep][:60]
    torch.manual_seed(0)
    net = NeuralNetClassifier(_module, criterion=nn.CrossEntropyLoss, max_epochs=8, lr=0.2,
                              optimizer__weight_decay=1e-3, train_split=None, verbose=0)
    net.fit(X, y)
    double = NeuralNetClassifier(_module, criterion=nn.CrossEntropyLoss,
                                 optimizer__weight_decay=1e-3, train_split=None, verbose=0)
    double.initialize()
    double.module_.load_state_dict(net.module_.state_dict())
    double.module_.double()
    return net, double, X, y


def test_auto_on_a_float32_net_is_the_mixed_kernel_at_a_float32_tol(nets, monkeypatch):
    """Above the dense size a float32 net gets the float32 kernel, refined in
    float64 to ``tol=1e-6`` (the default for float32 nets); its self-influence and
    influence matrix equal the float64 net's to float32's reach (measured 3e-7)."""
    net, double, X, y = nets
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", 100)
    est = InfluenceEstimator(FrozenEstimator(net), damping=1e-2).fit(X, y)
    d = est.diagnostics_
    assert (d["solver"], d["precision"], d["mixed_precision"], d["tol"]) == \
        ("kernel", "float32", True, 1e-6)
    ref = InfluenceEstimator(FrozenEstimator(double), damping=1e-2, solver="exact").fit(
        X.astype(np.float64), y)
    assert ref.diagnostics_["tol"] == 1e-10
    expected = ref.score_samples(X.astype(np.float64))
    assert_allclose(est.score_samples(X), expected, rtol=1e-5)
    assert est.diagnostics_["converged"]
    matrix = ref.loss_change(X.astype(np.float64), y, X[:9].astype(np.float64), y[:9])
    got = est.loss_change(X, y, X[:9], y[:9])
    assert_allclose(got, matrix, rtol=0, atol=1e-5 * np.abs(matrix).max())
    residual = est.diagnostics_["max_relative_residual"]  # None once rebuilt in float64
    assert est.diagnostics_["converged"] and (residual is None or residual <= 1e-6)


def test_an_explicit_mixed_precision_request_is_honoured_on_a_float32_kernel(nets):
    net, _, X, y = nets
    for mixed, precision in [(True, "float32"), (False, "float64")]:
        est = InfluenceEstimator(FrozenEstimator(net), damping=1e-2, solver="kernel",
                                 solver_params={"mixed_precision": mixed}).fit(X, y)
        assert est.diagnostics_["precision"] == precision
        assert est.diagnostics_["mixed_precision"] is mixed


def test_mixed_precision_cg_on_a_float32_net_says_it_has_no_effect(nets):
    net, _, X, y = nets
    with pytest.warns(UserWarning, match="no effect with solver='cg' on a float32 net"):
        est = InfluenceEstimator(FrozenEstimator(net), damping=1e-2, solver="cg",
                                 solver_params={"mixed_precision": True}).fit(X, y)
    assert est.diagnostics_["mixed_precision"] is False


def test_the_pbrf_of_a_float32_net_with_a_cg_chord_matches_the_dense_one(nets, monkeypatch):
    """Above the dense and kernel sizes the batched PBRF's shared step is CG on the
    float32 net's operator, fed the float64 gradients of the PBRF objective (solved on
    a float64 copy): it reaches the same minimiser as the dense factor."""
    from sklinfluence import PBRFEstimator
    from sklinfluence.response.cache import RESPONSE_CACHE

    net, _, X, y = nets
    dense = PBRFEstimator(FrozenEstimator(net), damping=0.1).fit(X, y)
    want = dense.param_change(X[:3])
    assert dense.responder_.solver_plan().pbrf_chord.solver == "exact"
    RESPONSE_CACHE.clear()
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", 100)
    monkeypatch.setattr(policy, "memory_limit", lambda: 16 * dense.model_.n_params ** 2 - 1)
    monkeypatch.setattr(policy, "kernel_verdict", lambda *a: (False, "kept out by the test"))
    cg = PBRFEstimator(FrozenEstimator(net), damping=0.1).fit(X, y)
    got = cg.param_change(X[:3])
    assert cg.responder_.solver_plan().pbrf_chord.solver == "cg"
    assert cg.responder_.last_info["converged"].all()
    assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_a_float32_nets_loss_changes_survive_its_rounding():
    """A removal moves the parameters by O(1/N), and a well-fit row's loss then
    changes by less than float32 rounds the loss itself: the difference of two
    float32 losses is exactly 0. The "loss" measurements of a float32 net are
    evaluated in float64 on its own weights — the float64 copy's numbers, never 0."""
    from sklinfluence.model.functional import FunctionalModel
    from sklinfluence.model.removal import single_removals
    from sklinfluence.response import measure

    X, y = load_digits(return_X_y=True)
    X = (X[:200] / 16).astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetClassifier(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
                              criterion=nn.CrossEntropyLoss, max_epochs=30, lr=0.5,
                              train_split=None, verbose=0).fit(X, y[:200])
    model = FunctionalModel.from_net(net)
    assert model.dtype == torch.float32
    Xt, T = torch.as_tensor(X), torch.as_tensor(y[:200])
    deltas = 1e-9 * torch.randn(3, model.n_params, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64)
    with torch.no_grad():  # what the float32 net alone gives
        naive = torch.stack([model.losses(model.params + d.float(), Xt, T)
                             - model.losses(model.params, Xt, T) for d in deltas])
    assert (naive == 0).float().mean() > 0.5
    exact = model.astype(torch.float64)
    X64 = Xt.to(torch.float64)
    changes = measure.loss_change(model, deltas, Xt, T)
    assert changes.dtype == torch.float64 and bool((changes != 0).all())
    assert torch.equal(changes, measure.loss_change(exact, deltas, X64, T))
    removals = single_removals(Xt[:3], T[:3], np.arange(3))
    own = measure.own_change(model, removals, deltas)
    assert torch.equal(own, measure.own_change(exact, single_removals(X64[:3], T[:3], np.arange(3)),
                                               deltas))
    # a row's loss alone and within the batch: float64 rounding of the losses (~1e-16)
    assert_allclose(changes[[0, 1, 2], [0, 1, 2]].numpy(), own.numpy(), rtol=0, atol=1e-15)
    assert torch.equal(measure.mean_losses(model, deltas, Xt, T),
                       measure.mean_losses(exact, deltas, X64, T))
