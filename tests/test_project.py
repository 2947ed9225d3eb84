"""The project's promises: README commands, CI script and the quickstart example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) >= 2
    run_job, run_tests = commands[:2]
    assert 'pip install "torch==2.13.0"' in run_job and "sklinfluence decompose" in run_job
    assert 'pip install "torch==2.13.0"' in run_tests and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci.splitlines()
    assert "set -euo pipefail" in ci


@pytest.mark.slow
def test_quickstart_prints_its_three_tables():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                            capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    for title in ("Most helpful training samples", "Most harmful training samples",
                  "Highest self-influence"):
        assert title in result.stdout
    assert len(re.findall(r"^\s+10\s+\d+\s+\d\s+-?\d\.\d{3}e[+-]\d\d$", result.stdout,
                          re.MULTILINE)) == 3


@pytest.mark.slow
def test_decompose_example_prints_the_five_terms_and_agreements():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "decompose_mlp.py"),
                             "--n-removed", "4", "--n-train", "200", "--epochs", "10"],
                            capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    for name in ("warm_start_gap", "proximity_gap", "non_convergence_gap",
                 "linearization_error", "solver_error", "IF vs pbrf: Spearman",
                 "IF vs cold_start_loo: Spearman", "Wall time per removed sample"):
        assert name in result.stdout


@pytest.mark.slow
def test_readme_usage_snippet_runs():
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    snippet = re.findall(r"```python\n(.+?)```", (ROOT / "README.md").read_text(), re.S)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        namespace: dict = {}
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["dec"].transform(namespace["X"][:2]).shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [
    ("grid_search_damping.py", ["--n-train", "120", "--n-remove", "6"],
     ["reference leave-one-out: best damping", "reference PBRF: best damping"]),
    ("linear_vs_mlp.py", ["--n-train", "80", "--n-removed", "6", "--epochs", "10"],
     ["LogisticRegression(C=1)", "MLP 30-32-32-1", "IF–PBRF Spearman"]),
    ("decompose_mlp.py", ["--n-removed", "3", "--n-train", "150", "--epochs", "5"],
     ["warm_start_gap", "IF vs pbrf: Spearman"]),
    ("mislabel_detection.py", ["--n-train", "100", "--epochs", "5"],
     ["training loss", "leave-one-out", "random"]),
    ("five_terms_sweeps.py", ["--n-train", "80", "--n-removed", "2"],
     ["diabetes (regression)", "digits, damping = 0.1"]),
    ("solver_comparison.py", ["--n-train", "120", "--n-test", "30", "--epochs", "2"],
     ["cg, mixed precision", "lissa, 100 steps warned: LiSSA stopped at max_iter=100",
      "approximate solvers against damping"]),
])
def test_examples_run_and_write_their_plots(script, args, expected, tmp_path):
    plot = tmp_path / "plot.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args,
                             "--plot", str(plot)],
                            capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_shared_parameter_docs_are_filled_in():
    """Docstrings that name a shared fragment get its text; every parameter is documented."""
    import inspect
    import re

    import sklinfluence

    for name in sklinfluence.__all__:
        obj = getattr(sklinfluence, name)
        if not inspect.isclass(obj) or not obj.__doc__:
            continue
        assert not re.search(r"^\s*\{\w+\}\s*$", obj.__doc__, re.M), name
        documented = set(re.findall(r"^    (\w+) :", obj.__doc__, re.M))
        signature = set(inspect.signature(obj).parameters) - {"self"}
        assert signature <= documented, (name, signature - documented)
