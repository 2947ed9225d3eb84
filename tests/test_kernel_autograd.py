"""The kernel form on every architecture: the rows of the parameters outside the
registered layer types (attention, bare ``nn.Parameter`` s, unregistered module
types, layers their capture cannot describe) come from per-sample vector–Jacobian
products (:func:`~sklinfluence.curvature.kernel_rows.remainder_products`) and add to the
captured layers' — checked against a dense Gauss–Newton matrix from ``torch.func``
Jacobians and against ``solver="exact"`` through the estimators, in float64."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from skorch import NeuralNetClassifier
from torch import nn

import sklinfluence
from sklinfluence import InfluenceEstimator
from sklinfluence.curvature import kernel_rows
from sklinfluence.curvature.kernel import GaussNewtonKernel, kernel_verdict
from sklinfluence.curvature.kernel_rows import Remainder, _Materialised, kernel_blocks
from sklinfluence.curvature.operator import Curvature
from sklinfluence.exceptions import NotEnoughMemoryError, UnsupportedLayerError
from sklinfluence.solvers import make_solver
from sklinfluence.zoo import load_zoo_data, make_zoo_net
from test_kfac import _dense_ggn, _model, _targets
from tolerances import CLOSED_FORM_RTOL

LAMBDA = 1e-2


class Scale(nn.Module):
    """Multiplies by a trainable vector: a module type outside the registry."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(n))

    def forward(self, x):
        return x * self.scale


class Bare(nn.Module):
    """Only bare parameters: ``tanh(x W + b) V``; no registered layer at all."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.randn(5, 6))
        self.b = nn.Parameter(0.1 * torch.randn(6))
        self.V = nn.Parameter(0.5 * torch.randn(6, 3))

    def forward(self, x):
        return torch.tanh(x @ self.W + self.b) @ self.V


class Mixed(nn.Module):
    """Linear → Scale → tanh → MultiheadAttention over 2 tokens → a bare positional
    parameter → Linear: registered Linear layers around unregistered parameters (the
    attention's ``out_proj`` is a Linear that the attention calls without its forward,
    so the capture check sends it to autograd too)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.scale = Scale(8)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.position = nn.Parameter(0.1 * torch.randn(2, 4))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.scale(self.inp(x))).reshape(-1, 2, 4) + self.position
        return self.out(self.attn(h, h, h)[0].flatten(1))


class Refused(nn.Module):
    """Registered layer types used in ways their captures cannot describe: a Linear
    applied twice, a weight also used outside its call, a trainable bias on a
    frozen weight, two Linear layers with one weight (tied), an unregistered
    Conv1d — all autograd's, beside a captured head."""

    def __init__(self):
        super().__init__()
        self.twice = nn.Linear(5, 5)
        self.outside = nn.Linear(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.tied_a, self.tied_b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4)
        self.tied_b.weight = self.tied_a.weight
        self.conv = nn.Conv1d(1, 2, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.twice(torch.tanh(self.twice(x))))
        h = torch.tanh(self.outside(h)) + 0.1 * self.outside.weight.sum()
        h = torch.tanh(self.frozen(h))
        h = torch.tanh(self.tied_b(torch.tanh(self.tied_a(h))))
        h = torch.tanh(self.conv(h[:, None, :])).flatten(1)  # (N, 2 · 3)
        return self.head(h)


#: Each net, the parameters its kernel takes from autograd, and those it takes from
#: autograd unless a layer type for them is registered (attention).
NETS = {
    "bare": (Bare, ["W", "b", "V"], []),
    "mixed": (Mixed, ["scale.scale", "position"],
              ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
               "attn.out_proj.bias"]),
    "refused": (Refused, ["twice.weight", "twice.bias", "outside.weight", "outside.bias",
                          "frozen.bias", "tied_a.weight", "tied_b.bias", "conv.weight",
                          "conv.bias"], []),
}


def _setup(name, criterion="CrossEntropyLoss", n=11):
    torch.manual_seed(0)
    module = NETS[name][0]()
    model = _model(module, criterion)
    X = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, X, _targets(model, X, criterion)


def _reference_solve(model, X, T, B):
    A = _dense_ggn(model, X, T) + LAMBDA * torch.eye(model.n_params, dtype=torch.float64)
    return torch.linalg.solve(A, B.T).T


def _rhs(model, k=5):
    return torch.randn(k, model.n_params, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("criterion", ["CrossEntropyLoss", "MSELoss"])
@pytest.mark.parametrize("name", list(NETS))
def test_kernel_with_autograd_rows_equals_the_dense_solve(name, criterion):
    """Captured layers plus autograd rows (chunked captures, batch_size 4: the two
    blocks must share each batch's output-Hessian roots) give the dense solve to
    rounding, and the remainder holds exactly the parameters no capture describes."""
    model, X, T = _setup(name, criterion)
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA, batch_size=4)
    _, must, may = NETS[name]
    names = kernel.remainder.names
    assert set(must) <= set(names) <= set(must) | set(may)
    n_rest = sum(n for p, n in zip(model.param_names, model.param_numels) if p in names)
    assert kernel.info["autograd_params"] == kernel.remainder.n_cols == n_rest
    assert isinstance(kernel.parts[-1], _Materialised) and kernel.parts[-1].layer is \
        kernel.remainder
    covered = {p for layer in kernel.layers for p in model.param_names
               if p.startswith(layer.name + ".")}
    assert covered.isdisjoint(names) and len(covered) + len(names) == len(model.param_names)
    B = _rhs(model)
    expected = _reference_solve(model, X, T, B)
    assert_allclose(kernel.solve(B).numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))


def test_autograd_rows_follow_the_capture_passes_own_batches(monkeypatch):
    """Without a batch_size the capture passes size their batches themselves (here
    30 rows: 30, 30, 30, 10); the autograd rows are computed on the same batches,
    with the same roots — the dense solve and gradients again."""
    from sklinfluence.curvature import capture

    from sklinfluence.curvature import kernel as kernel_module

    monkeypatch.setattr(capture, "capture_rows", lambda *args: 30)
    sizes, products = [], kernel_module.remainder_products

    def recorded(model, theta, block, X, cotangents):
        sizes.append(len(X))
        return products(model, theta, block, X, cotangents)

    monkeypatch.setattr(kernel_module, "remainder_products", recorded)
    model, X, T = _setup("mixed", n=100)
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    assert sizes == [30, 30, 30, 10]
    B = _rhs(model)
    expected = _reference_solve(model, X, T, B)
    assert_allclose(kernel.solve(B).numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))
    grads = model.per_sample_grads(model.params, X[:70], T[:70])
    expected = kernel._rows_times(grads * kernel.scale)
    got = kernel.gradient_rows(model, model.params, X[:70], T[:70])
    assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))


def test_gradient_rows_include_the_remainders_part():
    """``gradient_rows`` (captures plus autograd) is ``Ũ D^{-1/2} ∇L_e`` from the
    samples' full gradients, on samples outside the training set, in batches."""
    model, X, T = _setup("mixed")
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    Xe = X[:6] + 0.5
    Te = _targets(model, Xe, "CrossEntropyLoss", seed=4)
    grads = model.per_sample_grads(model.params, Xe, Te)
    expected = kernel._rows_times(grads * kernel.scale)
    got = kernel.gradient_rows(model, model.params, Xe, Te, batch_size=4)
    assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))


def test_remainder_rows_are_the_same_in_chunks(monkeypatch):
    """The autograd rows streamed two samples at a time are the rows computed at once."""
    model, X, T = _setup("bare")
    whole = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    monkeypatch.setattr(kernel_rows, "chunk_rows", lambda *args: 2)
    chunked = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    assert whole.layers == [] and whole.remainder.n_cols == model.n_params
    scale = float(whole.parts[0].rows.abs().max())
    torch.testing.assert_close(chunked.parts[0].rows, whole.parts[0].rows, rtol=0,
                               atol=1e-14 * scale)  # other BLAS blockings: rounding only


def test_the_blocks_of_a_registered_net_have_no_remainder():
    """A net of registered layers only: the blocks are the registry's layers and
    the kernel takes nothing from autograd."""
    torch.manual_seed(0)
    model = _model(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    layers, remainder = kernel_blocks(model)
    assert [layer.name for layer in layers] == ["0", "2"] and remainder is None
    layers, remainder = kernel_blocks(model, frozenset({"2"}))
    assert [layer.name for layer in layers] == ["0"] and isinstance(remainder, Remainder)
    assert remainder.names == ("2.weight", "2.bias")
    assert remainder.index.tolist() == list(range(36, 57))
    V = torch.arange(57, dtype=torch.float64)[None]
    assert remainder.to_matrices(V).shape == (1, 1, 21)
    remainder.put(V, torch.zeros(1, 1, 21, dtype=torch.float64))
    assert V[0, 36:].abs().sum() == 0 and V[0, :36].tolist() == list(range(36))


def test_mixed_precision_with_autograd_rows_meets_tol():
    """A float32 kernel and factor refined in float64 reach the requested residual
    on a net with autograd rows, and the dense solve to that accuracy."""
    model, X, T = _setup("mixed")
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA,
                               mixed_precision=True)
    B = _rhs(model)
    got = kernel.solve(B, tol=1e-11)
    assert kernel.last_residual is not None and kernel.last_residual <= 1e-11
    expected = _reference_solve(model, X, T, B)
    assert_allclose(got.numpy(), expected.numpy(), rtol=1e-8,
                    atol=1e-10 * float(expected.abs().max()))


# ------------------------------------------------------------------ refusals
def test_a_kernel_with_autograd_rows_that_does_not_fit_is_refused_naming_them():
    """The memory check counts the autograd rows; the refusal names the kernel
    solver and its sizes, and no EK-FAC."""
    model, X, T = _setup("mixed")
    _, remainder = kernel_blocks(model)
    n = len(X) * 2  # K' = 3 - 1 root columns
    rows_only = 16 * n ** 2 + 8 * n * 100  # the kernel fits, the autograd rows do not
    with sklinfluence.config_context(memory_limit_bytes=rows_only):
        with pytest.raises(NotEnoughMemoryError) as error:
            GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
        applies, why = kernel_verdict(model, X, LAMBDA)
    message = str(error.value)
    assert "solver='kernel'" in message and "Nothing was allocated" in message
    assert "outside registered layers" in message and f"{n:,} kernel rows" in message
    assert "solver='cg'" in message and "ekfac" not in message.lower()
    assert "ek-fac" not in message.lower() and "kfac" not in message.lower()
    assert not applies and why.startswith("solver='kernel' needs")
    assert f"{remainder.n_cols:,} of them outside registered layers" in why


def test_auto_finds_the_kernel_eligible_with_autograd_rows():
    model, X, _ = _setup("mixed")
    applies, why = kernel_verdict(model, X, LAMBDA)
    assert applies and "outside registered layers come from autograd" in why


def test_the_kronecker_solvers_still_refuse_unregistered_parameters():
    """EK-FAC and K-FAC need every parameter in a registered layer; the kernel solver
    does not."""
    model, X, T = _setup("mixed")
    curvature = Curvature(model, X, T, damping=LAMBDA)
    for solver in ("ekfac", "kfac"):
        with pytest.raises(UnsupportedLayerError, match=r"scale \(Scale\)"):
            make_solver(solver, curvature)
    assert make_solver("kernel", curvature).info["autograd_params"] > 0


# ------------------------------------------------------------ through the estimators
def _assert_estimators_agree(make_net, X, y):
    """``solver="kernel"`` against ``solver="exact"``: self-influence and the
    influence matrix of training rows (gradient-free removals), of rows outside the
    training set (removals with forces) and of a group."""
    exact = InfluenceEstimator(make_net(), damping=LAMBDA, solver="exact",
                               random_state=0).fit(X, y)
    kernel = InfluenceEstimator(make_net(), damping=LAMBDA, solver="kernel",
                                random_state=0).fit(X, y)
    assert kernel.diagnostics_["solver"] == "kernel"
    assert kernel.diagnostics_["autograd_params"] > 0
    outside = X[:4] + 0.25
    for Xr, yr in ((X[:6], y[:6]), (outside, y[:4])):
        a, b = exact.score_samples(Xr, yr), kernel.score_samples(Xr, yr)
        assert_allclose(b, a, rtol=CLOSED_FORM_RTOL)
        a = exact.loss_change(Xr, yr, X[6:11], y[6:11])
        b = kernel.loss_change(Xr, yr, X[6:11], y[6:11])
        assert_allclose(b, a, rtol=CLOSED_FORM_RTOL, atol=1e-12 * np.abs(a).max())
    groups = [0, 0, 1, 1, 1, 2]
    a = exact.score_samples(X[:6], y[:6], groups=groups)
    assert_allclose(kernel.score_samples(X[:6], y[:6], groups=groups), a,
                    rtol=CLOSED_FORM_RTOL)


def test_the_zoo_transformer_kernel_equals_exact():
    """The zoo's transformer (MultiheadAttention, a positional parameter; 826
    parameters at width 8), 30 digits: 270 kernel rows."""
    X, y = load_zoo_data("transformer", n_samples=30, dtype="float64")
    _assert_estimators_agree(lambda: make_zoo_net(
        "transformer", max_epochs=3, dtype="float64", random_state=0, module__width=8), X, y)


class MixedClassifier(nn.Module):
    """Linear → Scale (unregistered) → tanh → Linear, float64."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), Scale(8), nn.Tanh(), nn.Linear(8, 3))
        self.double()

    def forward(self, x):
        return self.net(x)


def test_a_mixed_skorch_net_kernel_equals_exact():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 5))
    y = ((X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)).astype(np.int64)
    _assert_estimators_agree(lambda: NeuralNetClassifier(
        MixedClassifier, criterion=nn.CrossEntropyLoss, max_epochs=10, lr=0.1,
        optimizer__weight_decay=1e-3, train_split=None, verbose=0), X, y)
