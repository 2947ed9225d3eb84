"""The one solver policy (:func:`sklinfluence.solvers.plan_solvers`): which solver the
configured rung, the exact rung and the batched PBRF's shared factor use, and why, at
the boundaries of its rule — ``EXACT_MAX_PARAMS`` (lowered to small nets: the knob is
read at call time), the kernel's ``N·K ≤ P``, the memory limit, ``tol`` against
``MIXED_PRECISION_MIN_TOL``, a float32 net, the Hessian — decided once per fitted net
and reported in ``diagnostics_["solver_policy"]``. Where the predicted costs decide
(above ``EXACT_MAX_PARAMS``), they are fixed by the test (``_costs``); the cost model
itself and the budget are ``test_auto_cost.py``'s."""

import numpy as np
import pytest
import torch
from torch import nn

from sklinfluence import InfluenceEstimator, PBRFEstimator, config_context
from sklinfluence.response import responder as response
from sklinfluence import solvers
from sklinfluence.solvers import policy
from sklinfluence.response.cache import RESPONSE_CACHE
from sklinfluence.curvature.operator import Curvature
from sklinfluence.model.functional import FunctionalModel
from sklinfluence.model.losses import output_loss_from_criterion
from sklinfluence.utils.memory import dense_bytes
from sklinfluence.solvers.cost import Cost
from sklinfluence.solvers import (CHORD_TOL, MIXED_PRECISION_MIN_TOL, SOLVER_ROLES,
                                  plan_solvers, resolve_solver)
from nets import make_net, toy_data

DAMPING = 1e-2


def _model(dtype=torch.float64):
    """``4 → 6 → 1`` Tanh MLP, mean squared error: P = 37 parameters, K = 1 kernel row
    per sample (so ``N·K ≤ P`` is ``N ≤ 37``)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)
    loss = output_loss_from_criterion(nn.MSELoss())
    return FunctionalModel(module, loss, [1e-3] * 4)


def _inputs(n, dtype=torch.float64):
    return torch.randn(n, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _plan(model, n, **options):
    options = {"damping": DAMPING, "tol": 1e-10, **options}
    return plan_solvers(model, _inputs(n, model.dtype), **options)


def _costs(monkeypatch, exact, kernel, cg):
    """Fix the predicted seconds of each exact option (bytes by the real formulas:
    ``16 P²``, ``16 n²``, ``40 k P``)."""
    class Fixed:
        def __init__(self, curvature, *, n_rhs=None, tol=None, max_iter=None):
            self.P, self.n = curvature.n_params, curvature.n_samples  # K = 1

        def exact(self):
            return Cost("exact", exact, dense_bytes(self.P), "fixed")

        def kernel(self):
            return Cost("kernel", kernel, 16 * self.n ** 2, "fixed")

        def cg(self):
            return Cost("cg", cg, 40 * self.n * self.P, "fixed")

    monkeypatch.setattr(policy, "CostModel", Fixed)


def _roles(plan):
    return tuple((getattr(plan, role).solver, getattr(plan, role).params) for role in SOLVER_ROLES)


@pytest.mark.parametrize("offset", [0, 1])
def test_up_to_exact_max_params_every_role_is_the_dense_solve(monkeypatch, offset):
    model = _model()
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P + offset)  # P ≤ EXACT_MAX_PARAMS
    plan = _plan(model, 10)
    assert _roles(plan) == (("exact", {}),) * 3 and plan.chord_is_exact
    assert f"{P} parameters ≤ EXACT_MAX_PARAMS = {P + offset}" in plan.influence.reason
    assert "predicted to fit time_budget_seconds" in plan.influence.reason
    assert plan.pbrf_chord.reason.startswith("exact: the exact rung's factor")


def test_one_parameter_above_it_the_kernel_form_takes_every_role(monkeypatch):
    """Above ``EXACT_MAX_PARAMS`` the cheapest predicted option: here the kernel,
    which still applies at ``N·K = P`` (and is weighed no more at ``P + 1``)."""
    model = _model()
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=2.0, kernel=1.0, cg=3.0)
    assert "kernel" not in _plan(model, P + 1).influence.predicted
    plan = _plan(model, P)  # N·K = P: the kernel still applies
    assert set(plan.influence.predicted) == {"exact", "kernel", "cg"}
    kernel = ("kernel", {"mixed_precision": False})
    assert _roles(plan) == (kernel,) * 3 and plan.chord_is_exact
    assert f"{P} parameters > EXACT_MAX_PARAMS = {P - 1}" in plan.influence.reason
    assert f"N·K = {P} kernel rows ≤ P = {P} parameters" in plan.influence.reason


def test_more_kernel_rows_than_parameters_is_cg_and_the_dense_exact_rung(monkeypatch):
    """``N·K = P + 1``: ``"auto"`` is block CG; the exact rung stays dense (it fits in
    memory) and the batched PBRF, with no factor to share, runs CG to CHORD_TOL."""
    model = _model()
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=2.0, kernel=1.0, cg=1.5)  # CG predicted cheaper
    plan = _plan(model, P + 1)
    assert _roles(plan) == (("cg", {"mixed_precision": False}), ("exact", {}), ("cg", {}))
    assert not plan.chord_is_exact
    assert plan.pbrf_chord.tol == CHORD_TOL and plan.pbrf_chord.max_iter is None
    assert f"more than the {P} parameters" in plan.influence.reason
    assert plan.pbrf_chord.reason.startswith(f"cg to CHORD_TOL = {CHORD_TOL:g}")


def test_above_the_memory_limit_the_exact_rung_is_what_auto_picks(monkeypatch):
    model = _model()
    P = model.n_params
    with config_context(memory_limit_bytes=dense_bytes(P) - 1):
        plan = _plan(model, P + 1)  # no dense matrix, no kernel: CG everywhere
        assert _roles(plan) == (("cg", {"mixed_precision": False}),) * 2 + (("cg", {}),)
        assert "does not fit in memory" in plan.exact_influence.reason
        plan = _plan(model, P - 1)  # the kernel (16·(P − 1)² bytes) still fits
        assert _roles(plan) == (("kernel", {"mixed_precision": False}),) * 3


@pytest.mark.parametrize("tol, mixed", [(MIXED_PRECISION_MIN_TOL, True),
                                        (np.nextafter(MIXED_PRECISION_MIN_TOL, 0), False)])
def test_mixed_precision_from_mixed_precision_min_tol_up(monkeypatch, tol, mixed):
    model = _model()
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=3.0, kernel=1.0, cg=2.0)
    kernel, cg = _plan(model, P, tol=tol), _plan(model, P + 1, tol=tol)
    assert kernel.influence.params == {"mixed_precision": mixed} == cg.influence.params
    assert kernel.exact_influence.params == {"mixed_precision": mixed}
    assert cg.pbrf_chord.params == {}  # the chord's CG has its own tol
    assert ("≥" if mixed else "<") + " MIXED_PRECISION_MIN_TOL" in kernel.influence.reason


def test_a_float32_net_gets_the_float32_kernel_and_plain_cg(monkeypatch):
    model = _model(torch.float32)
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=3.0, kernel=1.0, cg=2.0)
    kernel = _plan(model, P, tol=1e-10)  # float32 kernel rows: refined at any tol
    assert kernel.influence.params == {"mixed_precision": True}
    assert "a float32 net's kernel rows carry float32 rounding" in kernel.influence.reason
    cg = _plan(model, P + 1, tol=1e-3)  # its products are float32 already
    assert cg.influence.params == {"mixed_precision": False}
    assert "float32 net's products are in that precision already" in cg.influence.reason


def test_the_hessian_gets_cg_above_the_dense_size_and_the_exact_rung_the_kernel(monkeypatch):
    model = _model()
    P = model.n_params
    plan = _plan(model, P, curvature="hessian")
    assert plan.influence.solver == "exact" and plan.influence.curvature == "hessian"
    assert plan.exact_influence.curvature == "ggn"
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=3.0, kernel=1.0, cg=2.0)
    plan = _plan(model, P, curvature="hessian")
    assert (plan.influence.solver, plan.influence.curvature) == ("cg", "hessian")
    assert "inverts the Gauss–Newton matrix, not the Hessian" in plan.influence.reason
    assert plan.exact_influence.solver == plan.pbrf_chord.solver == "kernel"


def test_a_requested_solver_is_kept_and_checked():
    model = _model()
    plan = _plan(model, 10, solver="cg", solver_params={"preconditioner": "ekfac"})
    assert (plan.influence.solver, plan.influence.params) == ("cg", {"preconditioner": "ekfac"})
    assert plan.influence.reason == "cg: requested"
    assert plan.exact_influence.solver == "exact"
    with pytest.raises(ValueError, match=r"\['rank'\] are not options of solver='auto'"):
        _plan(model, 10, solver_params={"rank": 3})
    with pytest.raises(ValueError, match="solver must be one of"):
        _plan(model, 10, solver="dense")


def test_resolve_solver_reads_the_configured_role(monkeypatch):
    model = _model()
    P = model.n_params
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", P - 1)
    _costs(monkeypatch, exact=3.0, kernel=1.0, cg=2.0)
    for n, tol in [(P, 1e-6), (P + 1, 1e-10)]:
        X = _inputs(n)
        curvature = Curvature(model, X, model.forward(model.params, X).detach(),
                              damping=DAMPING)
        picked = _plan(model, n, tol=tol).influence
        assert resolve_solver("auto", curvature, tol) == (picked.solver, picked.params)
    assert resolve_solver("lissa", curvature) == ("lissa", {})


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=30)
    return X, y, make_net("CrossEntropyLoss", 4, max_epochs=3)


def test_the_responder_decides_once_and_the_estimators_report_it(data, monkeypatch):
    X, y, net = data
    calls = []
    plan = response.plan_solvers
    monkeypatch.setattr(response, "plan_solvers", lambda *a, **k: (calls.append(1),
                                                                    plan(*a, **k))[1])
    est = InfluenceEstimator(net, damping=DAMPING, random_state=0).fit(X, y)
    responder = est.responder_
    assert responder.solver(exact=True) is responder.solver() is est.solver_
    assert responder.chord_solver() is est.solver_ and len(calls) == 1
    policy = est.diagnostics_["solver_policy"]
    assert list(policy) == list(SOLVER_ROLES)
    assert policy == responder.solver_plan().describe()
    assert policy["influence"]["solver"] == est.diagnostics_["solver"] == "exact"
    assert set(policy["pbrf_chord"]) == {"solver", "params", "reason", "predicted"}
    assert set(policy["influence"]["predicted"]) == {"exact", "kernel", "cg"} or \
        set(policy["influence"]["predicted"]) == {"exact", "cg"}

    RESPONSE_CACHE.clear()
    pbrf = PBRFEstimator(net, damping=0.3, removal_batch_size=3, random_state=0).fit(X, y)
    assert pbrf.diagnostics_ == {}
    pbrf.param_change(X[:3])
    chord = pbrf.diagnostics_["solver_policy"]["pbrf_chord"]
    assert chord["solver"] == "exact" and "the exact rung's factor" in chord["reason"]
    assert isinstance(pbrf.responder_.chord_solver(), solvers.ExactSolver)
    RESPONSE_CACHE.clear()


def test_above_the_threshold_the_roles_build_what_the_plan_says(data, monkeypatch):
    X, y, net = data
    est = InfluenceEstimator(net, damping=DAMPING, random_state=0).fit(X, y)
    monkeypatch.setattr(policy, "EXACT_MAX_PARAMS", est.model_.n_params - 1)
    RESPONSE_CACHE.clear()
    pbrf = PBRFEstimator(net, damping=0.3, removal_batch_size=3, random_state=0).fit(
        X[:4], y[:4])  # N·K = 12 rows: the kernel form
    plan = pbrf.responder_.solver_plan()
    assert plan.pbrf_chord.solver == "kernel" and plan.chord_is_exact
    assert isinstance(pbrf.responder_.chord_solver(), solvers.KernelSolver)
    assert pbrf.responder_.chord_solver() is pbrf.responder_.solver(exact=True)
    RESPONSE_CACHE.clear()


def test_the_default_removal_products_stream_the_forces_and_equal_the_products():
    """The base class's influence matrix: the solve for the gradients, then its
    products with each part's forces — the same numbers in parts as at once."""
    from sklinfluence.model.removal import single_removals
    from sklinfluence.response.rungs import removal_forces

    model = _model()
    X = _inputs(9)
    T = model.forward(model.params, X).detach() + 0.1
    solver = solvers.make_solver("cg", Curvature(model, X, T, damping=DAMPING), tol=1e-12)
    removals = single_removals(X, T, np.arange(9))
    forces = (lambda part: removal_forces(model, part))
    B = model.per_sample_grads(model.params, X[:3], T[:3])
    whole = solver.removal_products(B, X[:3], T[:3], removals, forces)
    parts = solver.removal_products(B, X[:3], T[:3], removals, forces, max_rows=2)
    expected = forces(removals).to(torch.float64) @ solver.solve(B).T
    assert whole.shape == (9, 3) and torch.equal(whole, expected)
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=0)
    assert solver.last_solve.n_rhs == 3


def test_a_requested_approximation_predicts_nothing_until_an_exact_role_is_read(
        data, monkeypatch):
    X, y, net = data
    built = []
    real = policy.CostModel
    monkeypatch.setattr(policy, "CostModel", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    est = InfluenceEstimator(net, damping=DAMPING, solver="ekfac", random_state=0).fit(X, y)
    assert built == []  # no curvature products timed, no Lanczos
    assert list(est.diagnostics_["solver_policy"]) == ["influence"]
    plan = est.responder_.solver_plan()
    assert plan.decided == ("influence",)
    exact = est.responder_.solver(exact=True)  # the exact rung: decided now, once
    assert len(built) == 1 and plan.decided == SOLVER_ROLES
    assert isinstance(exact, solvers.ExactSolver) and exact is not est.solver_
    assert plan.exact_influence.predicted and plan.chord_is_exact  # auto would pick dense
    assert list(plan.describe()) == list(SOLVER_ROLES) and len(built) == 1
    eager = plan_solvers(est.model_, est.responder_.context.X, damping=DAMPING,
                         solver="ekfac", decide_exact=True)
    assert eager.decided == SOLVER_ROLES
    assert eager.exact_influence.solver == plan.exact_influence.solver
