"""Running many responses (one per removal): parallel, resumable, with progress.

Ground-truth rungs (retraining, the PBRF) cost a solve per removed sample.
:func:`run_responses` spreads the samples that are not already known over
joblib workers — so ``with joblib.parallel_config(backend="dask"):`` runs them
on a Dask cluster unchanged — persists each finished sample through a
:class:`DiskStore` as soon as it completes, and shows a tqdm bar.

Each worker computes with ``threads`` torch intra-op threads (default 1, so
that ``n_jobs`` workers do not oversubscribe the cores) and restores the
previous setting afterwards.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from joblib import Memory, Parallel, delayed, effective_n_jobs
from tqdm.auto import tqdm

__all__ = ["DiskStore", "resolve_memory", "run_responses", "streaming_parallel", "map_parts"]

_FORMAT = 1


class DiskStore:
    """One ``.npz`` file per (rung key, sample): written atomically, verified on load.

    A file holds the response, its per-sample diagnostics and a SHA-256 of
    the response; it is written to a temporary name and renamed into place,
    so a killed run leaves either a whole file or none. A file that does not
    load (truncated, corrupt, wrong checksum) is removed and recomputed.
    Loading never unpickles (``allow_pickle=False``).

    Parameters
    ----------
    location : str or Path
        Directory; created if needed.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = Path(location) / "sklinfluence-responses"

    def _path(self, rung_key: str, key: str) -> Path:
        return self.location / rung_key[:32] / f"{key}.npz"

    def load(self, rung_key: str, key: str) -> tuple[np.ndarray, dict] | None:
        path = self._path(rung_key, key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                delta = np.array(data["delta"])
                ok = (int(data["format"]) == _FORMAT
                      and str(data["rung_key"]) == rung_key
                      and str(data["checksum"]) == hashlib.sha256(delta.tobytes()).hexdigest())
                info = {name[5:]: data[name].item() for name in data.files
                        if name.startswith("info_")}
        except Exception:  # truncated or corrupt: recompute
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            return None
        return delta, info

    def save(self, rung_key: str, key: str, delta: np.ndarray, info: dict) -> None:
        path = self._path(rung_key, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"delta": delta, "format": np.array(_FORMAT), "rung_key": np.array(rung_key),
                  "checksum": np.array(hashlib.sha256(delta.tobytes()).hexdigest())}
        arrays.update({f"info_{k}": np.array(v) for k, v in info.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def count(self, rung_key: str) -> int:
        """Number of stored responses for a rung key."""
        folder = self.location / rung_key[:32]
        return len(list(folder.glob("*.npz"))) if folder.exists() else 0


def streaming_parallel(n_jobs: int | None) -> Parallel:
    """A joblib ``Parallel`` that yields results as they finish, where the active
    backend can (loky, threads, Dask), and returns them all at the end under one
    that cannot (``multiprocessing``): callers iterate over either alike."""
    try:
        return Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    except ValueError:  # a backend without generators
        return Parallel(n_jobs=n_jobs)


def _one_part(function: Callable, position: int, part: Any, threads: int) -> tuple[int, Any]:
    with torch_threads(threads):
        return position, function(part)


def map_parts(function: Callable, parts: list, n_jobs: int | None,
              threads: int = 1) -> Iterable[tuple[int, Any]]:
    """``(position, function(part))`` for each of ``parts``: in order in this process
    when ``n_jobs`` gives one worker (or there is one part), else on joblib's
    workers — a Dask cluster under ``joblib.parallel_config(backend="dask")`` —
    with ``threads`` torch threads each, as they finish (callers place them by
    ``position``). ``function`` must be picklable for process-based backends."""
    if len(parts) < 2 or effective_n_jobs(n_jobs) == 1:
        for position, part in enumerate(parts):
            yield position, function(part)
        return
    tasks = (delayed(_one_part)(function, position, part, threads)
             for position, part in enumerate(parts))
    yield from streaming_parallel(n_jobs)(tasks)


def resolve_memory(memory: Any) -> DiskStore | None:
    """``memory`` as scikit-learn's ``Pipeline`` takes it: None, a path or a ``joblib.Memory``."""
    if memory is None:
        return None
    if isinstance(memory, Memory):
        return None if memory.location is None else DiskStore(memory.location)
    if isinstance(memory, (str, os.PathLike)):
        return DiskStore(memory)
    raise ValueError(f"memory must be None, a directory path or a joblib.Memory; got "
                     f"{type(memory).__name__}.")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for a ``with`` block (a worker's
    share), the previous setting restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_chunk(compute: Callable, items: list, rung_key: str, store: DiskStore | None,
               threads: int, batch: int) -> list:
    with torch_threads(threads):
        results = []
        for i in range(0, len(items), batch):
            group = items[i:i + batch]
            for (key, _), (delta, info) in zip(group, compute([args for _, args in group])):
                if store is not None:
                    store.save(rung_key, key, delta.detach().cpu().numpy(), info)
                results.append((key, delta, info))
        return results


def run_responses(compute: Callable, items: Iterable[tuple[str, tuple]], *, rung_key: str,
                  n_jobs: int | None = None, store: DiskStore | None = None,
                  verbose: int = 0, desc: str = "", threads: int = 1, batch: int = 1,
                  like: torch.Tensor | None = None) -> dict:
    """Compute the responses of the ``(key, args)`` items not found in ``store``.

    ``compute(list_of_args)`` returns one ``(delta, info)`` per args; it is
    called on groups of ``batch`` items (batched solvers), and each group's
    results are saved before the next group starts. Returns
    ``{key: (delta, info, computed)}`` with ``computed`` False for results
    loaded from the store. Work goes to joblib in chunks of several whole groups,
    so that each task is worth shipping and the groups — hence the answers, to
    the last bit — are those of a sequential run.
    """
    items = list(items)
    results: dict = {}
    todo = []
    for key, args in items:
        found = store.load(rung_key, key) if store is not None else None
        if found is None:
            todo.append((key, args))
        else:
            delta = torch.as_tensor(found[0])
            if like is not None:
                delta = delta.to(dtype=like.dtype, device=like.device)
            results[key] = (delta, found[1], False)
    bar = tqdm(total=len(items), initial=len(results), desc=desc,
               disable=not verbose or not todo, unit="sample")
    try:
        workers = effective_n_jobs(n_jobs)
        if todo and workers > 1:
            # Chunks of whole groups: each sample is solved in the same group as with
            # n_jobs=1 (a batched solve's rounding depends on who shares it), so the
            # answers do not depend on n_jobs.
            groups = [todo[i:i + batch] for i in range(0, len(todo), batch)]
            size = max(1, math.ceil(len(groups) / (2 * workers)))
            chunks = [[item for group in groups[i:i + size] for item in group]
                      for i in range(0, len(groups), size)]
            tasks = (delayed(_run_chunk)(compute, chunk, rung_key, store, threads, batch)
                     for chunk in chunks)
            for done in streaming_parallel(n_jobs)(tasks):
                for key, delta, info in done:
                    results[key] = (delta, info, True)
                bar.update(len(done))
        else:
            for i in range(0, len(todo), batch):
                done = _run_chunk(compute, todo[i:i + batch], rung_key, store,
                                  torch.get_num_threads(), batch)
                for key, delta, info in done:
                    results[key] = (delta, info, True)
                bar.update(len(done))
    finally:
        bar.close()
    return results
