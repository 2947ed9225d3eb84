"""Displays of the decomposition curve, the agreement curve and mislabel detection curves."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numpy.testing import assert_allclose, assert_array_equal  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from nets import make_net, toy_data  # noqa: E402
from sklinfluence import (Decomposer, InfluenceEstimator, TracInCP,  # noqa: E402
                          training_loss)
from sklinfluence.display import (AgreementCurveDisplay, DetectionCurveDisplay,  # noqa: E402
                                  TermsCurveDisplay)
from sklinfluence.study import decomposition_curve, detection_curve  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def data():
    return toy_data("CrossEntropyLoss", n=30)


def _decomposer():
    return Decomposer(make_net("CrossEntropyLoss", 4, hidden=4, max_epochs=4), damping=0.5)


@pytest.fixture(scope="module")
def results(data):
    X, y = data
    return decomposition_curve(_decomposer(), X, y, param_name="damping",
                               param_range=[0.1, 1.0], seeds=(0, 1), rows=3)


def _legend_texts(ax):
    legend = ax.get_legend()
    return legend.get_title().get_text(), [t.get_text() for t in legend.get_texts()]


# ------------------------------------------------------------------ terms
def test_terms_lines_hold_the_mean_over_seeds_and_rows(results):
    display = TermsCurveDisplay.from_results(results)
    assert len(display.lines_) == 5 and len(display.errorbars_) == 5
    assert display.fill_between_ is None
    mean = results.terms.mean(axis=(1, 2))
    std = results.terms.std(axis=(1, 2))
    for k, line in enumerate(display.lines_):
        assert_array_equal(line.get_xdata(), [0.1, 1.0])
        assert_allclose(line.get_ydata(), mean[:, k], rtol=1e-15)
        # the bar's upper end is mean + std over the 2 seeds x 3 rows; the lower end
        # stops at 0 for these non-negative distances
        segments = display.errorbars_[k].lines[2][0].get_segments()
        assert_allclose([s[1][1] for s in segments], mean[:, k] + std[:, k], rtol=1e-14)
        assert_allclose([s[0][1] for s in segments],
                        mean[:, k] - np.minimum(std[:, k], mean[:, k]), rtol=1e-14, atol=1e-300)
    assert display.ax_.get_xlabel() == "damping"
    assert display.ax_.get_xscale() == "log"  # 0.1 to 1.0
    assert "‖Δf‖" in display.ax_.get_ylabel()
    assert display.figure_ is display.ax_.figure


def test_a_zero_term_is_visible_and_labelled_as_zero(results):
    assert np.all(results.terms[..., 4] == 0)  # the exact solver's solver error
    display = TermsCurveDisplay.from_results(results)
    ax = display.ax_
    assert display.zero_terms_ == ["solver_error"]
    zero_line = display.lines_[4]
    assert_array_equal(zero_line.get_ydata(), [0.0, 0.0])
    assert ax.get_yscale() == "symlog"
    low, high = ax.get_ylim()
    assert low <= 0 < high  # 0 is inside the axis, so the line is drawn
    # the symlog axis is logarithmic from the smallest non-zero mean up
    positive = results.terms.mean(axis=(1, 2))[:, :4]
    assert ax.yaxis.get_transform().linthresh <= positive.min()
    _, labels = _legend_texts(ax)
    assert "solver error (exactly 0)" in labels
    assert [a.get_text() for a in display.annotations_] == ["exactly 0"]
    # on a log axis the zero term becomes markers at the bottom edge, labelled
    log = TermsCurveDisplay.from_results(results, yscale="log")
    assert len(log.zero_markers_) == 1 and len(log.zero_markers_[0].get_xdata()) == 2
    assert log.annotations_[0].get_text() == "solver_error: 0".replace("_", " ")


def test_legend_says_what_the_spread_bars_are(results):
    display = TermsCurveDisplay.from_results(results)
    title, _ = _legend_texts(display.ax_)
    assert title == "bars: ± 1 std over 2 seeds × 3 rows" == "bars: " + display.spread_label_
    seeds = TermsCurveDisplay.from_results(results, spread_over="seeds",
                                           std_display_style="fill_between")
    title, _ = _legend_texts(seeds.ax_)
    assert title == "bars: ± 1 std over 2 seeds of the mean over 3 rows"
    assert seeds.errorbars_ is None and len(seeds.fill_between_) == 5
    per_seed = results.terms.mean(axis=2)  # (V, S, 5)
    band = seeds.fill_between_[0].get_paths()[0].vertices[:, 1]
    top = per_seed.mean(axis=1)[:, 0] + per_seed.std(axis=1)[:, 0]
    assert np.isclose(band, top[0], rtol=1e-12).any() and np.isclose(band, top[1]).any()
    none = TermsCurveDisplay.from_results(results, std_display_style=None)
    assert none.ax_.get_legend().get_title().get_text() == ""


def test_terms_subset_given_axes_and_bad_choices(results):
    fig, ax = plt.subplots()
    display = TermsCurveDisplay.from_results(results, ax=ax,
                                             terms=["proximity_gap", "warm_start_gap"])
    assert display.ax_ is ax and display.figure_ is fig
    assert [line.get_label() for line in display.lines_] == ["proximity gap", "warm start gap"]
    assert_allclose(display.lines_[0].get_ydata(), results.terms[..., 1].mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="unknown terms \\['gap'\\]"):
        TermsCurveDisplay.from_results(results, terms=["gap"])
    with pytest.raises(ValueError, match="spread_over must be one of"):
        TermsCurveDisplay.from_results(results, spread_over="rows")
    with pytest.raises(ValueError, match="yscale must be one of"):
        TermsCurveDisplay.from_results(results, yscale="logit")
    with pytest.raises(ValueError, match="terms must have shape"):
        TermsCurveDisplay(param_name="p", param_range=[1], terms=np.zeros((1, 5))).plot()


def test_categorical_param_range_and_signed_terms():
    terms = np.array([[[[0.5, -0.2]], [[0.7, -0.1]]],
                      [[[0.1, 0.3]], [[0.2, 0.2]]]])  # (2 values, 2 seeds, 1 row, 2 terms)
    display = TermsCurveDisplay(param_name="activation", param_range=["tanh", "relu"],
                                terms=terms, term_names=["a", "b"], metric="loss").plot()
    assert_array_equal(display.lines_[0].get_xdata(), [0, 1])
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == ["tanh", "relu"]
    assert_allclose(display.lines_[1].get_ydata(), [-0.15, 0.25])
    # a signed term's bar goes below its mean by the full std
    segments = display.errorbars_[1].lines[2][0].get_segments()
    assert segments[0][0][1] == pytest.approx(-0.15 - 0.05)
    assert display.spread_label_ == "± 1 std over 2 seeds"
    assert display.ax_.get_ylabel() == "change of the mean evaluation loss"


def test_terms_from_estimator_equals_from_results(data, results):
    X, y = data
    display = TermsCurveDisplay.from_estimator(_decomposer(), X, y, param_name="damping",
                                               param_range=[0.1, 1.0], seeds=(0, 1), rows=3)
    assert_array_equal(display.results_.terms, results.terms)
    assert_array_equal(display.lines_[2].get_ydata(), results.terms[..., 2].mean(axis=(1, 2)))
    agreement = AgreementCurveDisplay.from_results(display.results_)
    assert len(agreement.lines_) == 3


# ------------------------------------------------------------------ agreement
def test_agreement_lines_hold_the_mean_over_seeds(results):
    display = AgreementCurveDisplay.from_results(results)
    assert display.references_ == ["pbrf", "warm_start", "loo"]
    _, labels = _legend_texts(display.ax_)
    assert labels == ["PBRF", "warm-start retraining", "cold-start LOO"]
    for ref, line, bars in zip(display.references_, display.lines_, display.errorbars_):
        values = results.agreement["self"]["spearman"][ref]
        assert_allclose(line.get_ydata(), np.nanmean(values, axis=1), rtol=1e-15)
        segments = bars.lines[2][0].get_segments()
        assert_allclose([s[1][1] for s in segments],
                        np.nanmean(values, axis=1) + np.nanstd(values, axis=1), rtol=1e-14)
    title, _ = _legend_texts(display.ax_)
    assert title == "bars: ± 1 std over 2 seeds, each a correlation over 3 rows"
    assert display.ax_.get_ylim() == (-1.05, 1.05)
    assert display.ax_.get_ylabel().startswith("Spearman correlation with influence")

    pearson = AgreementCurveDisplay.from_results(results, quantity="eval", statistic="pearson",
                                                 references=["proximal"])
    assert_allclose(pearson.lines_[0].get_ydata(),
                    np.nanmean(results.agreement["eval"]["pearson"]["proximal"], axis=1))
    assert "evaluation loss" in pearson.ax_.get_ylabel()


def test_agreement_nan_seeds_are_left_out_of_the_mean():
    agreement = {"pbrf": np.array([[0.5, np.nan], [np.nan, np.nan]])}
    display = AgreementCurveDisplay(param_name="p", param_range=[1, 2],
                                    agreement=agreement).plot()
    y = display.lines_[0].get_ydata()
    assert y[0] == 0.5 and np.isnan(y[1])


@pytest.mark.parametrize("kw, match", [(dict(references=["exact"]), "unknown references"),
                                       (dict(quantity="test"), "quantity must be one of"),
                                       (dict(statistic="kendall"), "statistic must be one of")])
def test_agreement_refuses_unknown_choices(results, kw, match):
    with pytest.raises(ValueError, match=match):
        AgreementCurveDisplay.from_results(results, **kw)


# ------------------------------------------------------------------ detection
def test_detection_display_from_scores_draws_each_curve():
    is_flipped = np.array([False, True, False, True, False, False])
    scores = {"loss": [0.1, 0.9, 0.5, 0.5, 0.5, 0.2],
              "perfect": [0, 1, 0, 1, 0, 0]}
    display = DetectionCurveDisplay.from_scores(is_flipped, scores, budget=0.5)
    assert len(display.lines_) == 2
    assert_allclose(display.lines_[0].get_xdata(), [0, 1 / 6, 4 / 6, 5 / 6, 1])
    assert_allclose(display.lines_[0].get_ydata(), [0, 0.5, 1, 1, 1])
    # at half the data: between (1/6, 0.5) and (4/6, 1), linear within the tie
    assert display.found_at_budget_["loss"] == pytest.approx(0.5 + 0.5 * (0.5 - 1 / 6) / 0.5)
    assert display.found_at_budget_["perfect"] == 1.0
    _, labels = _legend_texts(display.ax_)
    assert labels[0] == "loss (83% found in top 50%)"
    assert labels[-2:] == ["random order (expected)", "perfect ranking"]
    assert_array_equal(display.chance_level_.get_ydata(), [0, 1])
    assert_allclose(display.perfect_.get_xdata(), [0, 2 / 6, 1])
    assert display.ax_.get_legend().get_title().get_text() == "2 flipped labels in 6 rows"
    bare = DetectionCurveDisplay.from_scores(is_flipped, scores, budget=None,
                                             plot_chance_level=False, plot_perfect=False)
    assert bare.chance_level_ is None and bare.perfect_ is None and bare.found_at_budget_ == {}
    with pytest.raises(ValueError, match="scores\\['bad'\\]: .*finite"):
        DetectionCurveDisplay.from_scores(is_flipped, {"bad": [np.nan] * 6})
    with pytest.raises(ValueError, match="budget"):
        DetectionCurveDisplay.from_scores(is_flipped, scores, budget=1.5)


def test_detection_display_from_estimators(data):
    X, y = data
    y = y.copy()
    flipped = np.zeros(len(y), dtype=bool)
    flipped[[2, 11, 19]] = True
    y[flipped] = (y[flipped] + 1) % 3
    net = make_net("CrossEntropyLoss", 4, hidden=4, max_epochs=4)
    influence = InfluenceEstimator(net, damping=0.5, random_state=0).fit(X, y)
    tracin = TracInCP(net, random_state=0).fit(X, y)
    random_order = np.random.default_rng(0).permutation(len(y)).astype(float)
    display = DetectionCurveDisplay.from_estimators(
        {"influence": influence, "TracIn-CP": tracin,
         "training loss": lambda X, y: training_loss(influence, X, y),
         "random": random_order}, X, y, flipped)
    expected = {"influence": influence.score_samples(X, y),
                "TracIn-CP": tracin.score_samples(X, y),
                "training loss": training_loss(influence, X, y), "random": random_order}
    for line, (name, scores) in zip(display.lines_, expected.items()):
        inspected, found, _ = detection_curve(flipped, scores)
        assert line.get_label().startswith(name)
        assert_allclose(line.get_xdata(), inspected)
        assert_allclose(line.get_ydata(), found)

    with pytest.raises(NotFittedError, match="estimators\\['PBRF'\\] is not fitted"):
        DetectionCurveDisplay.from_estimators({"PBRF": InfluenceEstimator(net)}, X, y, flipped)
