"""The study's report: rendered in real headless Chromium, its CSV against the library.

A tiny study (three architectures, a few rows and epochs: seconds) is run once;
the tests then check that

- ``report.html`` loads in headless Chromium without a console error, an
  exception or a request for anything outside the file, and that every figure
  is there, decoded and not blank on screen (element screenshots through the
  DevTools protocol, :mod:`headless_chromium`);
- every embedded ``<img>`` is a PNG that decodes to a non-blank image, one per
  figure, with no external resource anywhere in the page;
- ``study.csv`` holds the numbers of ``decomposition_curve`` and of the
  estimators called directly, to 1e-12;
- a rerun, and a run killed part-way, redo no finished cell.

Chromium is the Debian package ``chromium`` (``apt-get install chromium``);
``.ci/run`` installs it and sets ``SKLINFLUENCE_REQUIRE_CHROMIUM=1``, so that
in CI its absence fails the browser test instead of skipping it.
"""

import base64
import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from headless_chromium import find_chromium, render
from sklinfluence import Decomposer, InfluenceEstimator, training_loss
from sklinfluence.study import decomposition_curve
from sklinfluence.study_report import HEADER, make_scale, run_study
from sklinfluence.study_report.detection import flip_labels
from sklinfluence.zoo import load_zoo_data, make_zoo_net

PIL = pytest.importorskip("PIL.Image")  # matplotlib's own dependency

ROOT = Path(__file__).resolve().parents[1]
#: A study small enough for seconds: every section, both kinds of sweep.
TINY = dict(architectures=("logistic", "mlp", "lenet"), n_train=60, rows=4, seeds=1, epochs=3,
            sweeps={"mlp": {"net__module__width": (8, 16)},
                    "lenet": {"net__max_epochs": (2, 3)}},
            detection=("mlp", "lenet"), n_detect=60)
#: A cell's number in the CSV against the same computation called directly: the
#: computation is deterministic and the CSV writes floats exactly.
CSV_RTOL = 1e-12


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    output = tmp_path_factory.mktemp("study")
    return run_study(output, "small", verbose=0, **TINY)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == HEADER
    return [dict(zip(HEADER, row)) for row in rows[1:]]


def _embedded_pngs(page):
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def _assert_not_blank(png, what):
    image = PIL.open(io.BytesIO(png))
    image.load()
    gray = np.asarray(image.convert("L"), dtype=float)
    assert gray.size > 10_000, f"{what}: only {gray.shape} pixels"
    assert gray.std() > 5, f"{what} is blank (pixel std {gray.std():.2f})"
    ink = (gray < 200).mean()  # axes, text, bars, lines
    assert 0.005 < ink < 0.9, f"{what}: {ink:.1%} of its pixels are dark"


# ------------------------------------------------------------------ in the browser
def test_report_renders_in_headless_chromium_with_every_figure(study, tmp_path):
    executable = find_chromium()
    if executable is None:
        message = ("headless Chromium not found (looked for chromium, chromium-browser, "
                   "google-chrome): install it with `apt-get install chromium`; .ci/run does")
        if os.environ.get("SKLINFLUENCE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    rendering = render(study.paths.html, executable)
    assert rendering.exceptions == []
    assert [c for c in rendering.console if c[0] in ("error", "assert", "warning")] == []
    assert [e for e in rendering.log_entries if e[0] in ("error", "warning")] == []
    outside = [u for u in rendering.requests if not u.startswith(("file:", "data:"))]
    assert outside == [], "the report asked for resources outside itself"
    assert rendering.requests[0] == Path(study.paths.html).resolve().as_uri()
    facts = rendering.facts
    assert facts["title"] == "The paper's study — sklinfluence"
    assert facts["scripts"] == 0 and facts["links"] == 0
    # one image per figure, in order, each decoded by the browser and laid out
    expected = [f"fig-{Path(p).stem}" for p in study.paths.figures]
    assert [image["id"] for image in facts["images"]] == expected
    for image in facts["images"]:
        assert image["complete"] and image["dataUri"], image["id"]
        assert image["naturalWidth"] > 300 and image["naturalHeight"] > 300, image["id"]
        assert image["width"] > 300 and image["height"] > 200, image["id"]
    # what is on screen: every figure's own screenshot, and its place in the page's
    for figure_id, png in rendering.images:
        _assert_not_blank(png, f"{figure_id} on screen")
    page = PIL.open(io.BytesIO(rendering.screenshot)).convert("L")
    (tmp_path / "report.png").write_bytes(rendering.screenshot)
    assert page.size[1] >= facts["height"] - 1
    for image in facts["images"]:
        box = (int(image["x"]), int(image["y"]), int(image["x"] + image["width"]),
               int(image["y"] + image["height"]))
        buffer = io.BytesIO()
        page.crop(box).save(buffer, format="PNG")
        _assert_not_blank(buffer.getvalue(), f"{image['id']} in the full-page screenshot")


# ------------------------------------------------------------------ the file itself
def test_every_figure_is_an_embedded_nonblank_png_and_nothing_is_external(study):
    page = Path(study.paths.html).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    pngs = [base64.b64decode(data) for data in _embedded_pngs(page)]
    assert len(pngs) == len(study.paths.figures) == 6
    for png, path in zip(pngs, study.paths.figures):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png == Path(path).read_bytes()  # the same figure as the file beside it
        _assert_not_blank(png, Path(path).name)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page)
    assert not re.search(r"url\(", page)
    # the claims, each with a verdict, and the sections the task asks for
    for text in ("Spearman between 0.52 and 0.99", "between -0.08 and 0.12",
                 "order of magnitude smaller", "over 80% of the corrupted labels",
                 'id="terms"', 'id="agreement"', 'id="sweeps"', 'id="detection"'):
        assert text in page, text
    assert len(re.findall(r'<span class="verdict ', page)) == len(study.claims) == 5


def test_no_temporary_file_is_left_behind(study):
    output = Path(study.paths.html).parent
    leftovers = [p for p in output.rglob(".*")
                 if p.is_file() and "cache" not in p.relative_to(output).parts]
    assert leftovers == []
    assert sorted(p.name for p in output.iterdir()) == ["cache", "figures", "report.html",
                                                       "study.csv"]


# ------------------------------------------------------------------ the CSV's numbers
@pytest.mark.filterwarnings("ignore:decomposition_curve cell:sklearn.exceptions.ConvergenceWarning")
def test_csv_cell_equals_decomposition_curve_called_directly(study):
    """The per-architecture cell of the MLP, recomputed without any cache (its PBRF
    solves stop short at 3 epochs, as in the study, which reports it)."""
    scale = make_scale("small", **TINY)
    X, y = load_zoo_data("mlp", n_samples=scale.n_train, random_state=0)
    direct = decomposition_curve(
        Decomposer(make_zoo_net("mlp", max_epochs=scale.epochs), damping=scale.damping,
                   solver="ekfac"),
        X, y, param_name="net__max_epochs", param_range=[scale.epochs], seeds=[0],
        rows=study.rows)
    rows = [r for r in _csv(study.paths.csv)
            if r["section"] == "architectures" and r["architecture"] == "mlp"]
    by_key = {(int(r["row"]), r["quantity"]): float(r["value"]) for r in rows if r["row"]}
    assert len(by_key) == len(study.rows) * (5 + 2 * 6)
    for r, row in enumerate(direct.rows):
        for k, name in enumerate(direct.term_names):
            assert_allclose(by_key[row, name], direct.terms[0, 0, r, k], rtol=CSV_RTOL)
        for k, rung in enumerate(direct.rung_names):
            assert_allclose(by_key[row, f"self_score_{rung}"], direct.self_scores[0, 0, r, k],
                            rtol=CSV_RTOL)
    cell = {r["quantity"]: float(r["value"]) for r in rows if not r["row"]}
    for key in ("self_spearman_pbrf", "self_spearman_loo", "warm_start_gap_mean"):
        assert_allclose(cell[key], direct.records[0][key], rtol=CSV_RTOL)
    # the report's table: the mean over seeds and rows
    table = {r["quantity"]: float(r["value"]) for r in _csv(study.paths.csv)
             if r["section"] == "table" and r["architecture"] == "mlp"}
    assert_allclose(table["solver_error mean"], direct.terms[0, :, :, 4].mean(), rtol=CSV_RTOL)
    # and what the study returned is the same again
    assert_allclose(study.architectures["mlp"].terms, direct.terms, rtol=CSV_RTOL)


def test_csv_detection_scores_equal_the_estimators(study):
    scale = make_scale("small", **TINY)
    X, y = load_zoo_data("mlp", n_samples=scale.n_detect, random_state=0)
    noisy, flipped = flip_labels(y, scale.flip_fraction, 0)
    assert flipped.sum() == 6 and (noisy[flipped] != y[flipped]).all()
    assert (noisy[~flipped] == y[~flipped]).all()
    est = InfluenceEstimator(make_zoo_net("mlp", max_epochs=scale.epochs),
                             damping=scale.damping, solver="ekfac", random_state=0)
    est.fit(X, noisy)
    rows = [r for r in _csv(study.paths.csv)
            if r["section"] == "detection" and r["architecture"] == "mlp" and r["row"]]
    column = {q: np.array([float(r["value"]) for r in rows if r["quantity"] == q])
              for q in ("score influence", "score training loss", "is_flipped")}
    assert_allclose(column["score influence"], est.score_samples(X, noisy), rtol=CSV_RTOL)
    assert_allclose(column["score training loss"], training_loss(est, X, noisy), rtol=CSV_RTOL)
    assert (column["is_flipped"] == flipped).all()


# ------------------------------------------------------------------ resuming
def test_a_rerun_loads_every_cell_from_the_cache(study):
    output = Path(study.paths.html).parent
    again = run_study(output, "small", verbose=0, **TINY)
    assert again.n_computed == 0 and again.n_cells == study.n_cells
    for entry, curve in study.architectures.items():
        assert (again.architectures[entry].terms == curve.terms).all()
        assert again.architectures[entry].from_cache.all()
    for entry, result in study.detection.items():
        assert again.detection[entry].found == result.found


def test_a_killed_run_restarted_redoes_no_finished_cell(tmp_path):
    """Kill ``sklinfluence study`` as soon as one cell is in its cache; the restarted
    run computes only the cells that were not finished. (One process: parallel
    workers would outlive the killed parent by the cell they are computing.)"""
    output = tmp_path / "study"
    args = ["study", "--scale", "small", "--architectures", "logistic,mlp,lenet",
            "--n-train", "60", "--rows", "4", "--seeds", "2", "--epochs", "3",
            "--sections", "architectures", "--n-jobs", "1", "--quiet", "--output", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "sklinfluence", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(output.glob("cache/**/output.pkl")) and process.poll() is None:
        assert time.monotonic() < deadline, "no cell finished in 4 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(output.glob("cache/**/output.pkl")))
    assert finished >= 1
    resumed = run_study(output, "small", verbose=0, architectures=("logistic", "mlp", "lenet"),
                        n_train=60, rows=4, seeds=2, epochs=3, sections=("architectures",))
    assert resumed.n_cells == 6
    assert resumed.n_computed == resumed.n_cells - finished


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("changes, error, match", [
    (dict(architectures=("mlp", "alexnet")), ValueError, "unknown zoo entries \\['alexnet'\\]"),
    (dict(rows=1), ValueError, "rows must be an integer ≥ 2"),
    (dict(rows=50, n_train=40), ValueError, "do not fit in n_train=40"),
    (dict(detection=("mlp_diabetes",)), ValueError, "are not classifiers"),
    (dict(architectures=()), ValueError, "architectures is empty"),
    (dict(budget=1.5), ValueError, "budget must be a fraction"),
    (dict(width=3), TypeError, "unknown study settings \\['width'\\]"),
])
def test_bad_settings_are_refused_with_the_reason(changes, error, match):
    with pytest.raises(error, match=match):
        make_scale("small", **changes)


def test_unknown_scale_and_section(tmp_path):
    with pytest.raises(ValueError, match="scale must be one of \\['small', 'default', 'large'\\]"):
        make_scale("huge")
    with pytest.raises(ValueError, match="sections must be a non-empty subset"):
        run_study(tmp_path, "small", sections=("plots",), verbose=0)
    assert not (tmp_path / "report.html").exists()
