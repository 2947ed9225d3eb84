"""Bit-for-bit reproducibility: same random_state, same answers — in one process,
across processes (with different hash seeds), from the command line, and with
``n_jobs=2`` where ``test_execution.py`` does not already check it.
"""

import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

import sklinfluence
from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator
from sklinfluence.response.responder import RESPONSE_CACHE

HERE = Path(__file__).resolve().parent
SEED = 7


def run_all(seed: int) -> dict:
    """Everything the four estimators return, for a shuffling mini-batch net.

    Imported by the subprocesses of the cross-process test, so it clears the
    response cache itself: every estimator computes its own responses.
    """
    X, y = toy_data("CrossEntropyLoss", n=24, d=4)
    net = make_net("CrossEntropyLoss", 4, hidden=5, max_epochs=4, batch_size=8)
    rows, evaluate = X[[1, 6, 17]], (X[:4], y[:4])
    out = {}
    RESPONSE_CACHE.clear()
    est = InfluenceEstimator(net, damping=0.1, random_state=seed).fit(X, y)
    out["theta_s"] = est.model_.params.numpy().copy()
    out["theta_0"] = est.initial_params_.numpy().copy()
    out["if_scores"] = est.score_samples(X)
    out["if_loss_change"] = est.loss_change(rows, None, *evaluate)
    RESPONSE_CACHE.clear()
    est = PBRFEstimator(net, damping=0.1, random_state=seed).fit(X, y)
    out["pbrf_param_change"] = est.param_change(rows)
    out["pbrf_scores"] = est.score_samples(rows)
    for name, options in (("cold", {}), ("warm", {"warm_start": True}),
                          ("proximal", {"proximal": True, "damping": 0.1})):
        RESPONSE_CACHE.clear()
        est = LOOEstimator(net, random_state=seed, **options).fit(X, y)
        out[f"loo_{name}_param_change"] = est.param_change(rows)
        out[f"loo_{name}_loss_change"] = est.loss_change(rows, None, *evaluate)
    RESPONSE_CACHE.clear()
    dec = Decomposer(net, damping=0.1, random_state=seed).fit(X, y)
    out["terms"] = dec.transform(rows)
    out["rung_scores"] = dec.rung_scores(rows)
    RESPONSE_CACHE.clear()
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert_array_equal(a[key], b[key], err_msg=key, strict=True)


@pytest.fixture(scope="module")
def reference():
    return run_all(SEED)


def _scramble_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_same_random_state_is_bit_identical_in_one_process(reference):
    _scramble_global_rngs(12345)  # the global RNGs must not matter
    state = torch.get_rng_state()
    again = run_all(SEED)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be touched
    _assert_identical(again, reference)
    other = run_all(SEED + 1)  # and the seed is actually used
    assert not np.array_equal(other["theta_0"], reference["theta_0"])
    assert not np.array_equal(other["loo_cold_param_change"],
                              reference["loo_cold_param_change"])


#: The command-line run of the cross-process test, written under ``out`` in its cwd.
DECOMPOSE = ["decompose", "--data", "synthetic", "--n-train", "40", "--epochs", "3",
             "--hidden", "4", "--damping", "0.2", "--n-removed", "3", "--seed", "5", "--quiet",
             "--output", "out"]

SCRIPT = textwrap.dedent("""
    import contextlib
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(int(sys.argv[1]))  # a different global state in each process
    from test_determinism import DECOMPOSE, run_all
    np.savez("estimators.npz", **run_all({seed}))
    from sklinfluence.cli import main
    with open("stdout.txt", "w") as handle, contextlib.redirect_stdout(handle):
        assert main(DECOMPOSE) == 0
""")


def _env(hash_seed: str) -> dict:
    """One thread, a given hash seed, and the sklinfluence this process imported."""
    package_root = str(Path(sklinfluence.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed,
            "PYTHONPATH": path}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Run :func:`run_all` and ``sklinfluence decompose`` in two fresh processes at
    once (one per core; each start-up imports torch), with different hash seeds
    and global torch seeds; return their working directories."""
    root = tmp_path_factory.mktemp("processes")
    script = root / "run.py"
    script.write_text(SCRIPT.format(tests=str(HERE), seed=SEED))
    dirs = [root / f"run{i}" for i in range(2)]
    procs = []
    for i, cwd in enumerate(dirs):
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, str(script), str(i)], cwd=cwd,
                                      env=_env(str(i + 1)), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return dirs


@pytest.mark.slow
def test_same_random_state_is_bit_identical_across_processes(reference, two_processes):
    first, second = ({k: v for k, v in np.load(d / "estimators.npz").items()}
                     for d in two_processes)
    _assert_identical(first, second)
    _assert_identical(first, reference)  # and the same as in this process


@pytest.mark.slow
def test_decompose_command_is_reproducible_across_processes(two_processes):
    # the same relative --output, so the same stdout but for the wall-clock time
    stdout = [re.sub(r"\d+ s\n", "<seconds>\n", (d / "stdout.txt").read_text())
              for d in two_processes]
    assert stdout[0] == stdout[1]
    assert "warm_start_gap" in stdout[0]
    first, second = (d / "out" for d in two_processes)
    for name in ("decompose.csv", "decompose.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    rows = (first / "decompose.csv").read_text().splitlines()
    assert len(rows) == 4  # the header and three removed samples, with numbers in them
    assert all(re.search(r"\d\.\d", row) for row in rows[1:])


@pytest.mark.slow
def test_n_jobs_gives_identical_results_on_every_rung():
    """``test_execution.py`` compares ``n_jobs`` 1 and 2 for cold-start LOO and the
    batched PBRF. This covers the other rungs (warm start, proximal, the linear
    ones) through the Decomposer, the one-at-a-time path (removal_batch_size=1: a
    retraining and a Newton PBRF solve per task), and batches that do not divide
    the samples (5 in groups of 3: joblib's chunks used to regroup them 2 + 2 + 1,
    which changed the batched PBRF in the 13th digit)."""
    X, y = toy_data("MSELoss", n=30, d=4)
    net = make_net("MSELoss", 4, hidden=5, max_epochs=4, batch_size=8)
    rows = X[:5]
    for removal_batch_size in (1, 3):
        results = []
        for n_jobs in (1, 2):
            RESPONSE_CACHE.clear()
            dec = Decomposer(net, damping=0.1, removal_batch_size=removal_batch_size,
                             n_jobs=n_jobs, random_state=0).fit(X, y)
            results.append((dec.rung_responses(rows), dec.transform(rows)))
            assert len(dec.responder_.timings["warm_start"]) == len(rows)  # computed here
        (resp_1, terms_1), (resp_2, terms_2) = results
        assert list(resp_1) == list(resp_2)
        for name in resp_1:
            assert_array_equal(resp_2[name], resp_1[name], err_msg=name, strict=True)
        assert_array_equal(terms_2, terms_1, strict=True)
        assert np.all(terms_1[:, :4] > 0)  # the responses are not trivially zero


@pytest.mark.parametrize("n_items, batch", [(5, 3), (7, 2), (4, 1), (9, 32)])
def test_parallel_chunks_keep_the_groups_of_a_sequential_run(n_items, batch):
    """A batched solve's rounding depends on which samples share it, so joblib's
    chunks must be made of the sequential run's groups (threads: no start-up cost)."""
    import joblib

    from sklinfluence.utils.execution import run_responses

    def run(n_jobs):
        groups = []

        def compute(args):
            groups.append(tuple(a[0] for a in args))
            return [(torch.zeros(1), {"seconds": 0.0}) for _ in args]

        items = [(f"k{i}", (i,)) for i in range(n_items)]
        with joblib.parallel_config(backend="threading"):
            done = run_responses(compute, items, rung_key="r", n_jobs=n_jobs, batch=batch)
        assert sorted(done) == sorted(k for k, _ in items)
        return sorted(groups)

    sequential = run(1)
    assert sequential == [tuple(range(i, min(i + batch, n_items)))
                          for i in range(0, n_items, batch)]
    assert run(2) == sequential
