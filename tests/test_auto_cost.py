"""``solver="auto"``'s cost model (:mod:`sklinfluence.solvers.cost`) and its budget:
the predicted time and memory of each exact option, the decision at the boundaries of
``time_budget_seconds`` and the memory limit (rates fixed by the test, so the
predictions are closed forms of the sizes), the warning that names the exact
alternative, what ``diagnostics_`` records, one prediction against a measured build,
and CG stalling at float32 rounding."""

import math
import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from sklinfluence import InfluenceEstimator, config_context
from sklinfluence.curvature.operator import Curvature
from sklinfluence.model.functional import FunctionalModel
from sklinfluence.model.losses import output_loss_from_criterion
from sklinfluence.solvers import (CGSolver, SolverBudgetWarning, cost, plan_solvers,
                                  policy)
from sklinfluence.solvers.cost import CostModel, format_seconds, lanczos_extremes
from sklinfluence.utils.memory import dense_bytes
from nets import make_net, toy_data

DAMPING, DECAY = 1e-2, 1e-3
RATE, PRODUCT, TOP = 1e9, 1e-6, 100.0  # flops/s, s per row-vector, λ_max: fixed rates


def _model(hidden=6, dtype=torch.float64):
    """``4 → hidden → 1`` Tanh MLP, mean squared error (K = 1)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)
    return FunctionalModel(module, output_loss_from_criterion(nn.MSELoss()), [DECAY] * 4)


def _inputs(n):
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fixed_rates(monkeypatch):
    monkeypatch.setattr(cost, "gemm_rate", lambda: RATE)
    monkeypatch.setattr(cost, "product_seconds", lambda curvature: PRODUCT)
    monkeypatch.setattr(cost, "lanczos_extremes", lambda curvature, steps=8: (0.0, TOP))


def _expected(P, N, tol=1e-10, hidden=6):
    """The closed forms of the module notes, at the fixed rates (K = 1, k = N ≤ 512)."""
    k = n = N
    exact = 0.5 * n * PRODUCT + (1.25 * n * P ** 2 + P ** 3 / 3 + 2 * k * P ** 2) / RATE
    # both Linear layers factor (4 → hidden → 1: d_out, n_cols with the bias): nothing
    factored = [(hidden, 5), (1, hidden + 1)]  # materialised
    gram = sum(n ** 2 * d_out + N ** 2 * n_cols for d_out, n_cols in factored)
    solves = 4 * k * N * sum(d_out * n_cols for d_out, n_cols in factored)
    kernel = 0.5 * n * PRODUCT + (gram + n ** 3 / 3 + solves + 2 * k * n ** 2) / RATE
    kappa = TOP / (DECAY + DAMPING)
    iterations = min(0.5 * math.sqrt(kappa) * math.log(2 / tol), P)
    cg = iterations * (N * k * PRODUCT + 8 * k * k * P / RATE)
    return {"exact": exact, "kernel": kernel, "cg": cg}


def test_the_predictions_are_the_documented_closed_forms(fixed_rates):
    model = _model()
    P, N = model.n_params, 20
    X = _inputs(N)
    C = Curvature(model, X, model.forward(model.params, X).detach(), damping=DAMPING)
    costs = CostModel(C, tol=1e-10)
    want = _expected(P, N)
    for name in ("exact", "kernel", "cg"):
        got = getattr(costs, name)()
        assert got.seconds == pytest.approx(want[name], rel=1e-12)
    assert costs.exact().bytes == dense_bytes(P) and costs.kernel().bytes == 16 * N ** 2
    assert costs.cg().bytes == 40 * N * P
    assert costs.n_rhs == N and CostModel(C, n_rhs=3).n_rhs == 3


def test_lanczos_brackets_the_spectrum_and_finds_the_top_eigenvalue():
    model = _model()
    X = _inputs(30)
    C = Curvature(model, X, model.forward(model.params, X).detach() + 0.1, damping=DAMPING)
    eigenvalues = torch.linalg.eigvalsh(C.dense())
    low, high = lanczos_extremes(C, steps=model.n_params)
    assert float(eigenvalues[0]) * (1 - 1e-9) <= low and high <= float(eigenvalues[-1]) * (1 + 1e-9)
    assert high == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert lanczos_extremes(C, steps=8)[1] == pytest.approx(float(eigenvalues[-1]), rel=1e-2)


@pytest.mark.parametrize("above", [True, False])
def test_the_budget_just_above_or_below_the_dense_cost(fixed_rates, above):
    """``N > P`` (no kernel): the dense solve where the budget covers its prediction;
    just below it (and below CG's), EK-FAC with a warning naming both."""
    model = _model()
    P, N = model.n_params, 40
    want = _expected(P, N)
    assert want["exact"] < want["cg"]
    budget = want["exact"] * (1.001 if above else 0.999)
    with config_context(time_budget_seconds=budget), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = plan_solvers(model, _inputs(N), damping=DAMPING)
    budget_warnings = [x for x in w if issubclass(x.category, SolverBudgetWarning)]
    decision = plan.influence
    assert set(decision.predicted) == {"exact", "cg"}
    assert decision.predicted["exact"]["seconds"] == pytest.approx(want["exact"], rel=1e-12)
    if above:
        assert decision.solver == "exact" and not budget_warnings
        assert plan.exact_influence.solver == plan.pbrf_chord.solver == "exact"
        return
    assert decision.solver == "ekfac" and len(budget_warnings) == 1
    assert "ekfac (approximate)" in decision.reason
    message = str(budget_warnings[0].message)
    assert message.startswith("solver='auto' chose 'ekfac' (approximate): the exact options "
                              f"are predicted to take ≥ {format_seconds(want['exact'])} (exact), "
                              f"{format_seconds(want['cg'])} (cg), above "
                              f"time_budget_seconds={budget:g}")
    assert "pass solver='exact' to run it anyway or raise the budget" in message
    # the exact rung has no approximation: the cheapest predicted, over the budget
    assert plan.exact_influence.solver == "exact" and not plan.chord_is_exact
    assert "no exact option is predicted to fit" in plan.exact_influence.reason


def test_without_registered_layers_the_approximation_is_arnoldi(fixed_rates, monkeypatch):
    from sklinfluence.exceptions import UnsupportedLayerError

    def unsupported(model):
        raise UnsupportedLayerError("not a registered layer")

    monkeypatch.setattr(policy, "kronecker_layers", unsupported)
    with config_context(time_budget_seconds=1e-12), pytest.warns(SolverBudgetWarning,
                                                                 match="chose 'arnoldi'"):
        plan = plan_solvers(_model(), _inputs(40), damping=DAMPING)
    assert plan.influence.solver == "arnoldi"
    with config_context(time_budget_seconds=1e-12), pytest.warns(SolverBudgetWarning):
        hessian = plan_solvers(_model(), _inputs(40), damping=DAMPING, curvature="hessian")
    assert (hessian.influence.solver, hessian.influence.curvature) == ("arnoldi", "hessian")


@pytest.mark.parametrize("spare", [0, -1])
def test_the_memory_limit_at_the_dense_size(fixed_rates, spare):
    model = _model()
    P, N = model.n_params, 40
    with config_context(memory_limit_bytes=dense_bytes(P) + spare):
        plan = plan_solvers(model, _inputs(N), damping=DAMPING)
    assert plan.influence.solver == ("exact" if spare == 0 else "cg")
    assert ("does not fit in memory" in plan.influence.reason) is (spare < 0)


def test_above_exact_max_params_the_cheapest_is_taken(fixed_rates, monkeypatch):
    """The kernel (``N·K ≤ P``) where it is predicted cheaper than the dense solve, and
    the dense solve again where ``EXACT_MAX_PARAMS`` covers the net."""
    model = _model(hidden=20)
    P, N = model.n_params, 10
    want = _expected(P, N, hidden=20)
    assert want["kernel"] < want["exact"]
    assert plan_solvers(model, _inputs(N), damping=DAMPING).influence.solver == "exact"
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    plan = plan_solvers(model, _inputs(N), damping=DAMPING)
    assert plan.influence.solver == "kernel" and "the cheapest exact option" in plan.influence.reason


def test_diagnostics_show_the_approximation_and_the_predictions():
    X, y = toy_data("CrossEntropyLoss", n=30)
    net = make_net("CrossEntropyLoss", 4, max_epochs=3)
    with config_context(time_budget_seconds=1e-9):
        with pytest.warns(SolverBudgetWarning, match=r"pass solver='exact' to run it anyway"):
            est = InfluenceEstimator(net, damping=DAMPING, random_state=0).fit(X, y)
            est.score_samples(X[:3])
    policy_ = est.diagnostics_["solver_policy"]["influence"]
    assert est.diagnostics_["solver"] == "ekfac" == policy_["solver"]
    assert policy_["reason"].startswith("ekfac (approximate): the exact options are predicted")
    assert {"exact", "cg"} <= set(policy_["predicted"])
    for option in policy_["predicted"].values():
        assert set(option) == {"seconds", "bytes", "how"} and option["seconds"] > 1e-9


def test_cg_whose_block_collapses_at_float32_rounding_says_so_not_max_iter(monkeypatch):
    """A float32 block that loses every search direction before ``tol`` stopped at
    float32's rounding: the warning says so, not ``max_iter`` (which it never reached)."""
    model = _model(dtype=torch.float32)
    X = _inputs(30).float()
    C = Curvature(model, X, model.forward(model.params, X).detach() + 0.1, damping=DAMPING)
    B = torch.randn(3, model.n_params, generator=torch.Generator().manual_seed(2))
    solver = CGSolver(C, tol=1e-6)
    calls = []
    orthonormal = CGSolver._orthonormal_rows

    def collapsing(W):  # rank lost after two iterations, as float32 rounding does
        calls.append(1)
        return orthonormal(W) if len(calls) <= 2 else W[:0]

    monkeypatch.setattr(solver, "_orthonormal_rows", collapsing)
    with pytest.warns(ConvergenceWarning, match="stalled at float32 rounding") as record:
        solver.solve(B)
    assert not any("stopped at max_iter" in str(w.message) for w in record)
    assert solver.last_solve.n_iter == 2 < solver.max_iter and not solver.last_solve.converged
    assert solver.last_solve.max_relative_residual > 1e-6
