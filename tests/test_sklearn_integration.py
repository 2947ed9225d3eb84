"""Pipelines, parameters, cloning and grid search over the damping."""

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nets import make_net, toy_data
from sklinfluence import (Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator,
                          RemovalSplit, agreement_scorer)
from sklinfluence.response.responder import RESPONSE_CACHE


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=40)
    return X * 3.0 + 1.0, y  # something for the scaler to do


@pytest.mark.parametrize("make", [
    lambda: InfluenceEstimator(make_net("CrossEntropyLoss", 4), random_state=0),
    lambda: PBRFEstimator(make_net("CrossEntropyLoss", 4), damping=0.5, random_state=0),
    lambda: LOOEstimator(make_net("CrossEntropyLoss", 4), random_state=0),
])
def test_pipeline_scores_match_the_estimator_on_transformed_rows(data, make):
    X, y = data
    pipe = make_pipeline(StandardScaler(), make()).fit(X, y)
    Xs = StandardScaler().fit_transform(X)
    direct = make().fit(Xs, y)
    assert_allclose(pipe.score_samples(X[:6]), direct.score_samples(Xs[:6]), rtol=1e-12)
    assert np.isfinite(pipe.score(X[:6], y[:6]))


def test_decomposer_as_a_pipeline_step_with_pandas_output(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), Decomposer(make_net("CrossEntropyLoss", 4),
                                                      damping=0.5, random_state=0))
    pipe.set_output(transform="pandas")
    frame = pipe.fit(X, y).transform(X[:3])
    assert isinstance(frame, pd.DataFrame) and frame.shape == (3, 5)
    assert list(frame.columns)[0] == "warm_start_gap"


def test_nested_net_parameters_and_clone(data):
    X, y = data
    est = InfluenceEstimator(make_net("CrossEntropyLoss", 4), damping=1e-2)
    params = est.get_params()
    assert params["net__lr"] == 0.1 and params["net__module__hidden"] == 6
    est.set_params(net__lr=0.05, net__module__hidden=3)
    assert est.net.lr == 0.05
    copy = clone(est)
    assert copy.get_params()["net__module__hidden"] == 3 and copy.net is not est.net
    copy.fit(X, y)
    assert copy.model_.n_params == 4 * 3 + 3 + 3 * 3 + 3
    assert not hasattr(est, "model_")


def test_grid_search_over_damping_runs_end_to_end_and_shares_the_reference(data):
    X, y = data
    search = GridSearchCV(InfluenceEstimator(make_net("CrossEntropyLoss", 4), random_state=0),
                          {"damping": [1e-3, 1e-1, 10.0]},
                          cv=RemovalSplit(n_remove=8, random_state=0))
    search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and np.all(scores <= 1.0)
    assert search.best_params_["damping"] == [1e-3, 1e-1, 10.0][int(np.argmax(scores))]
    assert len(RESPONSE_CACHE) == 8  # the LOO reference was retrained once per sample

    pbrf = GridSearchCV(InfluenceEstimator(make_net("CrossEntropyLoss", 4), random_state=0),
                        {"damping": [0.5, 5.0]}, cv=RemovalSplit(n_remove=8, random_state=0),
                        scoring=agreement_scorer(reference="pbrf", metric="pearson"))
    pbrf.fit(X, y)
    assert np.all(pbrf.cv_results_["mean_test_score"] > 0.9)  # IF tracks the PBRF


def test_linear_baseline_grid_search_prefers_no_damping():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:150]
    y = y[:150]
    search = GridSearchCV(InfluenceEstimator(Ridge(alpha=1.0)), {"damping": [0.0, 0.1, 10.0]},
                          cv=RemovalSplit(n_remove=40, random_state=0),
                          scoring=agreement_scorer(metric="pearson")).fit(X, y)
    assert search.best_params_["damping"] == 0.0
    assert search.best_score_ > 0.99


def test_removal_split_and_scorer_validation():
    splits = list(RemovalSplit(n_splits=3, n_remove=0.25, random_state=1).split(np.zeros((20, 1))))
    assert len(splits) == 3
    for train, remove in splits:
        assert_array_equal(train, np.arange(20)) and len(remove) == 5
    with pytest.raises(ValueError, match="n_remove"):
        list(RemovalSplit(n_remove=1).split(np.zeros((20, 1))))
    with pytest.raises(ValueError, match="reference must be one of"):
        agreement_scorer(reference="oracle")
