"""Warnings point at the caller's line and name what they are about."""

import inspect
import os
import threading
import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetRegressor

from nets import make_net, toy_data
from sklinfluence import InfluenceEstimator, PBRFEstimator, RemovalSplit, agreement_scorer
from sklinfluence.utils import _warnings


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=30)
    return X, y, make_net("CrossEntropyLoss", 4, max_epochs=4).fit(X, y)


def _next_line() -> int:
    """The line after the caller's."""
    return inspect.currentframe().f_back.f_lineno + 1


def _only(record, category=ConvergenceWarning):
    found = [w for w in record if issubclass(w.category, category)]
    assert len(found) == 1, [str(w.message) for w in record]
    return found[0]


def test_a_solver_warning_points_at_the_call_and_names_the_removed_row(data):
    X, y, net = data
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", max_iter=2, damping=1e-3,
                             measure="linear").fit(X, y)
    with pytest.warns(ConvergenceWarning) as record:
        line = _next_line()
        est.score_samples(X[[5]])
    warning = _only(record)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert "largest relative residual" in str(warning.message)
    assert "for the removal of training row 5." in str(warning.message)


def test_a_solver_warning_names_the_group_and_its_rows(data):
    X, y, net = data
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", max_iter=2, damping=1e-3,
                             measure="loss").fit(X, y)
    with pytest.warns(ConvergenceWarning) as record:
        line = _next_line()
        est.score_samples(X[[3, 7]], groups=["pets", "pets"])
    warning = _only(record)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert "for the removal of group 'pets' (training rows 3 and 7)" in str(warning.message)


def test_an_influence_matrix_solved_on_the_eval_side_names_the_eval_row(data):
    X, y, net = data
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", max_iter=2, damping=1e-3,
                             measure="linear").fit(X, y)
    with pytest.warns(ConvergenceWarning, match="for row 0 of X_eval") as record:
        line = _next_line()
        est.loss_change(X[:4], None, X[10:11], y[10:11])
    assert (_only(record).filename, _only(record).lineno) == (__file__, line)


def test_a_pbrf_warning_points_at_the_call_and_names_the_removal(data):
    X, y, _ = data
    short = PBRFEstimator(make_net("CrossEntropyLoss", 4, max_epochs=4), damping=0.5,
                          max_iter=1, tol=1e-15, random_state=0).fit(X, y)
    with pytest.warns(ConvergenceWarning) as record:
        line = _next_line()
        short.score_samples(X[[6]])
    warning = _only(record)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert "the worst, for the removal of training row 6, after 1 iterations" in \
        str(warning.message)
    with pytest.warns(ConvergenceWarning,
                      match=r"for the removal of group 2 \(training rows 1 and 4\)"):
        short.score_samples(X[[1, 4]], groups=[2, 2])
    with pytest.warns(ConvergenceWarning, match="for the removal of a row that is not a "
                                                "training row"):
        short.score_samples(X[:1] + 0.3, y[:1])


def test_a_warning_at_fit_points_at_the_fit_call(data):
    X, y, _ = data
    float32 = NeuralNetRegressor(torch.nn.Linear, module__in_features=4, module__out_features=1,
                                 max_epochs=2, lr=0.1, train_split=None, verbose=0)
    est = InfluenceEstimator(float32, solver="cg", solver_params={"mixed_precision": True})
    with pytest.warns(UserWarning, match="mixed_precision") as record:
        line = _next_line()
        est.fit(X, X[:, 0])
    warning = _only(record, UserWarning)
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_warnings_inside_a_grid_search_point_at_its_fit_call(data):
    X, y, _ = data
    search = GridSearchCV(
        InfluenceEstimator(make_net("CrossEntropyLoss", 4, max_epochs=4), solver="cg",
                           max_iter=2, measure="linear", random_state=0),
        {"damping": [0.5]}, cv=RemovalSplit(n_remove=3, random_state=0),
        scoring=agreement_scorer(reference="pbrf", metric="pearson"), refit=False)
    with pytest.warns(ConvergenceWarning, match="CG stopped") as record:
        line = _next_line()
        search.fit(X, y)
    ours = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert ours and all((w.filename, w.lineno) == (__file__, line) for w in ours)


def test_unexpected_convergence_warnings_fail_the_tests(data):
    """pyproject's filter turns a library ConvergenceWarning raised in a test into an
    error although it is attributed to the test's own line."""
    X, y, net = data
    est = InfluenceEstimator(FrozenEstimator(net), solver="cg", max_iter=2, damping=1e-3,
                             measure="linear").fit(X, y)
    with pytest.raises(ConvergenceWarning, match="CG stopped"):
        est.score_samples(X[[5]])


# ------------------------------------------------------------------ the rule itself
_LIBRARY_FILE = os.path.join(os.path.dirname(_warnings.__file__), "_fake_caller.py")
_library = {}
exec(compile("from sklinfluence.utils._warnings import warn\n"
             "def library_warns(message):\n"
             "    warn(message, UserWarning)\n", _LIBRARY_FILE, "exec"), _library)


def test_frames_of_the_package_are_skipped():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _next_line()
        _library["library_warns"]("from the library")
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_without_a_user_frame_the_warning_points_at_the_library_caller():
    """In a worker thread every frame is the library's or ``threading``'s: stacklevel 2."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        worker = threading.Thread(target=_library["library_warns"], args=("in a thread",))
        worker.start()
        worker.join()
    assert record[0].filename == _LIBRARY_FILE and record[0].lineno == 3


def test_removal_descriptions():
    from types import SimpleNamespace as Removal

    assert _warnings.describe_removal(Removal(index=(4,))) == "training row 4"
    assert _warnings.describe_removal(Removal(index=(-1,))) == "a row that is not a training row"
    assert _warnings.describe_removal(Removal(index=(1, 2, -1), label="b")) == \
        "group 'b' (training rows 1 and 2 and a row that is not a training row)"
    assert _warnings.describe_removal(Removal(index=tuple(range(10)))) == \
        "training rows 0, 1, 2, 3, 4, 5, … (10 rows)"
