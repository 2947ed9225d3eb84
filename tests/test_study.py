"""decomposition_curve (the five terms and agreement against a parameter) and detection_curve."""

import csv
import io

import joblib
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator

from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, config_context, training_loss
from sklinfluence.study import decomposition_curve, detection_curve

#: A cell of the curve against the Decomposer called directly: the same deterministic
#: computation, so equal to the last bit; 1e-12 leaves room for nothing but rounding.
CELL_VS_DIRECT_RTOL = 1e-12


@pytest.fixture(scope="module")
def data():
    X, y = toy_data("CrossEntropyLoss", n=30)
    X_eval, y_eval = toy_data("CrossEntropyLoss", n=12, seed=1)
    return X, y, X_eval, y_eval


def _decomposer(**kw):
    return Decomposer(make_net("CrossEntropyLoss", 4, hidden=4, max_epochs=4),
                      **{"damping": 0.5, **kw})


def _curve(data, **kw):
    X, y, X_eval, y_eval = data
    options = dict(param_name="net__module__hidden", param_range=[3, 5], seeds=(0, 1), rows=4,
                   X_eval=X_eval, y_eval=y_eval)
    options.update(kw)
    return decomposition_curve(_decomposer(), X, y, **options)


@pytest.fixture(scope="module")
def curve(data):
    return _curve(data)


def _assert_same_numbers(a, b):
    for key in ("terms", "self_scores", "eval_changes", "terms_mean", "terms_std"):
        assert_array_equal(a[key], b[key], err_msg=key)
    for quantity in ("self", "eval"):
        for statistic in ("spearman", "pearson"):
            for ref in ("pbrf", "proximal", "warm_start", "loo"):
                assert_array_equal(a.agreement[quantity][statistic][ref],
                                   b.agreement[quantity][statistic][ref])


def test_shapes_and_names(curve):
    V, S, R = 2, 2, 4
    assert curve.terms.shape == (V, S, R, 5)
    assert curve.self_scores.shape == curve.eval_changes.shape == (V, S, R, 6)
    assert curve.terms_mean.shape == curve.terms_std.shape == (V, S, 5)
    assert curve.term_names == ["warm_start_gap", "proximity_gap", "non_convergence_gap",
                                "linearization_error", "solver_error"]
    assert curve.rung_names[-1] == "influence" and curve.rung_names[0] == "cold_start_loo"
    assert_array_equal(curve.param_range, [3.0, 5.0])
    assert_array_equal(curve.seeds, [0, 1])
    assert len(curve.rows) == R and len(np.unique(curve.rows)) == R
    for quantity in ("self", "eval"):
        for statistic in ("spearman", "pearson"):
            assert set(curve.agreement[quantity][statistic]) == {"pbrf", "proximal",
                                                                 "warm_start", "loo"}
            for values in curve.agreement[quantity][statistic].values():
                assert values.shape == (V, S) and np.all(np.abs(values) <= 1 + 1e-12)
    assert_allclose(curve.terms_mean, curve.terms.mean(axis=2), rtol=1e-15)
    assert_allclose(curve.terms_std, curve.terms.std(axis=2), rtol=1e-15)
    assert not curve.from_cache.any() and (curve.n_warnings == 0).all()
    # the exact solver: rung 5 is rung 4, its solver error is 0
    assert np.all(curve.terms[..., 4] == 0)
    # the swept width reached the net: different widths, different numbers
    assert not np.allclose(curve.terms[0], curve.terms[1])


def test_a_cell_equals_the_decomposer_called_directly(data, curve):
    X, y, X_eval, y_eval = data
    i, j = 1, 1  # hidden=5, seed 1
    with config_context(response_cache_bytes=0):  # recompute, do not reuse the curve's
        dec = _decomposer().set_params(net__module__hidden=5, random_state=1)
        dec.fit(X, y, X_eval, y_eval)
        rows = curve.rows
        terms = dec.transform(X[rows], y[rows])
        scores = dec.rung_scores(X[rows], y[rows])
        losses = dec.rung_losses(X[rows], y[rows])
    assert dec.net_.module_[0].out_features == 5
    base = training_loss(dec, X_eval, y_eval).mean()
    assert_allclose(curve.terms[i, j], terms, rtol=CELL_VS_DIRECT_RTOL, atol=0)
    assert_allclose(curve.self_scores[i, j], scores, rtol=CELL_VS_DIRECT_RTOL, atol=0)
    assert_allclose(curve.eval_changes[i, j], losses - base, rtol=CELL_VS_DIRECT_RTOL,
                    atol=1e-15)
    names = curve.rung_names
    for ref, rung in [("pbrf", "pbrf"), ("warm_start", "warm_start"), ("loo", "cold_start_loo")]:
        k = names.index(rung)
        assert curve.agreement.self.spearman[ref][i, j] == pytest.approx(
            spearmanr(scores[:, 5], scores[:, k])[0], abs=1e-12)
        assert curve.agreement["eval"].pearson[ref][i, j] == pytest.approx(
            pearsonr(losses[:, 5], losses[:, k])[0], abs=1e-12)


def test_records_are_a_tidy_table(curve):
    records = curve.records
    assert len(records) == 4
    assert [(r["param_value"], r["seed"]) for r in records] == [(3, 0), (3, 1), (5, 0), (5, 1)]
    r = records[3]
    assert r["param_name"] == "net__module__hidden" and r["n_rows"] == 4
    assert r["proximity_gap_mean"] == curve.terms_mean[1, 1, 1]
    assert r["non_convergence_gap_std"] == curve.terms_std[1, 1, 2]
    assert r["self_spearman_pbrf"] == curve.agreement.self.spearman.pbrf[1, 1]
    assert r["eval_pearson_loo"] == curve.agreement["eval"].pearson.loo[1, 1]
    assert r["from_cache"] is False and r["seconds"] > 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert len(rows) == 4 and float(rows[3]["proximity_gap_mean"]) == pytest.approx(
        r["proximity_gap_mean"], rel=1e-15)
    pd = pytest.importorskip("pandas")
    assert pd.DataFrame(records).shape == (4, len(records[0]))


def test_rows_drawn_by_random_state_and_given_as_indices(data):
    X, y, *_ = data
    drawn = _curve(data, param_name="damping", param_range=[0.5], seeds=1, rows=3,
                   random_state=7)
    assert_array_equal(drawn.rows, np.sort(np.random.RandomState(7).choice(30, 3, replace=False)))
    given = _curve(data, param_name="damping", param_range=[0.5], seeds=1, rows=drawn.rows[::-1])
    assert_array_equal(given.rows, drawn.rows[::-1])
    # the same removals in another order (batched solves: equal to within their tolerance)
    assert_allclose(given.terms[0, 0], drawn.terms[0, 0][::-1], rtol=1e-7)


def test_damping_is_swept_on_the_decomposer_itself(data):
    X, y, X_eval, y_eval = data
    result = _curve(data, param_name="damping", param_range=[0.2, 2.0], seeds=1, rows=3)
    with config_context(response_cache_bytes=0):
        dec = _decomposer(damping=2.0, random_state=0).fit(X, y, X_eval, y_eval)
        assert_allclose(result.terms[1, 0], dec.transform(X[result.rows], y[result.rows]),
                        rtol=CELL_VS_DIRECT_RTOL, atol=0)
    # warm start does not depend on the damping; the proximity gap does
    assert_allclose(result.terms[0, 0, :, 0], result.terms[1, 0, :, 0], rtol=1e-12)
    assert not np.allclose(result.terms[0, 0, :, 1], result.terms[1, 0, :, 1])


class _Killed(BaseException):
    """Stands for SIGKILL in the middle of a run."""


def test_memory_resumes_a_killed_run_without_redoing_finished_cells(data, tmp_path,
                                                                   monkeypatch, curve):
    fits = []
    original = Decomposer.fit

    def counting_fit(self, *args, **kwargs):
        fits.append(1)
        return original(self, *args, **kwargs)

    def dying_fit(self, *args, **kwargs):
        if len(fits) == 2:
            raise _Killed
        return counting_fit(self, *args, **kwargs)

    monkeypatch.setattr(Decomposer, "fit", dying_fit)
    with pytest.raises(_Killed):
        _curve(data, memory=tmp_path)  # a Path
    assert len(fits) == 2  # two cells finished, the third died

    fits.clear()
    monkeypatch.setattr(Decomposer, "fit", counting_fit)
    resumed = _curve(data, memory=str(tmp_path))  # the same cache through a str
    assert len(fits) == 2  # only the two unfinished cells
    assert resumed.from_cache.sum() == 2
    assert [r["from_cache"] for r in resumed.records] == [True, True, False, False]
    _assert_same_numbers(resumed, curve)

    fits.clear()
    # a path is joblib.Memory(str(path)) (joblib stores a Memory(Path) elsewhere)
    again = _curve(data, memory=joblib.Memory(str(tmp_path), verbose=0), n_jobs=1)
    assert not fits and again.from_cache.all()
    _assert_same_numbers(again, curve)

    # execution settings of the Decomposer are not part of the key; what it computes is
    fits.clear()
    X, y, X_eval, y_eval = data
    options = dict(param_name="net__module__hidden", param_range=[3, 5], seeds=(0, 1),
                   rows=4, X_eval=X_eval, y_eval=y_eval, memory=tmp_path)
    decomposition_curve(_decomposer(n_jobs=1, verbose=0), X, y, **options)
    assert not fits
    decomposition_curve(_decomposer(pbrf_tol=1e-10), X, y, **options)
    assert len(fits) == 4
    fits.clear()
    decomposition_curve(_decomposer(), X, y, **{**options, "rows": 3})
    assert len(fits) == 4


def test_n_jobs_2_gives_the_sequential_answer(data, curve):
    parallel = _curve(data, n_jobs=2)
    _assert_same_numbers(parallel, curve)


@pytest.mark.slow
def test_dask_cluster_gives_the_sequential_answer(data, curve):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            on_dask = _curve(data, n_jobs=-1)
        assert len(client.scheduler_info()["workers"]) == 2
    _assert_same_numbers(on_dask, curve)


def test_verbose_shows_a_progress_bar_and_quiet_shows_nothing(data, capsys):
    _curve(data, param_name="damping", param_range=[0.5, 1.0], seeds=1, rows=2, verbose=1)
    err = capsys.readouterr().err
    assert "decomposition_curve[damping]" in err and "2/2" in err
    _curve(data, param_name="damping", param_range=[0.5, 1.0], seeds=1, rows=2)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_warnings_of_a_cell_are_reemitted_with_the_cell_named(data):
    X, y, *_ = data
    dec = _decomposer(pbrf_max_iter=1, pbrf_tol=1e-14)
    with pytest.warns(ConvergenceWarning, match=r"cell damping=0\.5, seed 3: .*stopped short"):
        result = decomposition_curve(dec, X, y, param_name="damping", param_range=[0.5],
                                     seeds=[3], rows=3)
    assert result.n_warnings[0, 0] >= 1 and result.records[0]["n_warnings"] >= 1


@pytest.mark.parametrize("kw, error, match", [
    (dict(param_name="dampin"), ValueError,
     r"unknown param_name 'dampin': Decomposer has no parameter 'dampin'.*'damping'.*"
     r"'net__<name>'"),
    (dict(param_name="net__max_epochz"), ValueError,
     r"unknown param_name 'net__max_epochz': NeuralNetClassifier has no parameter "
     r"'max_epochz'.*'max_epochs'"),
    (dict(param_name="net__module__hiddn"), ValueError, "MLP takes no argument 'hiddn'"),
    (dict(param_name="random_state"), ValueError, "swept by seeds="),
    (dict(param_name="n_jobs"), ValueError, "nothing to sweep"),
    (dict(param_name=3), TypeError, "param_name must be"),
    (dict(param_range=[]), ValueError, "param_range is empty"),
    (dict(param_range="0.1"), TypeError, "sequence of values"),
    (dict(seeds=[]), ValueError, "seeds must be a non-empty"),
    (dict(seeds=[0, 0]), ValueError, "repeated"),
    (dict(seeds=0), ValueError, "at least one seed"),
    (dict(rows=1), ValueError, "between 2 and n_samples=30"),
    (dict(rows=[0]), ValueError, "at least 2"),
    (dict(rows=[0, 30]), ValueError, "indices into X's 30 rows"),
    (dict(rows=[1, 1]), ValueError, "repeated"),
    (dict(rows=[0.5, 1.5]), ValueError, "1-D array of training row indices"),
    (dict(X_eval=np.zeros((2, 4))), ValueError, "X_eval and y_eval go together"),
])
def test_bad_input_is_refused_with_the_fix(data, kw, error, match):
    X, y, *_ = data
    options = dict(param_name="damping", param_range=[0.5], seeds=1, rows=3)
    options.update(kw)
    with pytest.raises(error, match=match):
        decomposition_curve(_decomposer(), X, y, **options)


def test_unsupported_estimators_are_refused(data):
    X, y, *_ = data
    net = make_net("CrossEntropyLoss", 4, hidden=4, max_epochs=4)
    options = dict(param_name="damping", param_range=[0.5], seeds=1, rows=3)
    with pytest.raises(TypeError, match="needs a Decomposer instance.*got InfluenceEstimator"):
        decomposition_curve(InfluenceEstimator(net), X, y, **options)
    with pytest.raises(TypeError, match="got Decomposer"):  # the class, not an instance
        decomposition_curve(Decomposer, X, y, **options)
    with pytest.raises(ValueError, match="FrozenEstimator"):
        decomposition_curve(Decomposer(FrozenEstimator(net)), X, y, **options)
    with pytest.raises(ValueError, match="different numbers of rows"):
        decomposition_curve(_decomposer(), X, y[:-1], **options)


# ------------------------------------------------------------------ detection_curve
def test_detection_curve_against_a_hand_computed_example():
    #          rows:  0      1     2      3     4      5
    is_flipped = [False, True, False, True, False, False]
    scores = [0.1, 0.9, 0.5, 0.5, 0.5, 0.2]
    # inspect row 1 (flipped); then the tie 2, 3, 4 together (one flipped); then 5; then 0
    inspected, found, thresholds = detection_curve(is_flipped, scores)
    assert_allclose(inspected, [0, 1 / 6, 4 / 6, 5 / 6, 1], rtol=1e-15)
    assert_allclose(found, [0, 1 / 2, 1, 1, 1], rtol=1e-15)
    assert_array_equal(thresholds, [np.inf, 0.9, 0.5, 0.2, 0.1])
    # 0/1 masks are masks too
    assert_array_equal(detection_curve(np.asarray(is_flipped, int), scores)[1], found)


def test_detection_curve_without_ties_is_the_cumulative_count(rng):
    is_flipped = rng.random(50) < 0.2
    scores = rng.normal(size=50) + 2 * is_flipped
    inspected, found, _ = detection_curve(is_flipped, scores)
    order = np.argsort(-scores)
    assert_allclose(inspected, np.arange(51) / 50, rtol=1e-15)
    assert_allclose(found[1:], np.cumsum(is_flipped[order]) / is_flipped.sum(), rtol=1e-15)


@pytest.mark.parametrize("is_flipped, scores, match", [
    ([False, False], [1.0, 2.0], "no True entry"),
    ([True, False], [1.0, np.nan], "finite"),
    ([True, False], [1.0], "different lengths"),
    ([2, 0], [1.0, 2.0], "boolean mask"),
    ([[True, False]], [[1.0, 2.0]], "1-D"),
])
def test_detection_curve_refuses_bad_input(is_flipped, scores, match):
    with pytest.raises(ValueError, match=match):
        detection_curve(is_flipped, scores)
