"""Interrupted runs: Ctrl-C (KeyboardInterrupt) in the middle of a ``memory=`` run, and
failed writes of the command line's result files.

``test_execution.py`` kills a run with SIGKILL and checks that it resumes; here
the interrupt is raised inside the process, at chosen points — between two
samples, inside a batched group, in the middle of writing a cache entry — and
the cache must hold only complete, valid entries, and the next run must compute
only what is missing and return exactly what an uninterrupted run returns.
"""

import csv
import os
import stat

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

import sklinfluence.response.rungs as rungs
from nets import make_net, toy_data
from sklinfluence import LOOEstimator, PBRFEstimator
from sklinfluence.cli import main
from sklinfluence.utils.execution import DiskStore
from sklinfluence.response.responder import RESPONSE_CACHE

N_REMOVED = 6


@pytest.fixture(scope="module")
def data():
    return toy_data("CrossEntropyLoss", n=30)


#: ``(id, estimator factory, the rungs.py function computing one task, samples per task)``
CASES = (
    ("loo_one_at_a_time", lambda **kw: LOOEstimator(
        make_net("CrossEntropyLoss", 4, max_epochs=4), warm_start=True, removal_batch_size=1,
        random_state=0, **kw), "compute_each", 1),
    ("pbrf_batched", lambda **kw: PBRFEstimator(
        make_net("CrossEntropyLoss", 4, max_epochs=4), damping=0.3, removal_batch_size=2,
        random_state=0, **kw), "compute_pbrf_batch", 2),
)


class Counting:
    """Wraps a compute function: counts the samples it is asked for, and raises
    KeyboardInterrupt on its ``interrupt_at``-th call (1-based)."""

    def __init__(self, function, interrupt_at=None):
        self.function, self.interrupt_at = function, interrupt_at
        self.calls = self.samples = 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.samples += len(args[-1])  # the last argument is the list of tasks
        return self.function(*args)


def _assert_store_holds_only_valid_entries(store: DiskStore, rung_key: str, n: int) -> None:
    files = sorted(p for p in store.location.rglob("*") if p.is_file())
    assert all(p.suffix == ".npz" for p in files), files  # no temporary files left
    assert len(files) == n
    for path in files:
        loaded = store.load(rung_key, path.stem)
        assert loaded is not None, path  # complete, checksum right
        assert np.all(np.isfinite(loaded[0]))


@pytest.mark.parametrize("name, make, seam, per_task", CASES, ids=[c[0] for c in CASES])
def test_interrupted_run_leaves_valid_entries_and_resumes_the_rest(
        data, tmp_path, monkeypatch, name, make, seam, per_task):
    X, y = data
    rows = X[:N_REMOVED]
    fresh = make().fit(X, y).param_change(rows)  # uninterrupted, no memory
    RESPONSE_CACHE.clear()

    original = getattr(rungs, seam)
    threads = torch.get_num_threads()
    interrupted = make(memory=str(tmp_path)).fit(X, y)
    counter = Counting(original, interrupt_at=3)
    monkeypatch.setattr(rungs, seam, counter)
    with pytest.raises(KeyboardInterrupt):
        interrupted.param_change(rows)
    assert torch.get_num_threads() == threads  # the worker's thread setting is restored
    finished = 2 * per_task
    assert counter.samples == finished
    rung_key = interrupted.responder_.rung_key(interrupted._rung())
    store = DiskStore(tmp_path)
    _assert_store_holds_only_valid_entries(store, rung_key, finished)

    RESPONSE_CACHE.clear()
    counter = Counting(original)
    monkeypatch.setattr(rungs, seam, counter)
    resumed = make(memory=str(tmp_path)).fit(X, y)
    result = resumed.param_change(rows)
    assert counter.samples == N_REMOVED - finished  # only the missing ones
    assert_array_equal(result, fresh, strict=True)  # to the last bit
    _assert_store_holds_only_valid_entries(store, rung_key, N_REMOVED)


def test_interrupt_while_writing_a_cache_entry_keeps_the_good_one(tmp_path, monkeypatch):
    """Ctrl-C in the middle of ``np.savez``: the file under the final name, if any,
    is the previous complete one, and no partial or temporary file is left."""
    import sklinfluence.utils.execution as execution

    store = DiskStore(tmp_path)
    good = np.arange(5.0)
    store.save("rung", "sample", good, {"seconds": 1.0})
    real_savez = execution.np.savez

    def interrupted_savez(handle, **arrays):
        real_savez(handle, **arrays)
        handle.truncate(handle.tell() // 2)  # half the bytes are out
        raise KeyboardInterrupt

    monkeypatch.setattr(execution.np, "savez", interrupted_savez)
    for key in ("sample", "other"):  # over a good entry, and a new one
        with pytest.raises(KeyboardInterrupt):
            store.save("rung", key, -good, {"seconds": 2.0})
    monkeypatch.undo()
    files = [p.name for p in store.location.rglob("*") if p.is_file()]
    assert files == ["sample.npz"]
    delta, info = store.load("rung", "sample")
    assert_array_equal(delta, good) and info == {"seconds": 1.0}
    assert store.load("rung", "other") is None


def test_a_cache_entry_that_fails_to_load_is_removed_and_recomputed(data, tmp_path):
    """Complements the truncated-file test of ``test_execution.py``: a complete file
    whose checksum does not match its contents (bytes changed in place)."""
    X, y = data
    make, rows = CASES[0][1], X[:2]
    reference = make(memory=str(tmp_path)).fit(X, y).param_change(rows)
    store = DiskStore(tmp_path)
    victim = sorted(store.location.rglob("*.npz"))[0]
    with np.load(victim) as entry:
        arrays = dict(entry)
    arrays["delta"] = arrays["delta"] + 1.0  # a valid file that lies about its contents
    with open(victim, "wb") as handle:
        np.savez(handle, **arrays)
    RESPONSE_CACHE.clear()
    again = make(memory=str(tmp_path)).fit(X, y)
    assert_array_equal(again.param_change(rows), reference)
    assert len(again.responder_.timings["warm_start"]) == 1  # only the bad one recomputed


# ------------------------------------------------------ command-line results
RANK = ["rank", "--data", "synthetic", "--n-train", "60", "--epochs", "2", "--method", "loss",
        "--mislabel", "0.2", "--quiet"]


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "ctrl_c"])
def test_a_failed_write_never_replaces_a_good_result_file(tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "out"
    assert main([*RANK, "--seed", "0", "--output", str(out)]) == 0
    good = {name: (out / name).read_bytes() for name in ("rank.csv", "rank.png")}

    real_writer = csv.writer

    def failing_writer(handle, *args, **kwargs):  # writes half the rows, then fails
        writer = real_writer(handle, *args, **kwargs)

        class Half:
            def writerow(self, row):
                writer.writerow(row)

            def writerows(self, rows):
                rows = list(rows)
                writer.writerows(rows[:len(rows) // 2])
                handle.flush()
                raise error

        return Half()

    monkeypatch.setattr(csv, "writer", failing_writer)
    with pytest.raises(type(error)):
        main([*RANK, "--seed", "1", "--output", str(out)])  # other labels: other contents
    monkeypatch.undo()
    assert _listing(out) == ["rank.csv", "rank.png"]  # no partial or temporary file
    assert (out / "rank.csv").read_bytes() == good["rank.csv"]

    import matplotlib.figure

    def failing_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(good["rank.png"][:100])
        raise error

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    with pytest.raises(type(error)):
        main([*RANK, "--seed", "1", "--output", str(out)])
    monkeypatch.undo()
    assert _listing(out) == ["rank.csv", "rank.png"]
    assert (out / "rank.png").read_bytes() == good["rank.png"]
    new_csv = (out / "rank.csv").read_bytes()  # written whole before the figure failed
    assert new_csv != good["rank.csv"] and len(new_csv.splitlines()) == 61


def test_result_files_get_the_permissions_of_a_plain_write(tmp_path, capsys):
    """Writing to a temporary file and renaming it must not make results private:
    a new file gets ``0o666 & ~umask``, a rewritten one keeps its mode."""
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        assert main([*RANK, "--seed", "0", "--output", str(out)]) == 0
        for name in ("rank.csv", "rank.png"):
            assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
        os.chmod(out / "rank.csv", 0o640)
        assert main([*RANK, "--seed", "1", "--output", str(out)]) == 0
        assert stat.S_IMODE((out / "rank.csv").stat().st_mode) == 0o640
        assert stat.S_IMODE((out / "rank.png").stat().st_mode) == 0o644
    finally:
        os.umask(umask)
