"""scikit-learn's common estimator checks over the public estimators."""

import torch
from skorch import NeuralNetRegressor
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklinfluence import (Decomposer, InfluenceEstimator, LinearDatamodelingScore, LOOEstimator,
                          PBRFEstimator)


class AnyWidthMLP(torch.nn.Module):
    """A float64 MLP whose input width is inferred on first use (the checks vary it)."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.LazyLinear(hidden, dtype=torch.float64),
                                        torch.nn.Tanh(),
                                        torch.nn.Linear(hidden, 1, dtype=torch.float64))

    def forward(self, X):
        return self.body(X)


def _net():
    return NeuralNetRegressor(AnyWidthMLP, max_epochs=2, lr=0.05, batch_size=64, verbose=0)


#: Expected failures, each with the reason it cannot pass.
EXPECTED_FAILED_CHECKS: dict = {
    "Decomposer": {
        "check_fit_idempotent": (
            "transform removes samples from the training set: the leave-one-out rungs "
            "retrain without the sample, so rows not seen in fit (the check's test split, "
            "passed without targets) have no defined response and raise a clear error."),
        "check_transformer_n_iter": (
            "max_iter caps the CG solves that transform runs for the practical influence "
            "rung; fit runs no iterative solver, so there is no n_iter_ to report."),
    },
}


@parametrize_with_checks(
    [InfluenceEstimator(_net(), random_state=0),
     # the checks' data sets are tiny (ε = 1/N large): damping keeps the PBRF convex
     PBRFEstimator(_net(), damping=1.0, random_state=0),
     LOOEstimator(_net(), random_state=0),
     LOOEstimator(_net(), warm_start=True, proximal=True, random_state=0),
     Decomposer(_net(), damping=1.0, random_state=0),
     LinearDatamodelingScore(_net(), n_subsets=2, random_state=0)],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}),
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
