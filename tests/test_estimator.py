"""InfluenceEstimator's user contract: fitting, targets, look-up, errors, reproducibility."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.dataset import ValidSplit
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator

from nets import CRITERIA, make_net, mlp, toy_data
from sklinfluence import InfluenceEstimator
from tolerances import CLOSED_FORM_ATOL, CLOSED_FORM_RTOL, FLOAT32_RTOL


def _close(a, b):
    assert_allclose(a, b, rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL)


def _theta(net):
    return torch.cat([p.detach().reshape(-1) for p in net.module_.parameters()])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_fit_trains_a_clone_and_outputs_are_consistent(criterion):
    X, y = toy_data(criterion)
    net = make_net(criterion, X.shape[1], train_split=ValidSplit(5))  # skorch's default
    est = InfluenceEstimator(net, random_state=0).fit(X, y)
    assert not getattr(net, "initialized_", False)  # the given net is left alone
    assert est.net_.train_split is None and est.n_train_ == len(X)
    delta = est.param_change(X[:6])
    grads = est.model_.per_sample_grads(est.model_.params, est.X_train_, est.T_train_).numpy()
    assert delta.shape == (6, est.model_.n_params)
    # all three outputs are views of the same Δθ
    _close(est.score_samples(X[:6]), (grads[:6] * delta).sum(1))
    _close(est.loss_change(X[:6], None, X[10:13], y[10:13]), delta @ grads[10:13].T)
    assert np.all(est.score_samples(X) > 0)


def test_loss_change_is_symmetric_whichever_side_is_solved():
    X, y = toy_data("CrossEntropyLoss")
    est = InfluenceEstimator(make_net("CrossEntropyLoss", X.shape[1]), random_state=0).fit(X, y)
    a, b = est.loss_change(X[:3], None, X[5:20]), est.loss_change(X[5:20], None, X[:3])
    _close(a, b.T)


def test_frozen_net_is_used_without_retraining():
    X, y = toy_data("MSELoss")
    net = make_net("MSELoss", X.shape[1]).fit(X, y)
    before = _theta(net).clone()
    est = InfluenceEstimator(FrozenEstimator(net)).fit(X, y)
    assert est.net_ is net
    assert_array_equal(_theta(net), before)
    assert_array_equal(est.model_.params, before)


def test_random_state_reproduces_and_leaves_global_rng_alone():
    X, y = toy_data("CrossEntropyLoss")
    net = make_net("CrossEntropyLoss", X.shape[1])
    state = torch.get_rng_state()
    s1 = InfluenceEstimator(net, random_state=3).fit(X, y).score_samples(X)
    assert torch.equal(torch.get_rng_state(), state)
    s2 = InfluenceEstimator(net, random_state=3).fit(X, y).score_samples(X)
    s3 = InfluenceEstimator(net, random_state=4).fit(X, y).score_samples(X)
    assert_array_equal(s1, s2)
    assert not np.allclose(s1, s3)


def test_y_none_looks_up_training_rows_and_unknown_rows_raise():
    X, y = toy_data("CrossEntropyLoss")
    est = InfluenceEstimator(make_net("CrossEntropyLoss", X.shape[1]), random_state=0).fit(X, y)
    order = [7, 2, 7, 30]
    _close(est.score_samples(X[order]), est.score_samples(X[order], y[order]))
    with pytest.raises(ValueError, match=r"1 of the 2 rows of X are not training rows.*y=\.\.\."):
        est.score_samples(np.vstack([X[0], X[0] + 1e-3]))
    with pytest.raises(ValueError, match="X_eval.*not training rows"):
        est.loss_change(X[:2], None, X[:1] + 1.0)
    # a new row with its target is fine
    assert est.score_samples(X[:1] + 1.0, y[:1]).shape == (1,)


def test_regression_accepts_1d_targets():
    X, y = toy_data("MSELoss", n_out=1)
    net = make_net("MSELoss", X.shape[1], n_out=1, lr=0.05)
    one_d = InfluenceEstimator(net, random_state=0).fit(X, y[:, 0])
    two_d = InfluenceEstimator(net, random_state=0).fit(X, y)
    assert_array_equal(one_d.score_samples(X), two_d.score_samples(X))
    _close(one_d.score_samples(X[:4], y[:4, 0]), two_d.score_samples(X[:4], y[:4]))


def test_string_class_labels_and_unknown_labels():
    X, y = toy_data("CrossEntropyLoss")
    names = np.array(["cat", "dog", "emu"])[y]
    est = InfluenceEstimator(make_net("CrossEntropyLoss", X.shape[1]), random_state=0)
    est.fit(X, names)
    assert_array_equal(est.classes_, ["cat", "dog", "emu"])
    by_int = InfluenceEstimator(make_net("CrossEntropyLoss", X.shape[1]), random_state=0).fit(X, y)
    assert_array_equal(est.score_samples(X, names), by_int.score_samples(X))
    with pytest.raises(ValueError, match="labels not seen in fit.*gnu"):
        est.score_samples(X[:2], ["cat", "gnu"])


def test_float32_module_agrees_with_float64():
    X, y = toy_data("CrossEntropyLoss")
    torch.manual_seed(0)
    m64 = mlp(X.shape[1], 3)
    m32 = mlp(X.shape[1], 3).float()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    kw = dict(criterion=torch.nn.CrossEntropyLoss, verbose=0)
    net64 = NeuralNetClassifier(m64, **kw).initialize()
    net32 = NeuralNetClassifier(m32, **kw).initialize()
    s64 = InfluenceEstimator(FrozenEstimator(net64)).fit(X, y).score_samples(X)
    s32 = InfluenceEstimator(FrozenEstimator(net32)).fit(X, y).score_samples(X)
    assert s32.dtype == np.float64
    assert_allclose(s32, s64, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * s64.max())


def test_nll_loss_on_logits_is_refused_with_a_hint():
    X, y = toy_data("CrossEntropyLoss")
    net = NeuralNetClassifier(mlp(X.shape[1], 3), max_epochs=1, verbose=0)  # NLLLoss default
    with pytest.raises(ValueError, match="expects the module to output probabilities"):
        InfluenceEstimator(net, random_state=0).fit(X, y)


def test_overridden_get_loss_is_detected():
    class Scaled(NeuralNetRegressor):
        def get_loss(self, y_pred, y_true, *args, **kwargs):
            return 3.0 * super().get_loss(y_pred, y_true, *args, **kwargs)

    X, y = toy_data("MSELoss")
    net = Scaled(mlp(X.shape[1], 3), max_epochs=1, verbose=0)
    with pytest.raises(ValueError, match="does not model"):
        InfluenceEstimator(net, random_state=0).fit(X, y)


@pytest.mark.parametrize(
    "make, fit_args, error, fragment",
    [
        (lambda: InfluenceEstimator(make_net("MSELoss", 4, criterion=torch.nn.L1Loss)),
         "ok", ValueError, "supported criteria are MSELoss"),
        (lambda: InfluenceEstimator("not a net"), "ok", TypeError, "skorch NeuralNet"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4), damping=-1.0), "ok",
         ValueError, "damping"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4), solver="lu"), "ok",
         ValueError, "solver"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4), epsilon=0.0), "ok",
         ValueError, "epsilon must be non-zero"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4), epsilon=2.0), "ok",
         ValueError, "epsilon"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4)), "nan", ValueError, "NaN"),
        (lambda: InfluenceEstimator(make_net("MSELoss", 4)), "short_y", ValueError,
         "inconsistent numbers of samples"),
        (lambda: InfluenceEstimator(FrozenEstimator(make_net("MSELoss", 4))), "ok",
         ValueError, "needs an already fitted net"),
    ],
)
def test_bad_input_raises_before_training(make, fit_args, error, fragment):
    X, y = toy_data("MSELoss")
    if fit_args == "nan":
        X = X.copy()
        X[3, 1] = np.nan
    if fit_args == "short_y":
        y = y[:-1]
    with pytest.raises(error, match=fragment):
        make().fit(X, y)


def test_unfitted_estimator_raises_not_fitted():
    X, _ = toy_data("MSELoss")
    with pytest.raises(NotFittedError):
        InfluenceEstimator(make_net("MSELoss", 4)).score_samples(X)
    est = InfluenceEstimator(make_net("MSELoss", 4), random_state=0).fit(*toy_data("MSELoss"))
    with pytest.raises(ValueError, match="features"):
        est.score_samples(X[:, :3])
    with pytest.raises(ValueError, match="needs X_eval"):
        est.loss_change(X[:2])
