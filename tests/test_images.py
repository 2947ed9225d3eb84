"""Images as images: every estimator, the Decomposer, groups, row look-ups and the
command line take ``X`` of shape ``(n, 1, 8, 8)`` when the wrapped net does, with
answers equal to those of the flattened equivalent (the same module behind an
``nn.Unflatten``); rows of the wrong shape get an error that says what was expected."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from torch import nn

from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator
from sklinfluence.cli import main


class Conv(nn.Sequential):
    """Conv2d–Tanh–Linear on 8×8 images; ``flat=True`` takes the 64 pixels as a row."""

    def __init__(self, flat=False):
        layers = [nn.Unflatten(1, (1, 8, 8))] if flat else []
        layers += [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)]
        super().__init__(*layers)
        self.double()


def _net(flat):
    return NeuralNetClassifier(Conv, module__flat=flat, criterion=nn.CrossEntropyLoss,
                               max_epochs=4, lr=0.2, batch_size=16, train_split=None,
                               optimizer__weight_decay=1e-3, verbose=0)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    X, y = X[keep][:40] / 16.0, y[keep][:40]
    return X, X.reshape(-1, 1, 8, 8), y


@pytest.mark.parametrize("make", [
    lambda flat: InfluenceEstimator(_net(flat), damping=0.2, random_state=0),
    lambda flat: InfluenceEstimator(_net(flat), damping=0.2, solver="kernel",
                                    random_state=0),
    lambda flat: PBRFEstimator(_net(flat), damping=0.2, random_state=0),
    lambda flat: LOOEstimator(_net(flat), random_state=0),
], ids=["influence", "influence-kernel", "pbrf", "loo"])
def test_images_give_the_flattened_answers(digits, make):
    flat_X, images, y = digits
    flat = make(True).fit(flat_X, y)
    image = make(False).fit(images, y)
    assert image.input_shape_ == (1, 8, 8) and flat.input_shape_ == (64,)
    assert_allclose(image.score_samples(images[:5]), flat.score_samples(flat_X[:5]),
                    rtol=1e-10)
    groups = [0, 1, 0, 1, 2]
    assert_allclose(image.score_samples(images[:5], groups=groups),
                    flat.score_samples(flat_X[:5], groups=groups), rtol=1e-10)
    assert_allclose(image.loss_change(images[:3], y[:3], images[-2:] * 0.9, y[-2:]),
                    flat.loss_change(flat_X[:3], y[:3], flat_X[-2:] * 0.9, y[-2:]),
                    rtol=1e-10, atol=1e-14)


def test_the_decomposer_on_images(digits):
    flat_X, images, y = digits
    flat = Decomposer(_net(True), damping=0.2, random_state=0).fit(flat_X, y)
    image = Decomposer(_net(False), damping=0.2, random_state=0).fit(images, y)
    assert_allclose(image.transform(images[:3]), flat.transform(flat_X[:3]), rtol=1e-8,
                    atol=1e-12)


def test_rows_of_the_wrong_shape_are_refused(digits):
    _, images, y = digits
    est = InfluenceEstimator(_net(False), damping=0.2, random_state=0).fit(images, y)
    with pytest.raises(ValueError, match=r"rows of shape \(8, 8\), but the net was fitted "
                                         r"on rows of shape \(1, 8, 8\)"):
        est.score_samples(images[:3, 0], y[:3])
    with pytest.raises(ValueError, match="X_eval has rows of shape"):
        est.loss_change(images[:3], y[:3], images[:2].reshape(2, 1, 4, 16), y[:2])


def test_the_command_line_reads_images_from_npz(digits, tmp_path, capsys):
    """``--data FILE.npz`` with ``X`` of shape ``(n, 1, 8, 8)``: the MLP flattens
    the images and the ranking equals that of the same pixels as flat rows."""
    flat_X, images, y = digits
    np.savez(tmp_path / "images.npz", X=images, y=y)
    np.savez(tmp_path / "flat.npz", X=flat_X, y=y)
    common = ["rank", "--method", "if", "--epochs", "3", "--top", "5", "--quiet"]
    main(common + ["--data", str(tmp_path / "images.npz"), "--output", str(tmp_path / "a")])
    main(common + ["--data", str(tmp_path / "flat.npz"), "--output", str(tmp_path / "b")])
    a = (tmp_path / "a" / "rank.csv").read_text()
    b = (tmp_path / "b" / "rank.csv").read_text()
    assert a == b and len(a.splitlines()) == 41
