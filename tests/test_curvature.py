"""Functional model and curvature products against dense torch.func references."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch.func import hessian, jacrev

from nets import CRITERIA, make_net, toy_data
from sklinfluence.curvature.operator import Curvature
from sklinfluence.model.functional import FunctionalModel
from tolerances import CLOSED_FORM_ATOL, CLOSED_FORM_RTOL

WEIGHT_DECAY = 0.05
DAMPING = 0.01


def _close(a, b, rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL):
    assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _fitted(criterion, n=30, **kwargs):
    X, y = toy_data(criterion, n=n)
    net = make_net(criterion, X.shape[1], optimizer__weight_decay=WEIGHT_DECAY, **kwargs)
    y_net = y.astype(np.float64) if criterion == "BCEWithLogitsLoss" else y
    net.fit(X, y_net)
    model = FunctionalModel.from_net(net)
    Xt = torch.as_tensor(X)
    Tt = torch.as_tensor(y_net)
    return net, model, Xt, Tt


@pytest.mark.parametrize("criterion", CRITERIA)
def test_forward_and_losses_match_the_net(criterion):
    net, model, X, T = _fitted(criterion)
    net.module_.eval()
    with torch.no_grad():
        expected = net.get_loss(net.infer(X), T)
    _close(model.losses(model.params, X, T).mean(), expected)
    _close(model.weight_decay, torch.full((model.n_params,), WEIGHT_DECAY, dtype=torch.float64))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_per_sample_grads_match_autograd_per_sample(criterion):
    _, model, X, T = _fitted(criterion)
    grads = model.per_sample_grads(model.params, X, T, batch_size=7)
    theta = model.params.clone().requires_grad_(True)
    for i in (0, 13, 29):
        (g,) = torch.autograd.grad(model.losses(theta, X[i:i + 1], T[i:i + 1])[0], theta)
        _close(grads[i], g)


def _dense_ggn_reference(model, X, T):
    J = jacrev(lambda th: model.forward(th, X))(model.params)  # (N, K, P)
    H = model.loss.output_hessian(model.forward(model.params, X), T)
    G = torch.einsum("nkp,nkl,nlq->pq", J, H, J) / X.shape[0]
    return G + torch.diag(model.weight_decay) + DAMPING * torch.eye(model.n_params, dtype=torch.float64)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_curvature_products_against_dense_reference(criterion, kind):
    _, model, X, T = _fitted(criterion)
    if kind == "ggn":
        reference = _dense_ggn_reference(model, X, T)
    else:
        reference = hessian(lambda th: model.objective(th, X, T))(model.params)
        reference = reference + DAMPING * torch.eye(model.n_params, dtype=torch.float64)
    curvature = Curvature(model, X, T, kind=kind, damping=DAMPING, batch_size=11)
    V = torch.randn(5, model.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _close(curvature.matmat(V), V @ reference.T)
    _close(curvature.matvec(V[0]), reference @ V[0])
    _close(curvature.dense(), reference)


@pytest.mark.parametrize("criterion", ["MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"])
def test_ggn_equals_hessian_for_a_linear_model(criterion):
    _, model, X, T = _fitted(criterion, hidden=6)
    linear = torch.nn.Linear(X.shape[1], model.forward(model.params, X).shape[1]).double()
    lin_model = FunctionalModel(linear, model.loss, [WEIGHT_DECAY, WEIGHT_DECAY],
                                flatten_output=model.flatten_output)
    ggn = Curvature(lin_model, X, T, kind="ggn").dense()
    hess = Curvature(lin_model, X, T, kind="hessian").dense()
    _close(ggn, hess)
    _close(ggn, _dense_ggn_reference(lin_model, X, T) - DAMPING * torch.eye(lin_model.n_params, dtype=torch.float64))


def test_weight_decay_per_parameter_group_and_override():
    X, y = toy_data("MSELoss")
    net = make_net("MSELoss", X.shape[1], optimizer__weight_decay=0.1,
                   optimizer__param_groups=[("*bias", {"weight_decay": 0.0})])
    net.fit(X, y)
    model = FunctionalModel.from_net(net)
    expected = torch.cat([torch.full((p.numel(),), 0.0 if "bias" in n else 0.1, dtype=torch.float64)
                          for n, p in net.module_.named_parameters()])
    _close(model.weight_decay, expected)
    _close(FunctionalModel.from_net(net, weight_decay=0.3).weight_decay,
           torch.full((model.n_params,), 0.3, dtype=torch.float64))


def test_adamw_weight_decay_is_refused_with_advice():
    X, y = toy_data("MSELoss")
    net = make_net("MSELoss", X.shape[1], optimizer=torch.optim.AdamW,
                   optimizer__weight_decay=0.01, max_epochs=1)
    net.fit(X, y)
    with pytest.raises(ValueError, match="decoupled weight decay.*weight_decay=<float>"):
        FunctionalModel.from_net(net)
    assert FunctionalModel.from_net(net, weight_decay=0.0).weight_decay.abs().sum() == 0


def test_batchnorm_with_running_stats_is_frozen_and_batch_stats_refused():
    from skorch import NeuralNetRegressor

    X, y = toy_data("MSELoss")
    module = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                 torch.nn.Linear(5, 3)).double()
    net = NeuralNetRegressor(module, max_epochs=2, verbose=0, train_split=None, lr=0.1)
    net.fit(X, y)
    model = FunctionalModel.from_net(net)
    Xt = torch.as_tensor(X)
    net.module_.eval()
    with torch.no_grad():
        _close(model.forward(model.params, Xt[:1]), net.module_(Xt)[:1])  # per-sample
    bad = torch.nn.Sequential(torch.nn.Linear(4, 5),
                              torch.nn.BatchNorm1d(5, track_running_stats=False)).double()
    with pytest.raises(ValueError, match="batch statistics even in eval mode"):
        FunctionalModel(bad, model.loss, [0.0] * 4)


class _Custom(torch.nn.Module):
    """Nets whose structure the Kronecker route must either handle or detect."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a = torch.nn.Linear(4, 5)
        self.b = torch.nn.Linear(5, 3)
        if case == "tied_weights":  # a second layer sharing a's weight
            self.c = torch.nn.Linear(4, 5, bias=False)
            self.c.weight = self.a.weight
        if case == "rows_not_samples":  # two 2-feature tokens per sample
            self.a = torch.nn.Linear(2, 5)
            self.b = torch.nn.Linear(10, 3)
        if case == "linear_subclass":
            self.a = _Doubled(4, 5)
        if case == "unused_head":
            self.aux = torch.nn.Linear(5, 2)
        self.double()

    def forward(self, x):
        case = self.case
        if case == "rows_not_samples":
            h = torch.tanh(self.a(x.reshape(-1, 2))).reshape(x.shape[0], -1)
            return self.b(h)
        h = torch.tanh(self.a(input=x) if case == "keyword_input" else self.a(x))
        if case == "tied_weights":
            h = h + torch.tanh(self.c(x))
        if case == "weight_outside":
            h = h + x @ self.a.weight.T
        out = self.b(h)
        return (out, self.aux(h)) if case == "unused_head" else out


class _Doubled(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, 2 * self.weight, self.bias)


def _module(case: str) -> torch.nn.Module:
    torch.manual_seed(3)
    if case == "no_bias":
        return torch.nn.Sequential(torch.nn.Linear(4, 5, bias=False), torch.nn.Tanh(),
                                   torch.nn.Linear(5, 3, bias=False)).double()
    if case == "frozen_first":
        module = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                     torch.nn.Linear(5, 3)).double()
        module[0].requires_grad_(False)
        return module
    if case == "three_layers":
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5),
                                   torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False)).double()
    if case == "inplace_relu":  # the in-place op must not change the recorded output
        return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(inplace=True),
                                   torch.nn.Linear(5, 3)).double()
    if case == "layernorm":
        return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5),
                                   torch.nn.Linear(5, 3)).double()
    return _Custom(case)


#: case -> the NotLinearError message of a net the Kronecker route must refuse
#: (None: it handles the net)
STRUCTURE_CASES = {
    "no_bias": None, "frozen_first": None, "three_layers": None, "inplace_relu": None,
    "keyword_input": None, "unused_head": None,
    "layernorm": "nn.Linear layers only", "linear_subclass": "nn.Linear layers only",
    "tied_weights": "shares the parameter", "rows_not_samples": "one row per sample",
    "weight_outside": "do not account for the parameters' gradients",
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_dense_ggn_from_kronecker_structure_matches_the_jacobians(case):
    """Nets of Linear layers take the per-layer Kronecker route, others the Jacobian
    route; both equal the jacrev reference, whatever the bias, freezing, depth, in-place
    activations, shared or outside-used weights and unused outputs."""
    from sklinfluence.curvature.dense_ggn import linear_ggn
    from sklinfluence.exceptions import NotLinearError
    from sklinfluence.model.losses import output_loss_from_criterion

    X, y = toy_data("CrossEntropyLoss", n=23)
    module = _module(case)
    n_tensors = sum(p.requires_grad for p in module.parameters())
    model = FunctionalModel(module, output_loss_from_criterion(torch.nn.CrossEntropyLoss()),
                            [WEIGHT_DECAY] * n_tensors)
    Xt, Tt = torch.as_tensor(X), torch.as_tensor(y)
    curvature = Curvature(model, Xt, Tt, damping=DAMPING, batch_size=7)
    _close(curvature.dense(chunk_size=5), _dense_ggn_reference(model, Xt, Tt))
    refused = STRUCTURE_CASES[case]
    if refused:
        with pytest.raises(NotLinearError, match=refused):
            linear_ggn(model, model.params, Xt, Tt)
    else:
        _close(linear_ggn(model, model.params, Xt, Tt, chunk_size=4),
               curvature._jacobian_ggn(chunk_size=6))
