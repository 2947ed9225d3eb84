"""The architecture zoo: every entry trains on its scikit-learn data, takes digits as
images and as rows alike, states its true parameter count, and runs through
``InfluenceEstimator``; the logistic regression's influence equals its closed form.

Closed form (float64): for logits ``z = W x + b`` and softmax cross-entropy, the
Jacobian of the logits is ``J_i = [I ⊗ x_iᵀ | I]`` (flat parameters: ``W`` row by row,
then ``b``), the gradient of ``L_i`` is ``J_iᵀ (p_i − e_{t_i})`` and the Gauss–Newton
matrix, here also the Hessian, is ``G = (1/N) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i + μI``;
removing row ``m`` moves the parameters by ``ε (G + λI)⁻¹ ∇L_m`` with ``ε = 1/N``.
"""

import re

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.frozen import FrozenEstimator

from sklinfluence import InfluenceEstimator, zoo
from sklinfluence.zoo import ZOO, load_zoo_data, make_zoo_net
from tolerances import CLOSED_FORM_ATOL, CLOSED_FORM_RTOL

DIGITS = [name for name, spec in ZOO.items() if spec.data == "digits"]
#: What ``solver="auto"`` picks at the sizes below: the dense exact solve up to 5,000
#: parameters; the ResNet (5,122) has more, and 40 rows × 10 classes ≤ 5,122 gives the
#: kernel form.
AUTO_SOLVER = {name: "exact" for name in ZOO} | {"resnet": "kernel"}
N_TRAIN, N_INFLUENCE = 80, 40


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def _fit(net, X, y):
    """Fit with the batch order seeded too, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return net.fit(X, y)


@pytest.fixture(scope="module", params=list(ZOO))
def fitted(request):
    name = request.param
    X, y = load_zoo_data(name, n_samples=N_TRAIN)
    return name, X, y, _fit(make_zoo_net(name, max_epochs=3, random_state=0), X, y)


# ------------------------------------------------------------------ the modules themselves
def test_documented_parameter_counts_are_the_true_ones():
    row = re.compile(r"^``(\w+)``\s+:class:`\w+`.*?([\d,]+)$", re.MULTILINE)
    table = dict(row.findall(zoo.__doc__))
    assert set(table) == set(ZOO)
    for name, spec in ZOO.items():
        module = spec.module(**spec.module_kwargs)
        assert _n_params(module) == spec.n_params == int(table[name].replace(",", "")), name
    for cls in {spec.module for spec in ZOO.values()}:
        stated = re.search(r"Parameters at the defaults: ([\d,]+)", cls.__doc__)
        assert stated, f"{cls.__name__}'s docstring states no parameter count"
        assert _n_params(cls()) == int(stated[1].replace(",", "")), cls.__name__
    assert all(500 <= spec.n_params <= 40_000 for spec in ZOO.values())


@pytest.mark.parametrize("name", list(ZOO))
def test_width_is_a_skorch_parameter(name):
    net = make_zoo_net(name)
    default = _n_params(net.initialize().module_)
    narrow = _n_params(net.set_params(module__width=4).initialize().module_)
    assert default == ZOO[name].n_params
    assert narrow == default if name == "logistic" else narrow < default


def test_a_seeded_module_draws_the_same_weights_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = [p.detach().clone() for p in zoo.ResNet(seed=3).parameters()]
    assert torch.equal(torch.random.get_rng_state(), state)
    again = list(make_zoo_net("resnet", random_state=3).initialize().module_.parameters())
    other = list(zoo.ResNet(seed=4).parameters())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_dtype_option():
    for name in ("vgg", "transformer", "autoencoder"):
        module = make_zoo_net(name, dtype="float64").initialize().module_
        tensors = [*module.parameters(), *module.buffers()]
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
    assert next(zoo.MLP(dtype=torch.float32).parameters()).dtype == torch.float32
    for bad in ("float16", None, torch.int64):
        with pytest.raises(ValueError, match="float32' or 'float64'"):
            make_zoo_net("mlp", dtype=bad)


# --------------------------------------------------------------------- training, layouts
def test_every_entry_trains_and_predicts(fitted):
    name, X, y, net = fitted
    losses = net.history[:, "train_loss"]
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    out = net.forward(X).numpy()
    width = {"mlp_diabetes": 1, "autoencoder": 64}.get(name, 10)
    assert out.shape == (N_TRAIN, width) and out.dtype == np.float32 and np.all(np.isfinite(out))
    if ZOO[name].task == "classification":
        assert_allclose(net.predict_proba(X).sum(1), 1, rtol=1e-5)
        assert net.predict(X).shape == (N_TRAIN,)
    else:
        assert net.predict(X).shape == y.shape


def test_images_and_rows_give_identical_outputs(fitted):
    name, X, _, net = fitted
    if name not in DIGITS:  # diabetes rows are not images
        with pytest.raises(ValueError, match=r"expected rows \(n, 10\); got .*\(\d+, 8\)"):
            net.forward(X[:, :8])
        return
    flat, images = X.reshape(len(X), 64), X.reshape(len(X), 1, 8, 8)
    assert_array_equal(net.forward(images).numpy(), net.forward(flat).numpy())


def test_digits_modules_refuse_other_shapes():
    for cls in {ZOO[name].module for name in DIGITS}:
        with pytest.raises(ValueError, match=r"\(n, 64\) or images \(n, 1, 8, 8\).*\(3, 30\)"):
            cls()(torch.zeros(3, 30))


def test_load_zoo_data():
    X, y = load_zoo_data("lenet", n_samples=50, random_state=1)
    assert X.shape == (50, 1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    assert X.min() >= 0 and X.max() <= 1 and set(y) <= set(range(10))
    assert_array_equal(load_zoo_data("mlp", n_samples=50, random_state=1)[0], X.reshape(50, 64))
    X, y = load_zoo_data("autoencoder", images=True, dtype="float64")
    assert X.shape == (1797, 1, 8, 8) and y.shape == (1797, 64) and y.dtype == np.float64
    assert_array_equal(y, X.reshape(-1, 64))
    X, y = load_zoo_data("mlp_diabetes")
    assert X.shape == (442, 10) and y.shape == (442, 1) and y.dtype == np.float32
    assert_allclose([y.mean(), y.std()], [0, 1], atol=1e-5)
    assert_allclose(X.std(0), 1, rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: make_zoo_net("alexnet"), "unknown zoo entry 'alexnet'.*logistic, mlp"),
    (lambda: load_zoo_data("mlp_diabetes", images=True), "no images"),
    (lambda: load_zoo_data("mlp", n_samples=0), "between 1 and 1797"),
    (lambda: zoo.MLP(activation="swish"), "activation must be one of"),
    (lambda: zoo.LeNet(pool="median"), "pool must be 'avg' or 'max'"),
    (lambda: zoo.RowTokenTransformer(width=15), "multiple of heads"),
])
def test_bad_arguments_say_what_was_expected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------ the library
@pytest.mark.parametrize("name", list(ZOO))
def test_influence_estimator_runs_on_every_entry(name):
    X, y = load_zoo_data(name, n_samples=N_INFLUENCE, dtype="float64")
    est = InfluenceEstimator(make_zoo_net(name, max_epochs=3, dtype="float64"),
                             damping=1e-2, random_state=0).fit(X, y)
    assert est.diagnostics_["solver"] == AUTO_SOLVER[name]
    assert est.model_.n_params == ZOO[name].n_params and est.model_.dtype == torch.float64
    scores = est.score_samples(X)
    # ε ∇L_mᵀ (G + λI)⁻¹ ∇L_m with G positive semi-definite: positive
    assert scores.shape == (N_INFLUENCE,) and np.all(np.isfinite(scores)) and np.all(scores > 0)
    matrix = est.loss_change(X[:3], y[:3], X[-2:], y[-2:])
    assert matrix.shape == (3, 2) and np.all(np.isfinite(matrix))
    assert_allclose(np.diag(est.loss_change(X[:3], y[:3], X[:3], y[:3])), scores[:3],
                    rtol=1e-9)
    if name in DIGITS:  # the other layout: the same net, the same answers
        other = X.reshape(len(X), 1, 8, 8) if X.ndim == 2 else X.reshape(len(X), 64)
        flipped = InfluenceEstimator(make_zoo_net(name, max_epochs=3, dtype="float64"),
                                     damping=1e-2, random_state=0).fit(other, y)
        assert flipped.input_shape_ == other.shape[1:]
        assert_allclose(flipped.score_samples(other[:5]), scores[:5], rtol=1e-10)


def _logistic_closed_form(W, b, X, y, mu, damping):
    """Closed-form parameter responses and self-influence of every training row."""
    N, K = len(X), W.shape[0]
    z = X @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    J = np.concatenate([np.einsum("kl,nj->nklj", np.eye(K), X).reshape(N, K, -1),
                        np.broadcast_to(np.eye(K), (N, K, K))], axis=2)  # (N, K, P)
    H = np.einsum("nk,kl->nkl", p, np.eye(K)) - p[:, :, None] * p[:, None, :]
    G = J.reshape(N * K, -1).T @ (H @ J).reshape(N * K, -1) / N + mu * np.eye(J.shape[2])
    grads = np.einsum("nkp,nk->np", J, p - np.eye(K)[y])
    delta = np.linalg.solve(G + damping * np.eye(len(G)), grads.T).T / N
    return delta, (delta * grads).sum(1), grads


@pytest.mark.parametrize("solver, curvature", [("exact", "ggn"), ("exact", "hessian"),
                                               ("kernel", "ggn")])
def test_logistic_influence_is_its_closed_form(solver, curvature):
    mu, damping = 1e-3, 1e-2
    X, y = load_zoo_data("logistic", n_samples=100, dtype="float64")
    net = _fit(make_zoo_net("logistic", max_epochs=5, weight_decay=mu, dtype="float64",
                            random_state=0), X, y)
    est = InfluenceEstimator(FrozenEstimator(net), damping=damping, solver=solver,
                             curvature=curvature).fit(X, y)
    W, b = (p.detach().numpy() for p in net.module_.linear.parameters())
    delta, self_influence, grads = _logistic_closed_form(W, b, X, y, mu, damping)
    assert np.linalg.norm(grads.mean(0) + mu * np.r_[W.ravel(), b]) > 1e-3  # not a minimum

    def close(actual, expected):
        scale = max(np.abs(expected).max(), 1.0)
        assert_allclose(actual, expected, rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL * scale)

    close(est.param_change(X[:10], y[:10]), delta[:10])
    close(est.score_samples(X), self_influence)
    close(est.loss_change(X[:10], y[:10], X[-4:], y[-4:]), delta[:10] @ grads[-4:].T)
