"""On a small MLP the influence estimate tracks the PBRF, not leave-one-out (Bae et al.)."""

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
