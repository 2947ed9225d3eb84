"""The kernel (Woodbury) form of the exact damped Gauss–Newton inverse
(:mod:`sklinfluence.curvature.kernel`, ``solver="kernel"``): equal to the dense solve on every
registered layer type, in both of its per-layer forms, for losses with and without a
vanishing root column; refused before allocating where it does not fit; and what
``"auto"``, the Decomposer's exact rung and the PBRF's shared factor use above
``EXACT_MAX_PARAMS`` when the data are smaller than the net."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import nn

import sklinfluence
from sklinfluence import Decomposer, InfluenceEstimator
from sklinfluence.solvers import policy
from sklinfluence.response.cache import RESPONSE_CACHE
from sklinfluence.curvature.operator import Curvature
from sklinfluence.curvature.kernel import GaussNewtonKernel, _Factored, _Materialised
from sklinfluence.exceptions import UnsupportedLayerError
from sklinfluence.exceptions import NotEnoughMemoryError
from sklinfluence.solvers import KernelSolver, make_solver
from test_kfac import _cnn, _dense_ggn, _model, _targets, _token_net
from test_architectures import LAMBDA as ARCH_LAMBDA, _net
from tolerances import CLOSED_FORM_RTOL

LAMBDA = 1e-2  # the damping throughout (the architecture nets add their decay)


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)), \
        torch.randn(9, 5, dtype=torch.float64)


NETS = {"cnn_batchnorm": lambda: _cnn("batch"), "cnn_groupnorm": lambda: _cnn("group"),
        "tokens_layernorm": _token_net, "mlp": _mlp}


def _reference_solve(model, X, T, B):
    A = _dense_ggn(model, X, T) + LAMBDA * torch.eye(model.n_params, dtype=torch.float64)
    return torch.linalg.solve(A, B.T).T


def _assert_solves(kernel, model, X, T, B):
    expected = _reference_solve(model, X, T, B)
    assert_allclose(kernel.solve(B).numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("criterion", ["MSELoss", "CrossEntropyLoss"])
@pytest.mark.parametrize("name", list(NETS))
def test_kernel_solve_equals_the_dense_solve(name, criterion):
    """Every registered layer type, chunked captures (batch_size 7), float64: the
    Woodbury solve is the dense one to rounding. The cross-entropy's Hessian is
    blind to a shift of all logits: one root column fewer per sample."""
    module, X = NETS[name]()
    model = _model(module, criterion)
    T = _targets(model, X, criterion)
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA, batch_size=7)
    n_out = model.forward(model.params, X[:1]).shape[1]
    K = n_out - 1 if criterion == "CrossEntropyLoss" else n_out
    assert kernel.info["root_columns"] == K and kernel.n_rows == len(X) * K
    B = torch.randn(6, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    _assert_solves(kernel, model, X, T, B)


def test_linear_layers_are_factored_unless_their_decay_varies_down_a_column():
    """A Linear layer on one row per sample keeps ``g ⊗ ã`` (never formed); one whose
    weight decay differs between entries of a column of ``[W | b]`` is materialised —
    and both give the dense answer."""
    module, X = _mlp()
    model = _model(module, "CrossEntropyLoss")
    T = _targets(model, X, "CrossEntropyLoss")
    even = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    assert [type(p) for p in even.parts] == [_Factored, _Factored]
    # a decay per column (weight vs bias) stays factored; one varying down a column does not
    B = torch.randn(4, model.n_params, dtype=torch.float64)
    model.weight_decay[35:42] = 0.05  # first layer's bias (7 · 5 weights before it)
    by_column = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    assert [type(p) for p in by_column.parts] == [_Factored, _Factored]
    _assert_solves(by_column, model, X, T, B)
    model.weight_decay[:3] = 0.02  # three weights of the first row only
    uneven = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)
    assert [type(p) for p in uneven.parts] == [_Materialised, _Factored]
    _assert_solves(uneven, model, X, T, B)


def test_a_kernel_that_does_not_fit_is_refused_before_allocating():
    module, X = _cnn("batch")
    model = _model(module, "MSELoss")
    T = _targets(model, X)
    with sklinfluence.config_context(memory_limit_bytes=10_000):
        with pytest.raises(NotEnoughMemoryError, match="kernel rows.*Nothing was allocated"):
            GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA)


def test_the_kernel_solver_refuses_what_it_cannot_invert():
    module, X = _mlp()
    model = _model(module, "MSELoss", mu=0.0)
    T = _targets(model, X)
    with pytest.raises(ValueError, match="damping"):
        make_solver("kernel", Curvature(model, X, T, damping=0.0))
    with pytest.raises(ValueError, match="hessian"):
        make_solver("kernel", Curvature(model, X, T, kind="hessian", damping=1.0))
    # what the registry refuses, the kernel takes from autograd (test_kernel_autograd.py)
    conv1d = _model(nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 2), nn.Flatten()))
    curvature = Curvature(conv1d, X, torch.zeros(9, 8, dtype=torch.float64), damping=1.0)
    with pytest.raises(UnsupportedLayerError, match="Conv1d"):
        make_solver("ekfac", curvature)
    assert make_solver("kernel", curvature).info["autograd_params"] == conv1d.n_params
    half_frozen = nn.Sequential(nn.Linear(5, 3))
    half_frozen[0].weight.requires_grad_(False)  # a trainable bias on a frozen weight
    model = _model(half_frozen, "MSELoss")
    curvature = Curvature(model, X, _targets(model, X), damping=1.0)
    with pytest.raises(UnsupportedLayerError, match="solver='ekfac' or 'kfac' handles"):
        make_solver("ekfac", curvature)
    assert make_solver("kernel", curvature).info["autograd_params"] == 3


# ------------------------------------------------------- through the estimators
@pytest.fixture(scope="module")
def tanh_cnn():
    """The architecture matrix's CNN (157 parameters, smooth) on 48 digits of 3
    classes: 48 × 2 = 96 kernel rows."""
    from test_architectures import _digits as three_digits
    X, y = three_digits()
    return _net("cnn"), X, y


def test_auto_above_the_threshold_is_the_kernel_and_equals_exact(tanh_cnn, monkeypatch):
    """With ``EXACT_MAX_PARAMS`` lowered below the net's size, ``"auto"`` is the kernel
    form and gives the exact solver's matrix to rounding."""
    net, X, y = tanh_cnn
    exact = InfluenceEstimator(net, damping=ARCH_LAMBDA, solver="exact", random_state=0).fit(X, y)
    expected = exact.loss_change(X, y, X[:7], y[:7])
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", exact.model_.n_params - 1)
    monkeypatch.setattr(policy, "memory_limit", lambda: 16 * exact.model_.n_params ** 2 - 1)
    auto = InfluenceEstimator(net, damping=ARCH_LAMBDA, random_state=0).fit(X, y)
    assert auto.diagnostics_["solver"] == "kernel" and isinstance(auto.solver_, KernelSolver)
    assert auto.diagnostics_["kernel_rows"] == len(X) * 2
    assert_allclose(auto.loss_change(X, y, X[:7], y[:7]), expected, rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * np.abs(expected).max())


def test_decomposer_uses_the_kernel_for_rung_4_and_the_pbrf_factor(tanh_cnn, monkeypatch):
    """Above ``EXACT_MAX_PARAMS`` the Decomposer's exact rung and the batched PBRF's
    shared chord factor are one kernel factorisation, and both rungs equal the dense
    route's."""
    net, X, y = tanh_cnn
    RESPONSE_CACHE.clear()
    dense = Decomposer(net, damping=ARCH_LAMBDA, random_state=0, pbrf_tol=1e-10).fit(X, y)
    rows = X[:3], y[:3]
    expected = dense.rung_responses(*rows)
    RESPONSE_CACHE.clear()
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", dense.model_.n_params - 1)
    monkeypatch.setattr(policy, "memory_limit", lambda: 16 * dense.model_.n_params ** 2 - 1)
    built = []
    original = KernelSolver.__init__
    monkeypatch.setattr(KernelSolver, "__init__", lambda self, *a, **k: (
        built.append(1), original(self, *a, **k))[1])
    dec = Decomposer(net, damping=ARCH_LAMBDA, random_state=0, pbrf_tol=1e-10).fit(X, y)
    got = dec.rung_responses(*rows)
    assert len(built) == 1
    for rung in ("exact_influence", "pbrf"):
        scale = float(np.abs(expected[rung]).max())
        assert_allclose(got[rung], expected[rung], rtol=1e-8, atol=1e-10 * scale)


# ------------------------------------------------------------ mixed precision
def test_mixed_precision_refines_to_tol_and_reports_its_residual():
    """float32 kernel and factor, float64 refinement: to ``tol=1e-12`` the dense solve
    to rounding after at least one round; at a loose ``tol`` no round, and the
    measured residual (checked against the dense matrix) below it."""
    module, X = NETS["cnn_batchnorm"]()
    model = _model(module, "CrossEntropyLoss")
    T = _targets(model, X, "CrossEntropyLoss")
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=LAMBDA, mixed_precision=True)
    assert kernel.factor.dtype == torch.float32 and kernel.info["precision"] == "float32"
    B = torch.randn(5, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    expected = _reference_solve(model, X, T, B)
    tight = kernel.solve(B, tol=1e-12)
    assert kernel.last_rounds >= 1 and kernel.last_residual <= 1e-12
    assert_allclose(tight.numpy(), expected.numpy(), rtol=1e-9,
                    atol=1e-11 * float(expected.abs().max()))
    loose = kernel.solve(B, tol=1e-2)
    assert kernel.last_rounds == 0 and kernel.last_residual <= 1e-2
    A = _dense_ggn(model, X, T) + LAMBDA * torch.eye(model.n_params, dtype=torch.float64)
    residual = ((B - loose @ A).norm(dim=1) / B.norm(dim=1)).max()
    assert float(residual) == pytest.approx(kernel.last_residual, rel=1e-6)
    assert 0 < float(residual) <= 1e-2  # float32 alone: not exact


def test_mixed_precision_switches_to_float64_where_float32_is_too_coarse():
    """Damping 1e-6 (a kernel norm ~1e6): float32 refinement stalls above
    ``tol=1e-10``, so the kernel is rebuilt in float64 (``info['fallback']`` says
    why) and the answer is the dense solve's."""
    module, X = _mlp()
    model = _model(module, "MSELoss", mu=0.0)
    T = _targets(model, X)
    damping = 1e-6
    kernel = GaussNewtonKernel(model, model.params, X, T, damping=damping, mixed_precision=True)
    B = torch.randn(3, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    got = kernel.solve(B, tol=1e-10)
    assert kernel.info["precision"] == "float64" and "refinement round" in kernel.info["fallback"]
    assert kernel.factor.dtype == torch.float64
    A = _dense_ggn(model, X, T) + damping * torch.eye(model.n_params, dtype=torch.float64)
    expected = torch.linalg.solve(A, B.T).T
    assert_allclose(got.numpy(), expected.numpy(), rtol=1e-8,
                    atol=1e-10 * float(expected.abs().max()))


def test_the_mixed_kernel_solver_records_its_refinement(tanh_cnn):
    """``solver_params={"mixed_precision": True}``: the estimator's diagnostics carry the
    measured residual and rounds; the matrix equals the float64 kernel's (measured
    2.5e-13 of its largest entry at tol 1e-11)."""
    net, X, y = tanh_cnn
    exact = InfluenceEstimator(net, damping=ARCH_LAMBDA, solver="kernel", random_state=0).fit(X, y)
    expected = exact.loss_change(X, y, X[:7], y[:7])
    mixed = InfluenceEstimator(net, damping=ARCH_LAMBDA, solver="kernel", tol=1e-11,
                               solver_params={"mixed_precision": True},
                               random_state=0).fit(X, y)
    got = mixed.loss_change(X, y, X[:7], y[:7])
    assert mixed.diagnostics_["precision"] == "float32"
    solve = mixed.solver_.last_solve
    assert solve.converged and solve.max_relative_residual <= 1e-11 and solve.n_measured == 7
    assert_allclose(got, expected, rtol=CLOSED_FORM_RTOL, atol=1e-11 * np.abs(expected).max())


# -------------------------------------------- influence without the training gradients
def _removals_mixture(X, T, n_out):
    """Single rows, a group, a row outside the training set and a training row
    under another target: the last two need their gradients."""
    from sklinfluence.model.removal import Removal
    single = [Removal(X[i:i + 1], T[i:i + 1], (i,)) for i in range(4)]
    group = Removal(X[4:7], T[4:7], (4, 5, 6))
    outside = Removal(X[7:8] + 0.3, T[7:8], (-1,))
    other = (T[7:8] + 1) % n_out if T.dtype == torch.long else T[7:8] + 1
    relabelled = Removal(X[7:8], other, (7,))
    return single + [group, outside, relabelled]


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("criterion", ["MSELoss", "CrossEntropyLoss"])
@pytest.mark.parametrize("name", ["cnn_batchnorm", "tokens_layernorm", "mlp"])
def test_removal_products_equal_forces_times_the_solve(name, criterion, mixed):
    """``g_sᵀ (G + D)⁻¹ b_e`` from the kernel's coefficients and the samples' captures
    equals the forces times the dense solve — single rows, a group, rows that
    take the gradient route — to rounding (mixed precision refined to tol 1e-12:
    at worst 2e-13 of the largest entry measured)."""
    from sklinfluence.response.rungs import removal_forces
    module, X = NETS[name]()
    model = _model(module, criterion)
    T = _targets(model, X, criterion)
    solver = make_solver("kernel", Curvature(model, X, T, damping=LAMBDA), tol=1e-12,
                         solver_params={"mixed_precision": mixed})
    Xe, Te = X[:6] * 0.7, T[2:8]
    B = model.per_sample_grads(model.params, Xe, Te)
    removals = _removals_mixture(X, T, int(model.forward(model.params, X[:1]).shape[1]))
    forces = removal_forces(model, removals)
    expected = forces @ _reference_solve(model, X, T, B).T
    requested = []

    def forces(some):
        requested.append(len(some))
        return removal_forces(model, some)

    got = solver.removal_products(B, Xe, Te, removals, forces)
    assert requested == [2]  # only the outside and the relabelled rows
    assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(expected.abs().max()))
    W = solver._kernel.gradient_rows(model, model.params, Xe, Te)
    assert_allclose(W.numpy(), solver._kernel._rows_times(B * solver._kernel.scale).numpy(),
                    rtol=1e-10, atol=1e-13 * float(W.abs().max()))


def test_a_saturated_training_row_takes_the_gradient_route():
    """A softmax with a class at probability 0 (logits 10⁴ apart) has no Hessian along
    that class: its gradient is outside its kernel rows' span, so it is computed, and
    the products still equal the dense route's."""
    from sklinfluence.response.rungs import removal_forces
    from sklinfluence.model.removal import single_removals
    torch.manual_seed(0)
    model = _model(nn.Linear(5, 3), "CrossEntropyLoss")
    X = torch.randn(6, 5, dtype=torch.float64)
    X[2] *= 1e4
    T = torch.tensor([0, 1, 2, 0, 1, 2])
    T[2] = int(model.forward(model.params, X[2:3]).argmin())  # confidently wrong
    solver = make_solver("kernel", Curvature(model, X, T, damping=LAMBDA))
    _, eligible = solver._kernel.coefficients(model, model.params, X, T)
    assert eligible.tolist() == [True, True, False, True, True, True]
    B = model.per_sample_grads(model.params, X[:2], T[:2])
    removals = single_removals(X, T, tuple(range(6)))
    got = solver.removal_products(B, X[:2], T[:2], removals,
                                  lambda rs: removal_forces(model, rs))
    expected = removal_forces(model, removals) @ _reference_solve(model, X, T, B).T
    assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9,
                    atol=1e-12 * float(expected.abs().max()))
