"""Every solver against the exact damped solve, at the tolerance each can reach.

CG (every preconditioner, any block size), LiSSA and full-rank Arnoldi are
exact up to their stopping rule; EK-FAC is exact where its Kronecker
factorisation is (one linear layer, one output, squared loss) and otherwise
checked against its defining property. Chunking never changes an answer.
"""

import re

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier, NeuralNetRegressor

from linear_problems import recipe, well_conditioned_data
from nets import make_net, mlp, toy_data
import sklinfluence
from sklinfluence import InfluenceEstimator
from sklinfluence.curvature.operator import Curvature
from sklinfluence.curvature.kfac import KroneckerFactors
from sklinfluence.curvature.lowrank import top_eigenpairs
from sklinfluence import solvers
from sklinfluence.exceptions import LissaDivergenceError
from sklinfluence.solvers import policy
from sklinfluence.solvers import (EXACT_MAX_PARAMS, ArnoldiSolver, CGSolver,
                                  LissaSolver, make_solver,
                                  resolve_solver)
from tolerances import (ARNOLDI_EIGSH_TOL, ARNOLDI_VS_CLOSED_FORM_RTOL, CG_VS_EXACT_RTOL,
                        CLOSED_FORM_RTOL, INVARIANCE_RTOL, SOLVE_RESIDUAL_PER_CONDITION)

#: (solver, solver_params, tol) that are exact up to ``tol``.
EXACT_UP_TO_TOL = [
    ("cg", {}, 1e-13),
    ("cg", {"block_size": 3}, 1e-13),
    ("cg", {"mixed_precision": True}, 1e-12),
    ("cg", {"preconditioner": "ekfac"}, 1e-13),
    ("cg", {"preconditioner": "kfac"}, 1e-13),
    ("cg", {"preconditioner": "arnoldi", "rank": 8}, 1e-13),
    # LiSSA's float64 series stalls at its rounding floor: 1.000e-13 after 20,000
    # iterations on one right-hand side (a warning the suite used to let pass)
    ("lissa", {}, 3e-13),
    ("arnoldi", {"rank": 10_000}, 1e-13),  # capped at P below: full rank is exact
]


@pytest.fixture(scope="module", params=["MSELoss", "CrossEntropyLoss"])
def trained(request):
    kind = request.param
    X, y = toy_data(kind, n=60)
    torch.manual_seed(0)  # the same net whatever ran before (LiSSA's 1e-13 is near its reach)
    net = make_net(kind, X.shape[1], hidden=8, max_epochs=30).fit(X, y)
    return net, X, y


def influence(net, X, y, **kwargs):
    return InfluenceEstimator(FrozenEstimator(net), damping=0.3, **kwargs).fit(X, y)


@pytest.mark.parametrize("solver, params, tol", EXACT_UP_TO_TOL,
                         ids=[f"{s}-{sorted(p)}" for s, p, _ in EXACT_UP_TO_TOL])
def test_solver_matches_the_exact_influence(trained, solver, params, tol):
    net, X, y = trained
    exact = influence(net, X, y, solver="exact")
    if solver == "arnoldi":
        params = {"rank": exact.model_.n_params}
    est = influence(net, X, y, solver=solver, solver_params=params, tol=tol, max_iter=20_000)
    ref = exact.loss_change(X, y, X[:7], y[:7])
    got = est.loss_change(X, y, X[:7], y[:7])
    assert_allclose(got, ref, rtol=CG_VS_EXACT_RTOL, atol=CG_VS_EXACT_RTOL * np.abs(ref).max())
    assert_allclose(est.score_samples(X[:9]), exact.score_samples(X[:9]), rtol=CG_VS_EXACT_RTOL)
    if solver in ("cg", "lissa"):
        assert est.diagnostics_["converged"]
        assert est.diagnostics_["max_relative_residual"] <= tol


def test_block_cg_needs_fewer_iterations_than_one_column_at_a_time(trained):
    net, X, y = trained
    whole = influence(net, X, y, solver="cg", tol=1e-10)
    columns = influence(net, X, y, solver="cg", solver_params={"block_size": 1}, tol=1e-10)
    assert_allclose(whole.score_samples(X), columns.score_samples(X), rtol=CG_VS_EXACT_RTOL)
    assert whole.diagnostics_["n_iter"] < columns.diagnostics_["n_iter"]


def test_chunked_and_unchunked_influence_are_identical(trained):
    net, X, y = trained
    whole = influence(net, X, y)
    chunked = influence(net, X, y, batch_size=7)
    def matrices(est):  # both shapes: fewer eval points than removed samples, and more
        return est.loss_change(X, y, X[:5], y[:5]), est.loss_change(X[:4], y[:4], X, y)

    for a, b in zip(matrices(whole), matrices(chunked)):
        assert_allclose(b, a, rtol=INVARIANCE_RTOL, atol=INVARIANCE_RTOL * np.abs(a).max())
    assert_allclose(chunked.score_samples(X), whole.score_samples(X), rtol=INVARIANCE_RTOL)


def test_without_a_batch_size_the_streamed_side_is_bounded_in_bytes(trained, monkeypatch):
    """``batch_size=None`` streams the larger side of an influence matrix in chunks of
    at most ``working_memory_bytes`` of gradients (here lowered to 3 rows' worth); the
    answer is the one computed all at once."""
    net, X, y = trained
    whole = influence(net, X, y, batch_size=len(X))
    reference = whole.loss_change(X, y, X[:5], y[:5]), whole.loss_change(X[:4], y[:4], X, y)
    est = influence(net, X, y)
    sizes = []
    for name in ("_grads", "_forces"):
        original = getattr(est, name)
        monkeypatch.setattr(est, name, lambda *a, _o=original: (
            sizes.append(len(a[0])), _o(*a))[1])
    with sklinfluence.config_context(working_memory_bytes=3 * 8 * est.model_.n_params):
        got = est.loss_change(X, y, X[:5], y[:5]), est.loss_change(X[:4], y[:4], X, y)
    for a, b in zip(reference, got):
        assert_allclose(b, a, rtol=INVARIANCE_RTOL, atol=INVARIANCE_RTOL * np.abs(a).max())
    # the solved sides (5 points, 4 removals) whole, the streamed sides 3 rows at a time
    n_chunks = -(-len(X) // 3)
    assert sizes[0] == 5 and sizes[1 + n_chunks] == 4 and len(sizes) == 2 + 2 * n_chunks
    assert max(sizes[1:1 + n_chunks] + sizes[2 + n_chunks:]) == 3


# ---------------------------------------------------------------- LiSSA
@pytest.fixture(scope="module")
def linear_curvature():
    X, y = well_conditioned_data(n=30, d=3)
    net = recipe(X, mu=0.1, max_epochs=50).fit(X, y.reshape(-1, 1))
    est = InfluenceEstimator(FrozenEstimator(net), damping=0.05).fit(X, y)
    return Curvature(est.model_, est.X_train_, est.T_train_, damping=0.05)


@pytest.mark.parametrize("scale", [None, 3.0])
def test_lissa_after_T_steps_equals_its_closed_form(linear_curvature, scale):
    """x_T = A⁻¹[I − (I − A/σ)^{T+1}] b, for a fixed depth T."""
    C = linear_curvature
    A = C.dense()
    B = torch.randn(5, C.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for depth in (1, 4, 25):
        solver = LissaSolver(C, tol=0.0, max_iter=depth, scale=scale)
        sigma = solver.scale
        if scale is None:  # 1.05 × the top eigenvalue
            assert sigma == pytest.approx(1.05 * float(torch.linalg.eigvalsh(A)[-1]), rel=1e-6)
        with pytest.warns(ConvergenceWarning, match="LiSSA stopped at max_iter"):
            got = solver.solve(B)
        step = torch.eye(C.n_params, dtype=torch.float64) - A / sigma
        expected = torch.linalg.solve(
            A, (torch.eye(C.n_params, dtype=torch.float64)
                - torch.linalg.matrix_power(step, depth + 1)) @ B.T).T
        assert_allclose(got.numpy(), expected.numpy(), rtol=CLOSED_FORM_RTOL, atol=1e-13)
        assert solver.last_solve.n_iter == depth


def test_lissa_with_too_small_a_scale_raises_and_suggests_one(linear_curvature):
    C = linear_curvature
    top = float(torch.linalg.eigvalsh(C.dense())[-1])
    solver = LissaSolver(C, scale=0.3 * top, max_iter=500)
    B = torch.ones(2, C.n_params, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match=r"LiSSA diverged .* scale ≥ (\S+) ") as err:
        solver.solve(B)
    suggested = float(re.search(r"scale ≥ (\S+) ", str(err.value)).group(1))
    assert suggested > top  # the advice converges: > λ_max/2 with margin
    converged = LissaSolver(C, scale=suggested, max_iter=5000, tol=1e-12).solve(B)
    assert torch.isfinite(converged).all()
    with pytest.raises(ValueError, match="positive number"):
        LissaSolver(C, scale=-1.0)


def test_lissa_through_the_estimator_diverges_loudly_never_nan():
    X, y = well_conditioned_data(n=30, d=3)
    net = recipe(X, mu=0.1, max_epochs=50).fit(X, y.reshape(-1, 1))
    est = InfluenceEstimator(FrozenEstimator(net), solver="lissa",
                             solver_params={"scale": 1e-3}).fit(X, y)
    with pytest.raises(LissaDivergenceError, match="diverged"):
        est.score_samples(X[:3])


# ---------------------------------------------------------------- EK-FAC
def test_ekfac_is_exact_for_one_linear_layer_with_one_output():
    X, y = well_conditioned_data(n=40, d=4)
    net = NeuralNetRegressor(torch.nn.Linear(4, 1, dtype=torch.float64), max_epochs=5, lr=0.05,
                             optimizer__weight_decay=0.02, verbose=0, train_split=None)
    net.fit(X, y.reshape(-1, 1))
    exact = InfluenceEstimator(FrozenEstimator(net), solver="exact").fit(X, y)
    for solver in ("ekfac", "kfac"):
        est = InfluenceEstimator(FrozenEstimator(net), solver=solver).fit(X, y)
        ref = exact.loss_change(X, y, X[:6], y[:6])
        assert_allclose(est.loss_change(X, y, X[:6], y[:6]), ref, rtol=CLOSED_FORM_RTOL,
                        atol=1e-12 * np.abs(ref).max())


def _blocks_in_kronecker_basis(model, factors, dense):
    """Each layer's exact GGN block, rotated into its Kronecker eigenbasis."""
    for b, basis in zip(factors.layers, factors.bases):
        order = [b.weight.start + o * b.d_in + c if c < b.d_in else b.bias.start + o
                 for o in range(b.d_out) for c in range(b.d_in + 1)]
        Q = torch.kron(basis.Q_S, basis.Q_A)
        yield basis, Q.T @ dense[np.ix_(order, order)] @ Q


def test_ekfac_eigenvalues_are_the_exact_diagonal_in_the_kronecker_basis(trained):
    """EK-FAC's defining property, and why it beats K-FAC: its eigenvalues are
    the diagonal of each layer's exact Gauss–Newton block in the Kronecker
    eigenbasis — the closest (Frobenius) approximation with that basis, so
    closer than K-FAC's products of factor eigenvalues."""
    net, X, y = trained
    model = influence(net, X, y).model_
    Xt, Tt = torch.as_tensor(X), influence(net, X, y).T_train_
    dense = Curvature(model, Xt, Tt, damping=0.0).dense()
    ekfac = KroneckerFactors(model, Xt, Tt, damping=0.0)
    kfac = KroneckerFactors(model, Xt, Tt, damping=0.0, corrected=False)
    for (b, rotated), b_k in zip(_blocks_in_kronecker_basis(model, ekfac, dense), kfac.bases):
        diagonal = torch.diagonal(rotated).reshape(b.eigenvalues.shape)
        assert_allclose(b.eigenvalues.numpy(), diagonal.numpy(), rtol=CLOSED_FORM_RTOL,
                        atol=1e-12 * float(diagonal.abs().max()))
        error_ekfac = (rotated - torch.diag(b.eigenvalues.flatten())).norm()
        error_kfac = (rotated - torch.diag(b_k.eigenvalues.flatten())).norm()
        assert error_ekfac < error_kfac


def test_ekfac_refuses_what_it_cannot_factor(trained):
    net, X, y = trained
    with pytest.raises(ValueError, match="approximates the Gauss–Newton matrix"):
        influence(net, X, y, solver="ekfac", curvature="hessian")
    conv = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 4)), torch.nn.Conv1d(1, 2, 3),
                               torch.nn.Flatten(), torch.nn.Linear(4, 1)).double()
    Xr, yr = toy_data("MSELoss", n=20, n_out=1)
    reg = NeuralNetRegressor(conv, max_epochs=1, verbose=0, train_split=None).fit(Xr, yr)
    with pytest.raises(ValueError, match=r"nn.Linear layers only.*'1.weight'.*solver='cg'"):
        InfluenceEstimator(FrozenEstimator(reg), solver="ekfac").fit(Xr, yr)
    auto = InfluenceEstimator(FrozenEstimator(reg)).fit(Xr, yr)  # auto never needs EK-FAC
    assert auto.diagnostics_["solver"] == "exact"


# ---------------------------------------------------------------- Arnoldi, auto
def test_top_eigenpairs_by_lanczos_match_the_dense_ones():
    X, y = toy_data("CrossEntropyLoss", n=50)
    net = make_net("CrossEntropyLoss", X.shape[1], hidden=40, max_epochs=10).fit(X, y)
    est = InfluenceEstimator(FrozenEstimator(net), damping=0.01).fit(X, y)
    C = Curvature(est.model_, est.X_train_, est.T_train_, damping=0.01)
    assert C.n_params > 200  # ARPACK, not the dense fallback
    values, vectors = top_eigenpairs(C, 5, tol=1e-10)
    dense = torch.linalg.eigvalsh(C.dense()).flip(0)[:5]
    assert_allclose(values.numpy(), dense.numpy(), rtol=1e-8)
    residual = C.matmat(vectors) - values[:, None] * vectors
    assert float(residual.norm(dim=1).max()) < 1e-7 * float(values[0])
    approx = make_solver("arnoldi", C, solver_params={"rank": 5})
    assert approx.info["top_eigenvalue"] == pytest.approx(float(dense[0]), rel=1e-6)


def test_auto_is_exact_for_small_nets_kernel_for_small_data_and_cg_above(trained):
    """Dense up to EXACT_MAX_PARAMS; above, the kernel form while ``N·K ≤ P`` (and it
    fits), block CG once the data outgrow the net or the kernel the memory limit."""
    net, X, y = trained
    est = influence(net, X, y)
    assert est.diagnostics_["solver"] == "exact" and est.diagnostics_["requested_solver"] == "auto"
    Xb, yb = toy_data("CrossEntropyLoss", n=8, d=100, n_out=2)
    reg = make_net("CrossEntropyLoss", 100, 2, hidden=60, max_epochs=1).fit(Xb, yb)
    model = InfluenceEstimator(FrozenEstimator(reg), solver="cg", max_iter=1).fit(Xb, yb).model_
    P = model.n_params
    assert P > EXACT_MAX_PARAMS
    small = Curvature(model, torch.as_tensor(Xb), torch.as_tensor(yb), damping=1e-3)
    # float32 kernel refined in float64 at tol ≥ MIXED_PRECISION_MIN_TOL
    assert resolve_solver("auto", small, 1e-6) == ("kernel", {"mixed_precision": True})
    assert resolve_solver("auto", small, 1e-10) == ("kernel", {"mixed_precision": False})
    with sklinfluence.config_context(memory_limit_bytes=16 * (8 * 2) ** 2 - 1):
        assert resolve_solver("auto", small, 1e-6)[0] == "cg"  # the kernel does not fit
    n = P // 2 + 1  # N·K > P: more kernel rows than parameters
    Xl, yl = np.resize(Xb, (n, Xb.shape[1])), np.resize(yb, n)
    C = Curvature(model, torch.as_tensor(Xl), torch.as_tensor(yl), damping=1e-3)
    # the dense solve where it fits (predicted far cheaper than CG here); where it does
    # not, mixed precision where float32 refinement pays (tol ≥ MIXED_PRECISION_MIN_TOL)
    assert resolve_solver("auto", C, 1e-6) == ("exact", {})
    with sklinfluence.config_context(memory_limit_bytes=16 * P ** 2 - 1,
                                     time_budget_seconds=1e9):  # CG is predicted above 600 s
        assert resolve_solver("auto", C, 1e-6) == ("cg", {"mixed_precision": True})
        assert resolve_solver("auto", C, 1e-10) == ("cg", {"mixed_precision": False})
    assert resolve_solver("lissa", C) == ("lissa", {})


def test_unknown_solver_params_are_refused(trained):
    net, X, y = trained
    with pytest.raises(ValueError, match=r"solver_params \['rank'\] are not options of "
                                         r"solver='lissa'; it accepts \['scale'\]"):
        influence(net, X, y, solver="lissa", solver_params={"rank": 3})
    with pytest.raises(ValueError, match="preconditioner"):
        influence(net, X, y, solver="cg", solver_params={"preconditioner": "jacobi"})


# ---------------------------------------------------------------- review findings
def test_mixed_precision_reaches_tol_with_many_blocks_and_ill_conditioning(trained):
    """``max_iter`` caps each block of each round; when float32 stalls (condition
    number ~1e6 here) a last round in float64 finishes: never less accurate."""
    net, X, y = trained
    for damping, params in ((1e-3, {"block_size": 2}), (1e-6, {})):
        kwargs = dict(damping=damping, tol=1e-10)
        exact = InfluenceEstimator(FrozenEstimator(net), **kwargs).fit(X, y)
        est = InfluenceEstimator(FrozenEstimator(net), solver="cg",
                                 solver_params={"mixed_precision": True, **params},
                                 **kwargs).fit(X, y)
        assert_allclose(est.score_samples(X), exact.score_samples(X), rtol=CG_VS_EXACT_RTOL)
        assert est.diagnostics_["converged"]
        assert est.diagnostics_["max_relative_residual"] <= 1e-10


def test_arnoldi_refuses_an_indefinite_hessian():
    X, y = toy_data("MSELoss", n=40)
    net = make_net("MSELoss", X.shape[1], hidden=8, max_epochs=1).fit(X, y)
    for rank in (5, 67):
        with pytest.raises(ValueError, match="non-positive eigenvalue .* not positive definite"):
            InfluenceEstimator(FrozenEstimator(net), solver="arnoldi", curvature="hessian",
                               damping=0.0, weight_decay=1e-3,
                               solver_params={"rank": rank}).fit(X, y)


def test_cg_on_a_float32_net_reports_what_float32_can_reach():
    X, y = toy_data("CrossEntropyLoss", n=60)
    torch.manual_seed(0)
    net = NeuralNetClassifier(mlp(X.shape[1], 3, hidden=8).float(),
                              criterion=torch.nn.CrossEntropyLoss, verbose=0).initialize()
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", damping=0.01).fit(
        X.astype(np.float32), y)
    assert est.model_.dtype == torch.float32
    with pytest.warns(ConvergenceWarning, match="largest relative residual"):
        est.score_samples(X[:5].astype(np.float32))
    assert not est.diagnostics_["converged"]  # tol=1e-10 is beyond float32
    assert est.diagnostics_["max_relative_residual"] > 1e-10


# ---------------------------------------------------------------- Arnoldi below full rank
MU, LAMBDA = 0.05, 0.01  # weight decay well above the damping: μ̄ matters off the top


def _low_rank_closed_form(dense: torch.Tensor, rank: int, rest: float, B: torch.Tensor):
    """``Q diag(1/ν) Qᵀ b + (I − QQᵀ) b / (μ̄ + λ)`` for each row ``b`` of ``B``, from
    the dense eigendecomposition; and the relative gap after the top ``rank``."""
    values, vectors = torch.linalg.eigh(dense)
    values, vectors = values.flip(0), vectors.flip(1)
    nu, Q = values[:rank], vectors[:, :rank]
    coefficients = B @ Q
    expected = (coefficients / nu) @ Q.T + (B - coefficients @ Q.T) / rest
    return expected, float((values[rank - 1] - values[rank]) / values[0])


def test_low_rank_arnoldi_equals_its_closed_form():
    """Top-``rank`` eigenpairs by Lanczos (P > 200: ARPACK, not the dense fallback)
    plus ``1/(μ̄ + λ)`` on the complement, against the same formula from ``eigh``."""
    X, y = toy_data("CrossEntropyLoss", n=50)
    est = InfluenceEstimator(make_net("CrossEntropyLoss", X.shape[1], hidden=40, max_epochs=10),
                             damping=LAMBDA, weight_decay=MU, solver="cg", max_iter=1,
                             random_state=0).fit(X, y)
    C = Curvature(est.model_, est.X_train_, est.T_train_, damping=LAMBDA)
    rank = 10
    assert C.n_params > max(200, 3 * rank)  # the Lanczos path of top_eigenpairs
    B = est.model_.per_sample_grads(est.model_.params, est.X_train_[:6], est.T_train_[:6])
    expected, gap = _low_rank_closed_form(C.dense(), rank, MU + LAMBDA, B)
    assert gap >= 0.05  # the top-rank eigenspace is well defined (ARNOLDI_VS_CLOSED_FORM_RTOL)
    got = ArnoldiSolver(C, rank=rank, tol=ARNOLDI_EIGSH_TOL).solve(B)
    assert_allclose(got.numpy(), expected.numpy(), rtol=ARNOLDI_VS_CLOSED_FORM_RTOL,
                    atol=ARNOLDI_VS_CLOSED_FORM_RTOL * float(expected.abs().max()))


def test_low_rank_arnoldi_through_the_estimator_equals_its_closed_form():
    X, y = toy_data("CrossEntropyLoss", n=40)
    net = make_net("CrossEntropyLoss", X.shape[1], hidden=8, max_epochs=10)
    rank = 4  # of 67: P ≤ 200, top_eigenpairs' dense path
    est = InfluenceEstimator(net, damping=LAMBDA, weight_decay=MU, solver="arnoldi",
                             solver_params={"rank": rank}, random_state=0).fit(X, y)
    model = est.model_
    assert est.diagnostics_["rank"] == rank < model.n_params
    dense = Curvature(model, est.X_train_, est.T_train_, damping=LAMBDA).dense()
    G = model.per_sample_grads(model.params, est.X_train_, est.T_train_)
    solved, gap = _low_rank_closed_form(dense, rank, MU + LAMBDA, G[:9])
    assert gap >= 0.05
    expected = est.epsilon_ * (G[:9] * solved).sum(dim=1)
    assert_allclose(est.score_samples(X[:9], y[:9]), expected.numpy(),
                    rtol=ARNOLDI_VS_CLOSED_FORM_RTOL)
    matrix = est.epsilon_ * (G @ solved[:4].T)  # removing every row, on 4 points
    assert_allclose(est.loss_change(X, y, X[:4], y[:4]), matrix.numpy(),
                    rtol=ARNOLDI_VS_CLOSED_FORM_RTOL,
                    atol=ARNOLDI_VS_CLOSED_FORM_RTOL * float(matrix.abs().max()))


# ---------------------------------------------------------------- above EXACT_MAX_PARAMS
def test_auto_above_the_threshold_is_mixed_precision_cg_and_equals_exact(trained, monkeypatch):
    """``"auto"`` above :data:`EXACT_MAX_PARAMS` (lowered below this net's size: the
    knob ``plan_solvers`` reads at call time) at a ``tol`` of at least
    ``MIXED_PRECISION_MIN_TOL`` is float32-product block CG refined in
    float64 to ``tol``, and its answers are the exact ones to what the residuals
    allow: a solve with relative residual ``r`` errs by ``‖x − x*‖ ≤ r ‖g_m‖/λ_min``,
    so ``|gₑᵀ(x − x*)| ≤ r ‖gₑ‖ ‖g_m‖/λ_min``, with ``r = tol`` for CG plus
    ``SOLVE_RESIDUAL_PER_CONDITION · κ`` for the exact reference."""
    net, X, y = trained
    tol = solvers.MIXED_PRECISION_MIN_TOL
    exact = influence(net, X, y, solver="exact")
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", exact.model_.n_params - 1)
    monkeypatch.setattr(policy, "memory_limit", lambda: 16 * exact.model_.n_params ** 2 - 1)
    auto = influence(net, X, y, tol=tol)
    assert auto.diagnostics_["requested_solver"] == "auto"
    assert auto.diagnostics_["solver"] == "cg" and auto.diagnostics_["mixed_precision"]
    assert isinstance(auto.solver_, CGSolver) and auto.solver_._low is not None
    products = []  # which curvature each block solve used: float32 only, no float64 rescue
    block_solve = auto.solver_._solve_blocks
    monkeypatch.setattr(auto.solver_, "_solve_blocks", lambda B, curvature, tol: (
        products.append(curvature.model.dtype), block_solve(B, curvature, tol))[1])
    model = exact.model_
    eigenvalues = torch.linalg.eigvalsh(
        Curvature(model, exact.X_train_, exact.T_train_, damping=0.3).dense())
    lowest, condition = float(eigenvalues[0]), float(eigenvalues[-1] / eigenvalues[0])
    residual = tol + SOLVE_RESIDUAL_PER_CONDITION * condition
    norms = model.per_sample_grads(model.params, exact.X_train_,
                                   exact.T_train_).norm(dim=1).numpy()
    bound = exact.epsilon_ * residual / lowest * np.outer(norms, norms)
    got, ref = auto.loss_change(X, y, X[:7], y[:7]), exact.loss_change(X, y, X[:7], y[:7])
    assert auto.diagnostics_["converged"] and auto.diagnostics_["max_relative_residual"] <= tol
    assert products and set(products) == {torch.float32}
    assert np.all(np.abs(got - ref) <= bound[:, :7])
    assert np.all(np.abs(auto.score_samples(X) - exact.score_samples(X)) <= np.diag(bound))


def test_cg_that_float32_rounding_stops_says_so_not_max_iter():
    """On a float32 net CG's own residual can meet a tol that the true residual,
    recomputed in float32, cannot: the warning then blames float32 rounding and
    names the fixes, not ``max_iter`` (it stopped long before it)."""
    X, y = toy_data("CrossEntropyLoss", n=60)
    torch.manual_seed(0)
    net = NeuralNetClassifier(mlp(X.shape[1], 3, hidden=8).float(),
                              criterion=torch.nn.CrossEntropyLoss, verbose=0).initialize()
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", damping=0.01, tol=1e-7).fit(
        X.astype(np.float32), y)
    with pytest.warns(ConvergenceWarning) as caught:
        est.score_samples(X[:5].astype(np.float32))
    message = str(caught[0].message)
    assert est.diagnostics_["n_iter"] < est.solver_.max_iter
    assert "met tol on its own recurrence" in message and "float32" in message
    assert "max_iter" not in message and "solver='kernel'" in message
