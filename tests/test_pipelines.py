"""A Pipeline never drops a choice: scorers, ``score``'s keywords, the LDS scorer and
the methods a Pipeline does not forward give, through a pipeline, what the bare
estimator gives on transformed data — with scikit-learn's metadata routing on or
off — and a wrong or dropped choice is an error, never a silent default."""

import numpy as np
import pytest
import sklearn
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nets import make_net, toy_data
from sklinfluence import (InfluenceEstimator, LinearDatamodelingScore, PipelineView,
                          RemovalSplit, agreement_scorer, lds_scorer)

DAMPINGS = [0.05, 0.5, 5.0]


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=40)
    X = X * 3.0 + 1.0  # something for the scaler to do
    return X, y, StandardScaler().fit_transform(X)


def _estimator(**kwargs):
    return InfluenceEstimator(make_net("CrossEntropyLoss", 4), random_state=0, **kwargs)


def _routing(on):
    return sklearn.config_context(enable_metadata_routing=on)


@pytest.mark.parametrize("routing", [False, True])
def test_grid_search_through_a_pipeline_scores_as_the_bare_estimator(data, routing):
    """The search of the report: the PBRF agreement per damping through
    ``make_pipeline(StandardScaler(), InfluenceEstimator)`` equals the bare
    estimator's on the scaled rows, and differs from the default (leave-one-out)
    reference's — the number the dropped keyword used to give."""
    X, y, Xs = data
    cv = RemovalSplit(n_remove=8, random_state=0)
    scoring = agreement_scorer(reference="pbrf", metric="pearson")
    with _routing(routing):
        piped = GridSearchCV(make_pipeline(StandardScaler(), _estimator()),
                             {"influenceestimator__damping": DAMPINGS}, cv=cv,
                             scoring=scoring).fit(X, y)
        bare = GridSearchCV(_estimator(), {"damping": DAMPINGS}, cv=cv,
                            scoring=scoring).fit(Xs, y)
    got = piped.cv_results_["mean_test_score"]
    assert_allclose(got, bare.cv_results_["mean_test_score"], rtol=1e-12)
    loo = GridSearchCV(_estimator(), {"damping": DAMPINGS}, cv=cv).fit(Xs, y)
    assert not np.allclose(got, loo.cv_results_["mean_test_score"])


def test_pipeline_score_keywords_are_passed_with_routing_and_refused_without(data):
    X, y, Xs = data
    pipe = make_pipeline(StandardScaler(), _estimator(damping=0.5)).fit(X, y)
    bare = _estimator(damping=0.5).fit(Xs, y)
    expected = bare.score(Xs[:8], y[:8], reference="pbrf", metric="pearson")
    with _routing(True):
        got = pipe.score(X[:8], y[:8], reference="pbrf", metric="pearson")
        assert got == pytest.approx(expected, rel=1e-12)
        with pytest.raises(ValueError, match="reference must be one of"):
            pipe.score(X[:8], y[:8], reference="bogus")
    with pytest.raises(TypeError, match=r"dropped the keyword arguments \['reference'\]"):
        pipe.score(X[:8], y[:8], reference="bogus")
    with pytest.raises(TypeError, match="metadata routing"):
        pipe.score(X[:8], y[:8], reference="pbrf")
    assert PipelineView(pipe).score(X[:8], y[:8], reference="pbrf", metric="pearson") == \
        pytest.approx(expected, rel=1e-12)
    assert pipe.score(X[:8], y[:8]) == pytest.approx(bare.score(Xs[:8], y[:8]), rel=1e-12)


def test_pipeline_view_gives_every_method_on_transformed_rows(data):
    X, y, Xs = data
    pipe = make_pipeline(StandardScaler(), make_pipeline(_estimator(damping=0.1))).fit(X, y)
    bare = _estimator(damping=0.1).fit(Xs, y)
    view = PipelineView(pipe)
    assert view.estimator is pipe[-1][-1]
    assert_allclose(view.loss_change(X[:5], y[:5], X[-3:], y[-3:]),
                    bare.loss_change(Xs[:5], y[:5], Xs[-3:], y[-3:]), rtol=1e-12)
    assert_allclose(view.param_change(X[:4]), bare.param_change(Xs[:4]), rtol=1e-12)
    assert_allclose(view.score_samples(X[:4], groups=[0, 1, 0, 1]),
                    bare.score_samples(Xs[:4], groups=[0, 1, 0, 1]), rtol=1e-12)
    top, top_bare = view.most_influential(X[-3:], y[-3:], n_top=4), \
        bare.most_influential(Xs[-3:], y[-3:], n_top=4)
    assert_array_equal(top.proponents, top_bare.proponents)
    assert_allclose(top.opponent_scores, top_bare.opponent_scores, rtol=1e-12)
    mine = view.most_self_influential(3, X=X[:9], y=y[:9])
    assert_array_equal(mine.indices, bare.most_self_influential(3, X=Xs[:9], y=y[:9]).indices)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        PipelineView(make_pipeline(StandardScaler(), _estimator()))


@pytest.mark.parametrize("routing", [False, True])
def test_lds_scorer_on_a_fitted_pipeline(data, routing):
    """``lds_scorer`` scores a pipeline by its final step (fitted on the transformed
    rows, as its reference): the bare estimator's LDS, not ``nan``."""
    X, y, Xs = data
    lds = LinearDatamodelingScore(make_net("CrossEntropyLoss", 4), n_subsets=6,
                                  random_state=0).fit(Xs, y, Xs[-6:], y[-6:])
    scorer = lds_scorer(lds)
    with _routing(routing):
        pipe = make_pipeline(StandardScaler(), _estimator(damping=0.1)).fit(X, y)
        got = scorer(pipe, X, y)
    expected = scorer(_estimator(damping=0.1).fit(Xs, y), Xs, y)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-12)
