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


def _name(requirement: str) -> str:
    """The normalised project name of a requirement (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement)[0]).lower()


def test_floors_file_pins_every_declared_floor_and_ci_tests_it():
    """.ci/floors.txt pins each floor of pyproject's dependencies and dev extra at
    exactly that version (torch excepted: the install command pins it), and CI
    installs it with the command README.md shows."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = Version(version)
    floors = {}
    for text in declared:
        requirement = Requirement(text)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{text!r} declares no single floor (>=)"
        floors[_name(requirement.name)] = Version(lower[0])
    floors.pop("torch")
    assert {name: pins.get(name) for name in floors} == floors
    # nothing pinned that pyproject does not ask for (dask's distributed extra aside)
    assert set(pins) - set(floors) <= {"distributed"}
    floors_command = [c for c in _readme_commands() if "floors.txt" in c]
    assert len(floors_command) == 1
    assert floors_command[0] in (ROOT / ".ci" / "run").read_text().splitlines()


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
    ("paper_study.py", ["--architectures", "mlp,lenet", "--n-train", "60", "--rows", "4",
                        "--seeds", "1", "--epochs", "3", "--n-detect", "60"],
     ["Five terms (mean ‖Δf‖₂", "IF–PBRF", "Flipped labels found in the top 20%",
      "The paper's claims:", "report: "]),
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
        # cleandoc: Python 3.13 dedents docstrings itself, older versions keep
        # the four-space indent; either way the parameters then start a line.
        doc = inspect.cleandoc(obj.__doc__)
        assert not re.search(r"^\s*\{\w+\}\s*$", doc, re.M), name
        documented = set(re.findall(r"^(\w+) :", doc, re.M))
        signature = set(inspect.signature(obj).parameters) - {"self"}
        assert signature <= documented, (name, signature - documented)


#: Citations that users cannot follow: the private specification and design notes
#: (upper case: "spec" and "design" are plain words) and tickets. Built from pieces
#: so that this file, which is scanned too, does not match itself.
_PRIVATE_DOCUMENTS = re.compile(r"\bSP" + r"EC\b|\bDES" + r"IGN\b")
_TICKETS = re.compile(r"\b(?:the|this|that|our|an?)\s+iss" + r"ue(?:'s)?\b|\biss" + r"ue\s*#?\d+",
                      re.IGNORECASE)


def _private_references(text):
    """``(line, match)`` of every citation of a private document or a ticket in ``text``."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(0))
            for pattern in (_PRIVATE_DOCUMENTS, _TICKETS) for m in pattern.finditer(text)]


def _user_visible_text_files():
    skip = {"__pycache__", "_build", "auto_examples", ".ipynb_checkpoints"}
    yield ROOT / "README.md"
    yield ROOT / "pyproject.toml"
    for folder in ("docs", "examples", "benchmarks", "sklinfluence", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if (path.is_file() and path.suffix in {".py", ".rst", ".md", ".txt", ".toml"}
                    and not skip.intersection(path.relative_to(ROOT).parts)):
                yield path


def test_no_text_cites_private_documents_or_tickets():
    """Users see README, docs, examples, benchmarks, docstrings, error messages and
    tests: none may send them to the private specification or design notes, or to a
    ticket, instead of the documentation (docs/theory.rst states the mathematics)."""
    offending = {}
    for path in _user_visible_text_files():
        found = _private_references(path.read_text(encoding="utf-8"))
        if found:
            offending[str(path.relative_to(ROOT))] = found
    assert not offending, offending


@pytest.mark.parametrize("text, cited", [
    ("closed forms (" + "SP" + "EC §5)", True),
    ("see " + "DES" + "IGN.md", True),
    ("the " + "iss" + "ue's target is 10x", True),
    ("(" + "iss" + "ue 13, item 2)", True),
    ("importlib.util.spec_from_file_location(name, path)", False),
    ("a careful design of the solver", False),
    ("each spec dict names the task", False),
])
def test_private_reference_pattern(text, cited):
    assert bool(_private_references(text)) is cited


PRIVATE_SKLEARN = re.compile(r"^\s*(from sklearn[\w.]*\._\w+ import|from sklearn[\w.]* import .*\b_\w+)",
                             re.M)


def test_private_sklearn_api_lives_in_one_module_within_the_declared_range():
    """Only sklinfluence/utils/_sklearn.py imports scikit-learn's private names, and the
    installed scikit-learn is inside the range pyproject.toml declares."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    package = ROOT / "sklinfluence"
    importers = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                       if PRIVATE_SKLEARN.search(p.read_text()))
    assert importers == ["utils/_sklearn.py"]
    text = (ROOT / "pyproject.toml").read_text()
    declared = Requirement(re.search(r'"(scikit-learn[^"]*)"', text)[1])
    assert declared.specifier.filter([version("scikit-learn")]), declared
    assert any(s.operator == "<" for s in declared.specifier), "no upper bound declared"


@pytest.mark.parametrize("line, private", [
    ("from sklearn.base import _fit_context", True),
    ("from sklearn.utils._param_validation import Interval", True),
    ("from sklearn.base import BaseEstimator, _fit_context", True),
    ("from sklearn.base import BaseEstimator", False),
    ("from sklearn.utils.validation import check_is_fitted", False),
])
def test_private_sklearn_pattern(line, private):
    assert bool(PRIVATE_SKLEARN.search(line)) is private


#: The package's layers, top to bottom: a module imports from its own layer or below.
LAYERS = ("estimators", "response", "solvers", "curvature", "model", "utils", "foundation")
#: Top-level modules every layer may import (settings, the library's errors).
FOUNDATION = {"_config", "exceptions"}


def _modules() -> dict:
    """Dotted module name inside the package (``"__init__"`` for the package
    itself, ``"solvers"`` for ``solvers/__init__.py``) → its path."""
    package = ROOT / "sklinfluence"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _import_graph() -> dict:
    """Module → the package modules importing it runs: every relative import in
    sklinfluence/, at module level, under ``if`` (type checking included) or inside
    functions, with the subpackages whose ``__init__`` it passes through
    (``from . import name`` of a non-module: that package's ``__init__``)."""
    import ast

    modules = _modules()
    graph = {}
    for me, path in modules.items():
        inside = path.name == "__init__.py" and me != "__init__"
        package = me if inside else (me.rpartition(".")[0] if "." in me else "")
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level >= 1):
                continue
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)]
            if node.module:
                target = ".".join(base + node.module.split("."))
                edges.add(target)
                edges.update(f"{target}.{a.name}" for a in node.names)
            else:
                for alias in node.names:
                    name = ".".join(base + [alias.name])
                    edges.add(name if name in modules else ".".join(base) or "__init__")
        # importing a.b.c runs the __init__ of the subpackages a and a.b first
        # (but not of the packages this module is in: they are being imported)
        for target in list(edges):
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts)))
        mine = {".".join(me.split(".")[:i]) for i in range(1, me.count(".") + 2)}
        graph[me] = (edges & set(modules)) - mine
    return graph


def _layer(module: str) -> str:
    head = module.split(".")[0]
    if head in FOUNDATION:
        return "foundation"
    return head if head in LAYERS else "estimators"


def test_the_package_import_graph_has_no_cycle():
    graph = _import_graph()
    assert graph["response.responder"] >= {"response.rungs", "solvers"}
    assert graph["solvers"] >= {"solvers.policy", "solvers.cg"}
    assert "cli" in graph["__main__"]
    state: dict = {}  # module → "open" while on the path, "done" after

    def visit(module: str, path: list) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", " → ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_each_layer_imports_only_its_own_and_lower_layers():
    """estimators → response → solvers → curvature → model → utils → _config,
    exceptions: no module imports from a layer above its own."""
    graph = _import_graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
                    for module, targets in graph.items() for target in targets
                    if rank[_layer(target)] < rank[_layer(module)])
    assert upward == []
    # every layer is there, and used from above
    used = {_layer(target) for module, targets in graph.items() for target in targets
            if _layer(target) != _layer(module)}
    assert used == set(LAYERS) - {"estimators"}
