"""The ``sklinfluence`` command line."""

import re
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

from sklinfluence.cli import main

FAST = ["--n-train", "120", "--epochs", "5", "--damping", "0.2", "--quiet"]


def test_decompose_prints_the_table_and_writes_csv_and_png(tmp_path, capsys):
    assert main(["decompose", *FAST, "--n-removed", "4", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("warm_start_gap", "solver_error", "IF vs PBRF", "IF vs cold-start LOO"):
        assert text in out
    rows = (tmp_path / "decompose.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("train_row,label,warm_start_gap")
    assert (tmp_path / "decompose.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_decompose_chart_labels_exact_zeros_and_explains_its_whiskers():
    """decompose.png: bars are the mean |term|, whiskers its smallest to largest value
    (stopping at the bottom of the log axis where they would reach 0), and a term that
    is 0 for every removed row — no bar on a log axis — is labelled instead."""
    from sklinfluence.cli import ZERO_LABEL, _plot_terms

    names = ["warm_start_gap", "proximity_gap", "non_convergence_gap",
             "linearization_error", "solver_error"]
    terms = np.array([[0.5, -0.02, 0.3, 1e-3, 0.0],
                      [0.1, -0.03, 0.0, 2e-3, 0.0],
                      [0.2, -0.01, 0.4, 4e-3, 0.0]])
    fig, ax = _plot_terms(terms, names, ylabel="mean ‖Δf‖", title="five terms")
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    size = np.abs(terms)
    assert_allclose([bar.get_height() for bar in ax.patches], size.mean(axis=0)[:4])
    zero = [t for t in ax.texts if t.get_text() == ZERO_LABEL]
    assert len(zero) == 1 and zero[0].xy[0] == 4  # the solver error's column, and only it
    bottom = ax.get_ylim()[0]
    assert 0 < bottom < size[size > 0].min()
    whiskers = ax.containers[-1].lines[2][0].get_segments()
    assert_allclose([w[:, 1] for w in whiskers],
                    np.c_[np.maximum(size.min(axis=0), bottom), size.max(axis=0)][:4])
    legend = " / ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "bars: mean |term| over the 3 removed rows" in legend
    assert "whiskers: smallest to largest |term|" in legend and "down to 0" in legend
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("method", ["if", "pbrf", "loo", "graddot", "tracin", "loss"])
def test_rank_finds_flipped_labels_and_writes_the_curve(tmp_path, capsys, method):
    assert main(["rank", *FAST, "--data", "synthetic", "--method", method, "--mislabel", "0.2",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Detection curve" in out and "24 labels flipped" in out
    rows = [line.split(",") for line in (tmp_path / "rank.csv").read_text().splitlines()[1:]]
    assert len(rows) == 120
    flipped = np.array([r[-1] == "True" for r in rows])
    assert flipped[:24].mean() > 0.2  # better than random (0.2) at the top of the ranking
    assert (tmp_path / "rank.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, found", [("if", 43), ("loss", 43), ("graddot", 43),
                                           ("tracin", 47)])
def test_mislabel_detection_figures_quoted_in_the_readme(tmp_path, capsys, method, found):
    """README: "On digits with 10% flipped labels, inspecting the top 10% of the
    influence ranking finds 86% of them (training loss and grad-dot: 86% too,
    TracIn-CP 94%)" — ``sklinfluence rank --mislabel 0.1`` with every other
    option at its default."""
    assert main(["rank", "--mislabel", "0.1", "--method", method, "--quiet",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "digits: 500 training rows, 50 labels flipped" in out
    assert f"inspect  10%: found {found / 50:6.1%}" in out
    rows = [line.split(",") for line in (tmp_path / "rank.csv").read_text().splitlines()[1:]]
    assert sum(r[-1] == "True" for r in rows[:50]) == found  # of the 50 flipped labels


def test_csv_data_with_a_target_column(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = X @ [1.0, -2.0, 0.5] + 0.1 * rng.normal(size=60)
    path = tmp_path / "data.csv"
    lines = ["a,price,b,c"] + [f"{x[0]},{t},{x[1]},{x[2]}" for x, t in zip(X, y)]
    path.write_text("\n".join(lines))
    assert main(["rank", "--data", str(path), "--target", "price", "--epochs", "3", "--quiet",
                 "--output", str(tmp_path / "out")]) == 0
    assert "data.csv: 60 training rows" in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["--data", "missing.csv"], "no such file"),
    (["--data", "{csv}", "--target", "nope"], "is not a column"),
    (["--data", "{text_csv}"], "feature columns must be numeric"),
    (["--data", "diabetes", "--mislabel", "0.1"], "needs a classification problem"),
    (["--mislabel", "1.5"], "expected a fraction"),
    (["--data", "{float_csv}", "--task", "classification"], "continuous values"),
    (["--n-threads", "0"], "--n-threads must be"),
    (["--hidden", "a,b"], "--hidden takes widths"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, capsys, args, fragment):
    good = tmp_path / "good.csv"
    good.write_text("x,y\n1,0\n2,1\n3,0\n")
    text = tmp_path / "text.csv"
    text.write_text("x,y\nred,0\nblue,1\ngreen,0\n")
    floats = tmp_path / "floats.csv"
    floats.write_text("x,y\n1,0.5\n2,1.25\n3,0.75\n")
    args = [a.format(csv=good, text_csv=text, float_csv=floats) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", *args, "--quiet", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_readme_synopsis_matches_the_parser():
    """README's synopses (decompose and rank in the first block, study in the second)
    name every option of each subcommand, each list of values is the option's choices
    (default first), and every value shown is its default."""
    import argparse
    from pathlib import Path

    from sklinfluence.cli import _parser
    from sklinfluence.datasets import BUILTIN

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    block, study = section.split("```")[1:4:2]
    own, common = block.split("\nOPTIONS", 1)
    decompose, rank = own.split("sklinfluence rank")
    assert study.lstrip("\n").startswith("sklinfluence study")
    option = re.compile(r"\[(--[\w-]+)(?: ([^\]]+))?\]")
    shared = dict(option.findall(common))
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, text, inherited in (("decompose", decompose, shared), ("rank", rank, shared),
                                  ("study", study, {})):
        sub = subparsers.choices[name]
        actions = {s: a for a in sub._actions for s in a.option_strings
                   if s.startswith("--") and s != "--help"}
        shown = {**inherited, **dict(option.findall(text))}
        assert set(shown) == set(actions), name
        for opt, value in shown.items():
            action = actions[opt]
            if not value:
                assert action.nargs == 0, opt  # a flag
            elif "|" in value:
                values = value.split("|")
                choices = list(action.choices or [*BUILTIN, "FILE.csv", "FILE.npz"])
                assert values == choices and values[0] == action.default, opt
            elif value.isupper():
                assert action.default is None, opt  # a placeholder: no default to show
            else:
                assert getattr(sub.parse_args([opt, value]), action.dest) == action.default, opt


@pytest.mark.parametrize("command", [[], ["decompose"], ["rank"], ["study"]])
def test_help_of_every_subcommand(command):
    result = subprocess.run([sys.executable, "-m", "sklinfluence", *command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: sklinfluence" in result.stdout


#: A study of seconds: two architectures, the per-architecture section only.
STUDY_FAST = ["--scale", "small", "--architectures", "logistic,mlp", "--n-train", "40",
              "--rows", "3", "--seeds", "1", "--epochs", "2", "--sections", "architectures",
              "--quiet"]


def test_study_prints_the_table_and_verdicts_writes_the_report_and_resumes(tmp_path, capsys):
    assert main(["study", *STUDY_FAST, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "The paper's study, scale small: 2 architectures, 40 training rows" in out
    assert "2 cells (2 computed, 0 from the cache)" in out
    for text in ("warm-start", "IF–PBRF", "IF–LOO", "The paper's claims:", "not measured",
                 f"wrote {tmp_path / 'report.html'} and {tmp_path / 'study.csv'}"):
        assert text in out, text
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "study.csv").read_text().startswith(
        "section,architecture,param_name,param_value,seed,row,quantity,value")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "agreement_by_architecture.png", "terms_by_architecture.png"]
    assert not [p for p in tmp_path.rglob(".*")
                if p.is_file() and "cache" not in p.relative_to(tmp_path).parts]
    # the same command again: every cell from the cache
    assert main(["study", *STUDY_FAST, "--output", str(tmp_path)]) == 0
    assert "2 cells (0 computed, 2 from the cache)" in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["--architectures", "mlp,alexnet"], "expected comma-separated zoo entries"),
    (["--rows", "1"], "expected an integer ≥ 2"),
    (["--rows", "50", "--n-train", "40"], "do not fit in n_train=40"),
    (["--sections", "plots"], "expected comma-separated sections"),
    (["--scale", "huge"], "invalid choice: 'huge'"),
    (["--n-detect", "5"], "expected an integer ≥ 10"),
])
def test_study_bad_input_exits_with_a_clear_message(tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", *args, "--quiet", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()
