"""Output losses against the torch criteria and closed-form Hessians/Bregman divergences."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from sklinfluence.model.losses import SUPPORTED_CRITERIA, output_loss_from_criterion
from tolerances import CLOSED_FORM_ATOL, CLOSED_FORM_RTOL

N, K = 7, 4


def _data(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(N, K, generator=g, dtype=torch.float64)
    y2 = torch.randn(N, K, generator=g, dtype=torch.float64)
    if name == "MSELoss":
        t = torch.randn(N, K, generator=g, dtype=torch.float64)
    elif name == "BCEWithLogitsLoss":
        t = (torch.rand(N, K, generator=g) > 0.5).double()
    else:
        t = torch.randint(0, K, (N,), generator=g)
    if name == "NLLLoss":  # skorch's classifier feeds probabilities
        y, y2 = torch.softmax(y, -1), torch.softmax(y2, -1)
    return y, y2, t


def _criterion(name):
    return getattr(torch.nn, name)()


def _close(a, b):
    assert_allclose(np.asarray(a), np.asarray(b), rtol=CLOSED_FORM_RTOL, atol=CLOSED_FORM_ATOL)


@pytest.mark.parametrize("name", SUPPORTED_CRITERIA)
def test_mean_of_per_sample_losses_is_the_criterion(name):
    y, _, t = _data(name)
    loss = output_loss_from_criterion(_criterion(name), nll_takes_probabilities=True)
    per_sample = loss(y, t)
    assert per_sample.shape == (N,)
    crit_in = torch.log(y + torch.finfo(y.dtype).eps) if name == "NLLLoss" else y
    _close(per_sample.mean(), _criterion(name)(crit_in, t))


def _expected_hessian(name, y, t):
    if name == "MSELoss":  # mean over K outputs: L = (1/K)‖y − t‖²
        return torch.eye(K, dtype=y.dtype).expand(N, K, K) * (2.0 / K)
    if name == "CrossEntropyLoss":
        p = torch.softmax(y, -1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if name == "NLLLoss":
        eps = torch.finfo(y.dtype).eps
        e = torch.nn.functional.one_hot(t, K).double()
        pt = (y * e).sum(-1)
        return e[:, :, None] * e[:, None, :] / (pt + eps)[:, None, None] ** 2
    s = torch.sigmoid(y)  # BCE, mean over K outputs
    return torch.diag_embed(s * (1 - s)) / K


@pytest.mark.parametrize("name", SUPPORTED_CRITERIA)
def test_output_hessian_closed_form(name):
    y, _, t = _data(name)
    loss = output_loss_from_criterion(_criterion(name), nll_takes_probabilities=True)
    _close(loss.output_hessian(y, t), _expected_hessian(name, y, t))


def test_bce_pos_weight_hessian():
    y, _, t = _data("BCEWithLogitsLoss")
    pw = torch.linspace(0.5, 3.0, K, dtype=torch.float64)
    loss = output_loss_from_criterion(torch.nn.BCEWithLogitsLoss(pos_weight=pw))
    s = torch.sigmoid(y)
    expected = torch.diag_embed((pw * t + 1 - t) * s * (1 - s)) / K
    _close(loss.output_hessian(y, t), expected)


def _expected_bregman(name, y, y_ref, t):
    if name == "MSELoss":
        return ((y - y_ref) ** 2).mean(-1)
    if name == "CrossEntropyLoss":  # KL(softmax(y') ‖ softmax(y))
        p_ref, logp, logp_ref = torch.softmax(y_ref, -1), torch.log_softmax(y, -1), torch.log_softmax(y_ref, -1)
        return (p_ref * (logp_ref - logp)).sum(-1)
    if name == "BCEWithLogitsLoss":  # Bernoulli KL(σ(y') ‖ σ(y)), mean over outputs
        q, p = torch.sigmoid(y_ref), torch.sigmoid(y)
        return (q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))).mean(-1)
    eps = torch.finfo(y.dtype).eps  # NLL on probabilities: -log(p_t + eps) is convex in p
    pt = y.gather(1, t[:, None])[:, 0] + eps
    qt = y_ref.gather(1, t[:, None])[:, 0] + eps
    return -torch.log(pt) + torch.log(qt) + (pt - qt) / qt


@pytest.mark.parametrize("name", SUPPORTED_CRITERIA)
def test_bregman_closed_form_nonnegative_and_zero_at_centre(name):
    y, y_ref, t = _data(name)
    loss = output_loss_from_criterion(_criterion(name), nll_takes_probabilities=True)
    d = loss.bregman(y, y_ref, t)
    _close(d, _expected_bregman(name, y, y_ref, t))
    assert bool((d >= 0).all())
    _close(loss.bregman(y_ref, y_ref, t), torch.zeros(N, dtype=torch.float64))


def test_cross_entropy_label_smoothing_is_mirrored():
    y, _, t = _data("CrossEntropyLoss")
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.2)
    _close(output_loss_from_criterion(crit)(y, t).mean(), crit(y, t))


@pytest.mark.parametrize(
    "criterion, fragment",
    [
        (torch.nn.L1Loss(), "supported criteria are MSELoss"),
        (torch.nn.MSELoss(reduction="sum"), "reduction='mean'"),
        (torch.nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
    ],
)
def test_unsupported_criteria_raise_clear_errors(criterion, fragment):
    with pytest.raises(ValueError, match=fragment):
        output_loss_from_criterion(criterion)
