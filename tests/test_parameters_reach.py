"""Every estimator parameter that sets the response context reaches it under its
own name: a parameter read under another spelling would silently take the
context's default, which these non-default values would expose."""

import pytest

from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator
from sklinfluence.datamodeling import LinearDatamodelingScore
from sklinfluence.utils.execution import DiskStore

EXECUTION = dict(damping=0.37, n_jobs=1, removal_batch_size=3, batch_size=7)


@pytest.mark.parametrize("cls", [PBRFEstimator, LOOEstimator, Decomposer])
def test_execution_parameters_reach_the_context(cls, tmp_path):
    X, y = toy_data("MSELoss", n=12)
    est = cls(make_net("MSELoss", 4, max_epochs=1), memory=str(tmp_path), random_state=0,
              **EXECUTION).fit(X, y)
    ctx = est.responder_.context
    assert (ctx.damping, ctx.n_jobs, ctx.removal_batch_size, ctx.batch_size) == (
        0.37, 1, 3, 7)
    assert isinstance(ctx.store, DiskStore)


def test_lds_execution_parameters_reach_the_context(tmp_path, monkeypatch):
    import sklinfluence.datamodeling as datamodeling

    seen = []
    original = datamodeling.LinearDatamodelingScore._context
    monkeypatch.setattr(datamodeling.LinearDatamodelingScore, "_context",
                        lambda self, **kw: seen.append(original(self, **kw)) or seen[-1])
    X, y = toy_data("MSELoss", n=12)
    LinearDatamodelingScore(make_net("MSELoss", 4, max_epochs=1), n_subsets=2,
                            memory=str(tmp_path), random_state=0,
                            **EXECUTION).fit(X, y)
    ctx = seen[0]
    assert (ctx.damping, ctx.n_jobs, ctx.removal_batch_size, ctx.batch_size) == (
        0.37, 1, 3, 7)
    assert isinstance(ctx.store, DiskStore)


@pytest.mark.parametrize("cls", [InfluenceEstimator, PBRFEstimator])
def test_epsilon_reaches_the_fit(cls):
    X, y = toy_data("MSELoss", n=12)
    est = cls(make_net("MSELoss", 4, max_epochs=1), damping=0.37, epsilon=-0.25,
              random_state=0).fit(X, y)
    assert est.epsilon_ == -0.25 and est.responder_.context.epsilon == -0.25
    assert est.responder_.context.damping == 0.37
