"""On small MLPs the influence estimate tracks the PBRF, not leave-one-out (Bae et al.).

On digits (below) IF–PBRF agreement is high but IF–LOO is high too (Spearman 0.89):
the contrast needs the setting of ``examples/linear_vs_mlp.py`` (breast cancer,
a 30-32-32-1 MLP trained 200 epochs without weight decay), which is run here
through the example's own functions.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits

from sklinfluence import InfluenceEstimator, LOOEstimator, PBRFEstimator

N_TRAIN, N_REMOVED = 300, 24


class MLP(torch.nn.Sequential):
    def __init__(self, hidden=16):
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                         torch.nn.Linear(hidden, 10))
        self.double()


@pytest.mark.slow
def test_influence_tracks_pbrf_on_an_mlp():
    X, y = load_digits(return_X_y=True)
    X, y = X[:N_TRAIN] / 16.0, y[:N_TRAIN]
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=50, max_epochs=30, iterator_train__shuffle=True,
                              verbose=0)
    removed = np.random.default_rng(0).choice(N_TRAIN, N_REMOVED, replace=False)
    kw = dict(damping=1e-3, random_state=0)
    influence = InfluenceEstimator(net, **kw).fit(X, y).score_samples(X[removed])
    pbrf_est = PBRFEstimator(net, **kw).fit(X, y)
    pbrf = pbrf_est.score_samples(X[removed])
    loo = LOOEstimator(net, random_state=0).fit(X, y).score_samples(X[removed])
    if_pbrf, if_loo = spearmanr(influence, pbrf)[0], spearmanr(influence, loo)[0]
    print(f"\nIF vs PBRF Spearman {if_pbrf:.3f}; IF vs cold-start LOO Spearman {if_loo:.3f} "
          f"({N_REMOVED} removed samples)")
    assert if_pbrf > 0.8
    assert pbrf_est.responder_.last_info["converged"].all()


def _example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def linear_vs_mlp():
    """``examples/linear_vs_mlp.py`` with its defaults: agreement rows by model name."""
    example = _example("linear_vs_mlp")
    X, y, removed = example.load()
    return {name: example.agreement(model, X, y, removed, damping=1e-2, random_state=0)[0]
            for name, model in example.models().items()}


@pytest.mark.slow
def test_influence_tracks_pbrf_and_not_loo_on_an_mlp(linear_vs_mlp):
    """Both halves of the paper's finding. Measured with the example's defaults at
    ``--random-state`` 0–5 (data subsample, removed rows, init and LOO seed all change):
    IF–PBRF Spearman ≥ 0.999 every time, IF–LOO Spearman −0.31, 0.00, 0.06, 0.02,
    0.44, 0.62. The bounds hold for all six; at seed 0 (run here) with a wide margin."""
    mlp = linear_vs_mlp["MLP 30-32-32-1"]
    assert mlp["IF–PBRF Spearman"] > 0.99 and mlp["IF–PBRF Pearson"] > 0.99
    assert mlp["IF–LOO Spearman"] < 0.7
    assert mlp["IF–PBRF Spearman"] - mlp["IF–LOO Spearman"] > 0.35


@pytest.mark.slow
def test_linear_vs_mlp_figures_quoted_in_the_readme(linear_vs_mlp):
    """README: "IF–LOO and IF–PBRF agreement ≥ 0.998 for LogisticRegression; for an
    MLP IF–PBRF Spearman 1.000 but IF–LOO Spearman −0.31" (the example's defaults;
    measured: LogisticRegression 0.9988–0.9998, the lowest IF–LOO Spearman)."""
    linear, mlp = linear_vs_mlp["LogisticRegression(C=1)"], linear_vs_mlp["MLP 30-32-32-1"]
    assert min(linear.values()) >= 0.998, linear
    assert f"{mlp['IF–PBRF Spearman']:.3f}" == "1.000"
    assert f"{mlp['IF–LOO Spearman']:.2f}" == "-0.31"
