"""The ``sklinfluence`` command line."""

import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("command", [[], ["decompose"], ["rank"]])
def test_help_of_every_subcommand(command):
    result = subprocess.run([sys.executable, "-m", "sklinfluence", *command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: sklinfluence" in result.stdout
