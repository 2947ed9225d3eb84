"""The developer guide's extension examples (``docs/developers.rst`` includes this
file): a new solver and a new layer type, each one class, registered by name or by
module type, and checked end to end through the public estimator against closed forms.

The classes are defined inside functions so that they are registered only by the
fixtures below, and unregistered after each test: other test modules never see them.
"""

import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier
from torch import Tensor, nn
from torch.func import jacrev

from nets import make_net, toy_data
from sklinfluence import InfluenceEstimator
from sklinfluence.curvature.capture import kronecker_passes
from sklinfluence.curvature.kfac import KroneckerFactors
from sklinfluence.curvature.operator import Curvature
from sklinfluence.curvature.layers import (LAYER_TYPES, Eigenbasis, KroneckerLayer, LinearBlock,
                                           kronecker_layers, register_layer,
                                           unregister_layer)
from sklinfluence.exceptions import UnsupportedLayerError
from sklinfluence.solvers import (NEEDS, SOLVER_NAMES, SOLVER_TYPES, DirectSolver, ExactSolver,
                                  SolveInfo, register_solver, unregister_solver)
from tolerances import CLOSED_FORM_RTOL

DAMPING = 0.3


def define_eigh_solver():
    """Define (and so register) the example solver; returns its class."""
    # -- a new solver -----------------------------------------------------------------------
    @register_solver
    class EighSolver(DirectSolver):
        """The damped Gauss–Newton inverse from its eigendecomposition, in float64.

        ``G + μ + λI = V diag(w) Vᵀ``, so ``(G + μ + λI)⁻¹ b = V (Vᵀb / w)`` — the
        exact solver's answer by another factorisation — and the self-influence
        ``gᵀ (G + μ + λI)⁻¹ g = Σ_j (v_jᵀg)² / w_j`` needs no way back to parameters.
        """

        name = "eigh"  # what solver= takes
        params = ("chunk_size",)  # the solver_params it accepts
        approximate = False  # exact up to rounding, whatever its settings
        needs = frozenset({"ggn"})  # 1/w: the eigenvalues must be positive
        measures_residual = False  # backward stable: no residual to measure

        def __init__(self, curvature, chunk_size=256):
            super().__init__(curvature)  # checks `needs`, before the P × P build
            start = time.perf_counter()
            self.values, self.vectors = torch.linalg.eigh(curvature.dense(chunk_size))
            if float(self.values[0]) <= 0:
                raise ValueError(f"solver='eigh' needs damping > 0: the damped Gauss–Newton "
                                 f"matrix has the eigenvalue {float(self.values[0]):.3e}.")
            self.info = {"solver": self.name, "approximate": False,
                         "n_params": curvature.n_params,
                         "memory_bytes": 8 * curvature.n_params ** 2,
                         "bottom_eigenvalue": float(self.values[0]),
                         "eigen_seconds": time.perf_counter() - start}

        @classmethod
        def build(cls, curvature, *, tol, max_iter, verbose, chunk_size=256):
            # a direct solver has no use for tol, max_iter or verbose
            if not (isinstance(chunk_size, int) and chunk_size > 0):
                raise ValueError("solver_params['chunk_size'] must be a positive int, "
                                 f"got {chunk_size!r}.")
            return cls(curvature, chunk_size)

        def _apply(self, B):
            return (B @ self.vectors / self.values) @ self.vectors.T

        def self_products(self, removals, forces):
            start = time.perf_counter()
            F = forces(removals).to(torch.float64)
            products = ((F @ self.vectors) ** 2 / self.values).sum(dim=1)
            self.last_solve = SolveInfo(int(F.shape[0]), 0, None, True,
                                        time.perf_counter() - start)
            return products
    # -- end of the solver ------------------------------------------------------------------
    return EighSolver


# -- a module of the user's own ---------------------------------------------------------
class Scale(nn.Module):
    """``y = x · w + b``, one scale and one shift per feature (the last dimension)."""

    def __init__(self, n_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_features))
        self.bias = nn.Parameter(torch.zeros(n_features)) if bias else None

    def forward(self, x):
        return x * self.weight if self.bias is None else x * self.weight + self.bias
# -- end of the module ------------------------------------------------------------------


def define_scale_layer():
    """Define (and so register) the example layer type; returns its class."""
    # -- a new layer type -------------------------------------------------------------------
    class ScaleCapture(NamedTuple):
        d: Tensor  # (B, K, n_cols): per-sample gradients, [Σ_t g ⊙ x | Σ_t g]
        bound: Tensor  # (B, K, n_cols): the same sums of absolute values

    @register_layer
    @dataclass(eq=False)
    class ScaleLayer(KroneckerLayer):
        """:class:`Scale`: layout ``(1, [w | b])`` over the trained parameters;
        its exact block is ``A`` and ``S = 1``."""

        weight: slice | None = None  # where w and b sit in the flat parameters
        bias: slice | None = None
        n_features: int = 0

        module_types: ClassVar = (Scale,)

        @classmethod
        def build(cls, name, module, slices):
            weight, bias = slices.get("weight"), slices.get("bias")
            if weight is None and bias is None:
                return None  # frozen: nothing to do here
            n = module.weight.numel()
            return cls(name, 1, n * ((weight is not None) + (bias is not None)),
                       weight=weight, bias=bias, n_features=n)

        def _parts(self):
            return [s for s in (self.weight, self.bias) if s is not None]

        def to_matrices(self, V):
            return torch.cat([V[:, s] for s in self._parts()], dim=1).unsqueeze(1)

        def put(self, V, M):
            for j, s in enumerate(self._parts()):
                V[:, s] = M[:, 0, j * self.n_features:(j + 1) * self.n_features]

        def record(self, module, x):
            return x.detach().reshape(x.shape[0], -1, self.n_features).clone()  # (B, T, C)

        def capture(self, recorded, grads):
            K, B = grads.shape[:2]
            g = grads.to(torch.float64).reshape(K, B, -1, self.n_features).transpose(0, 1)
            x = recorded.to(torch.float64)  # g: (B, K, T, C), x: (B, T, C)
            d, bound = [], []
            if self.weight is not None:
                d.append(torch.einsum("bktc,btc->bkc", g, x))
                bound.append(torch.einsum("bktc,btc->bkc", g.abs(), x.abs()))
            if self.bias is not None:
                d.append(g.sum(2))
                bound.append(g.abs().sum(2))
            return ScaleCapture(torch.cat(d, dim=-1), torch.cat(bound, dim=-1))

        def factor_sums(self, cap):
            d = cap.d.reshape(-1, self.d_in)  # one row per sample and root column
            B = cap.d.shape[0]
            return d.T @ d, d.new_full((1, 1), float(B)), B

        def sample_gradients(self, cap):
            return cap.d.unsqueeze(2)  # (B, K, 1, n_cols)

        def rotated_squares(self, basis, cap):
            return ((cap.d.reshape(-1, self.d_in) @ basis.Q_A) ** 2).sum(0, keepdim=True)

        def gradient_sums(self, cap, absolute=False):
            return (cap.bound if absolute else cap.d).sum(0).unsqueeze(1)  # (K, 1, n_cols)
    # -- end of the layer type --------------------------------------------------------------
    return ScaleLayer


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def eigh_solver():
    """The example solver, registered for one test."""
    assert "eigh" not in SOLVER_TYPES
    cls = define_eigh_solver()
    assert SOLVER_TYPES["eigh"] is cls and "eigh" in SOLVER_NAMES
    yield cls
    unregister_solver("eigh")
    assert "eigh" not in SOLVER_TYPES and "eigh" not in SOLVER_NAMES


@pytest.fixture
def scale_layer():
    """The example layer type, registered for one test."""
    before = list(LAYER_TYPES)
    cls = define_scale_layer()
    assert LAYER_TYPES == before + [cls]
    yield cls
    unregister_layer(cls)
    assert LAYER_TYPES == before


@pytest.fixture(scope="module")
def mlp_net():
    """A small trained float64 classifier (51 parameters) and its data."""
    X, y = toy_data("CrossEntropyLoss", n=40)
    torch.manual_seed(0)
    return make_net("CrossEntropyLoss", X.shape[1], hidden=6, max_epochs=20).fit(X, y), X, y


@pytest.fixture
def dense_builds(monkeypatch):
    """How many dense curvature matrices were built (a list, one entry per build)."""
    builds, dense = [], Curvature.dense

    def counted(self, *args, **kwargs):
        builds.append(self.kind)
        return dense(self, *args, **kwargs)

    monkeypatch.setattr(Curvature, "dense", counted)
    return builds


def influence(net, X, y, **kwargs):
    return InfluenceEstimator(FrozenEstimator(net), damping=DAMPING, **kwargs).fit(X, y)


def _close(got, expected, rtol=CLOSED_FORM_RTOL):
    got, expected = np.asarray(got), np.asarray(expected)
    assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# ------------------------------------------------------------------------- the solver
def test_a_new_solver_is_unknown_until_registered(mlp_net):
    net, X, y = mlp_net
    with pytest.raises(ValueError, match="'solver' parameter .* Got 'eigh' instead"):
        influence(net, X, y, solver="eigh")


def test_a_new_solver_gives_the_exact_influence(eigh_solver, mlp_net):
    net, X, y = mlp_net
    exact = influence(net, X, y, solver="exact")
    est = influence(net, X, y, solver="eigh", solver_params={"chunk_size": 7})
    assert isinstance(est.solver_, eigh_solver) and isinstance(exact.solver_, ExactSolver)
    _close(est.loss_change(X, y, X[:7], y[:7]), exact.loss_change(X, y, X[:7], y[:7]))
    _close(est.param_change(X[:3], y[:3]), exact.param_change(X[:3], y[:3]))
    _close(est.score_samples(X[:9]), exact.score_samples(X[:9]))  # its self_products
    diagnostics = est.diagnostics_
    assert diagnostics["solver"] == "eigh" and diagnostics["converged"] is True
    assert diagnostics["approximate"] is False and diagnostics["n_rhs"] == 9
    assert diagnostics["bottom_eigenvalue"] >= DAMPING * (1 - 1e-12)
    assert diagnostics["solver_policy"]["influence"] == {
        "solver": "eigh", "params": {"chunk_size": 7}, "reason": "eigh: requested"}


def test_a_new_solver_accepts_only_its_declared_params(eigh_solver, mlp_net, dense_builds):
    net, X, y = mlp_net
    with pytest.raises(ValueError, match=r"\['rank'\] are not options of solver='eigh'; "
                                         r"it accepts \['chunk_size'\]"):
        influence(net, X, y, solver="eigh", solver_params={"rank": 3})
    with pytest.raises(ValueError, match="chunk_size'] must be a positive int, got 0"):
        influence(net, X, y, solver="eigh", solver_params={"chunk_size": 0})  # its build
    assert dense_builds == []  # refused before the P × P build
    influence(net, X, y, solver="eigh", solver_params={"chunk_size": 5})
    assert dense_builds == ["ggn"]


def test_a_new_solver_gets_only_the_curvature_it_needs(eigh_solver, mlp_net, dense_builds):
    net, X, y = mlp_net
    with pytest.raises(ValueError, match="solver='eigh' inverts the Gauss–Newton matrix; "
                                         "got curvature='hessian'"):
        influence(net, X, y, solver="eigh", curvature="hessian")
    assert dense_builds == []  # refused before the P × P build


def test_registration_checks_the_declarations(eigh_solver):
    registered = dict(SOLVER_TYPES)
    with pytest.raises(ValueError, match="solver 'eigh' is registered already"):
        register_solver(eigh_solver)

    class Another(eigh_solver):  # a different class under the same name
        pass

    with pytest.raises(ValueError, match="registered already"):
        register_solver(Another)
    for declarations, message in [({"name": "auto"}, "must declare a name"),
                                  ({"name": ""}, "must declare a name"),
                                  ({"name": "eigh2", "params": ["chunk_size"]},
                                   "params must be a tuple of str"),
                                  ({"name": "eigh2", "approximate": 0},
                                   "approximate must be a bool"),
                                  ({"name": "eigh2", "needs": frozenset({"hessian"})},
                                   r"needs \['hessian'\] are not among")]:
        with pytest.raises(TypeError, match=message):
            register_solver(type("Bad", (eigh_solver,), declarations))
    with pytest.raises(TypeError, match="expects a Solver subclass"):
        register_solver(object)
    assert SOLVER_TYPES == registered and "eigh2" not in SOLVER_NAMES
    assert NEEDS == {"ggn", "layers"}


# -------------------------------------------------------------------- the layer type
class ScaleNet(nn.Sequential):
    """``Linear → Tanh → Scale → Linear`` in float64; ``frozen`` freezes the first
    Linear and drops the last, leaving the Scale layer as the only trained one."""

    def __init__(self, n_in=4, hidden=6, n_out=3, frozen=False):
        layers = [nn.Linear(n_in, hidden), nn.Tanh(), Scale(hidden)]
        if frozen:
            layers[0].requires_grad_(False)
        else:
            layers.append(nn.Linear(hidden, n_out))
        super().__init__(*layers)
        self.double()


@pytest.fixture(scope="module")
def scale_net():
    """A trained classifier with a Scale layer (83 parameters, 20 samples: the kernel
    form's 40 rows are fewer) and weight decay, and its data."""
    X, y = toy_data("CrossEntropyLoss", n=20, n_out=3, seed=3)
    torch.manual_seed(0)
    net = NeuralNetClassifier(ScaleNet, module__hidden=8, criterion=nn.CrossEntropyLoss,
                              max_epochs=20, lr=0.1, optimizer__weight_decay=0.01,
                              train_split=None, verbose=0).fit(X, y)
    return net, X, y


def test_an_unregistered_module_is_refused_naming_it(scale_net):
    net, X, y = scale_net
    with pytest.raises(UnsupportedLayerError, match=r"belong to other layers: 2 \(Scale\)"):
        influence(net, X, y, solver="ekfac")


def test_a_new_layer_type_is_found_and_lays_out_its_parameters(scale_layer, scale_net):
    net, X, y = scale_net
    model = influence(net, X, y, solver="exact").model_
    layers = kronecker_layers(model)
    assert [type(layer) for layer in layers] == [LinearBlock, scale_layer, LinearBlock]
    scale = layers[1]
    assert (scale.name, scale.d_out, scale.n_cols) == ("2", 1, 16)
    index = torch.arange(model.n_params, dtype=torch.float64).unsqueeze(0)
    assert scale.to_matrices(index)[0, 0].tolist() == list(range(40, 56))  # after Linear(4, 8)
    V = torch.zeros_like(index)
    scale.put(V, scale.to_matrices(index))
    assert torch.equal(V[0, 40:56], index[0, 40:56]) and not V[0, :40].any() \
        and not V[0, 56:].any()


def test_ekfac_eigenvalues_of_a_new_layer_are_the_exact_diagonal_of_its_block(
        scale_layer, scale_net):
    """The exact Gauss–Newton block of the Scale layer, from jacrev, rotated into the
    layer's Kronecker eigenbasis: EK-FAC's eigenvalues are its diagonal, and as the
    block is ``A`` itself (``S = 1``) it is diagonal there."""
    net, X, y = scale_net
    est = influence(net, X, y, solver="ekfac")  # runs end to end
    assert est.diagnostics_["solver"] == "ekfac" and est.diagnostics_["approximate"] is True
    model, Xt, Tt = est.model_, est.X_train_, est.T_train_
    J = jacrev(lambda th: model.forward(th, Xt))(model.params)  # (N, K, P)
    H = model.loss.output_hessian(model.forward(model.params, Xt), Tt)
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / len(Xt) + torch.diag(model.weight_decay)
    # the estimator's factors (one pass over the data), and factors accumulated in batches
    batched = KroneckerFactors(model, Xt, Tt, damping=0.0, batch_size=7)
    for factors in (est.solver_.factors, batched):
        j = next(i for i, layer in enumerate(factors.layers) if isinstance(layer, scale_layer))
        block, basis = factors.layers[j], factors.bases[j]
        assert isinstance(basis, Eigenbasis) and basis.Q_S.shape == (1, 1)
        order = block.to_matrices(torch.arange(model.n_params, dtype=torch.float64)
                                  .unsqueeze(0))[0].flatten().long()
        rotated = basis.Q_A.T @ G[np.ix_(order, order)] @ basis.Q_A
        scale = float(rotated.abs().max())
        assert scale > 1e-3  # a block worth comparing
        _close(basis.eigenvalues[0], torch.diagonal(rotated), rtol=1e-12)
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert float(off.abs().max()) <= 1e-12 * scale
    # the block is the mean of the per-sample gradients' outer products, too
    outer = sum(D.T @ D for D in (block.sample_gradients(caps[j]).flatten(2).flatten(0, 1)
                                  for caps in kronecker_passes(model, model.params,
                                                               batched.layers, Xt, Tt, 7)))
    _close(outer / len(Xt) + torch.diag(model.weight_decay[order]), G[np.ix_(order, order)],
           rtol=1e-12)


def test_ekfac_is_exact_where_the_new_layer_is_the_only_trained_one(scale_layer):
    """A block-diagonal approximation with one block and that block exact: EK-FAC and
    K-FAC equal the exact damped inverse, through the estimator."""
    X, y = toy_data("CrossEntropyLoss", n=20, n_out=3, seed=4)
    torch.manual_seed(1)
    net = NeuralNetClassifier(ScaleNet, module__hidden=3, module__frozen=True,
                              criterion=nn.CrossEntropyLoss, max_epochs=10, lr=0.1,
                              train_split=None, verbose=0).fit(X, y)
    exact = influence(net, X, y, solver="exact")
    assert exact.model_.n_params == 6
    expected = exact.loss_change(X, y, X[:5], y[:5])
    for solver in ("ekfac", "kfac"):
        _close(influence(net, X, y, solver=solver).loss_change(X, y, X[:5], y[:5]), expected)


def test_the_kernel_form_of_a_net_with_a_new_layer_is_exact(scale_layer, scale_net):
    net, X, y = scale_net
    exact = influence(net, X, y, solver="exact")
    kernel = influence(net, X, y, solver="kernel")
    assert kernel.diagnostics_["solver"] == "kernel" and exact.model_.n_params == 83
    # the Scale layer's rows are materialised (no outer_factors); the Linear ones factored
    assert kernel.diagnostics_["materialised_params"] == 16
    _close(kernel.loss_change(X, y, X[:7], y[:7]), exact.loss_change(X, y, X[:7], y[:7]))
    _close(kernel.score_samples(X[:9]), exact.score_samples(X[:9]))


def test_a_layer_type_must_implement_every_abstract_method(scale_layer):
    before = list(LAYER_TYPES)

    @dataclass(eq=False)
    class Incomplete(KroneckerLayer):
        module_types: ClassVar = (Scale,)

        def record(self, module, x):
            return x

    with pytest.raises(TypeError, match="does not implement build, capture, factor_sums, "
                                        "gradient_sums, put, rotated_squares, "
                                        "sample_gradients, to_matrices"):
        register_layer(Incomplete)
    with pytest.raises(TypeError, match="expects a KroneckerLayer subclass"):
        register_layer(object)
    with pytest.raises(ValueError, match="LinearBlock is registered already"):
        register_layer(LAYER_TYPES[0])
    assert LAYER_TYPES == before


def test_declared_options_reach_a_solver_without_its_own_build(mlp_net):
    """A solver that declares ``params`` but keeps the default ``build`` gets them as
    constructor keywords, and ``make_solver`` fills in the ``info`` keys the
    estimators read when a solver's own ``info`` leaves them out."""
    from sklinfluence.solvers import make_solver

    @register_solver
    class Shifted(ExactSolver):
        name = "shifted_exact"
        params = ("label",)

        def __init__(self, curvature, label="default"):
            super().__init__(curvature)
            self.label = label
            self.info = {}

    try:
        net, X, y = mlp_net
        est = InfluenceEstimator(FrozenEstimator(net), damping=0.1).fit(X, y)
        curvature = Curvature(est.model_, est.X_train_, est.T_train_, damping=0.1)
        solver = make_solver("shifted_exact", curvature, solver_params={"label": "mine"})
        assert solver.label == "mine"
        assert solver.info == {"solver": "shifted_exact", "approximate": False,
                               "n_params": est.model_.n_params}
    finally:
        unregister_solver("shifted_exact")
