"""The unit of work of the response layer: a removal, a set of rows.

Removing the set ``S`` is the objective ``J(θ) − Σ_{m∈S} ε L_m(θ)``;
one row is the classic leave-one-out. Every rung
computes, caches, batches, parallelises and resumes :class:`Removal` objects,
so single rows, groups (a data source, a class, the rows one labeller
touched) and the random halves of the linear datamodeling score are the same
kind of work.

:func:`single_removals` makes one removal per row; :func:`group_removals`
one per distinct label of a ``groups`` array, as scikit-learn's group
splitters read it.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Removal", "RowRemovals", "single_removals", "group_removals", "sample_key",
           "removal_chunks", "removal_rows", "single_rows", "stacked_rows"]


def sample_key(x: Tensor, t: Tensor) -> str:
    """Digest of one sample (input row and target)."""
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class Removal:
    """Rows removed together: inputs, targets and training positions.

    Attributes
    ----------
    X, T : Tensor
        The rows and their targets, ``(k, ...)``.
    index : tuple of int
        Each row's position among the training rows (−1 for a row that is
        not one; retraining rungs need training rows).
    label : object or None
        The group label of a removal made from ``groups`` (``None``
        otherwise); for messages only, not part of :attr:`key`.
    """

    X: Tensor
    T: Tensor
    index: tuple
    label: Any = None
    _key: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = int(self.X.shape[0])
        if k == 0 or int(self.T.shape[0]) != k or len(self.index) != k:
            raise ValueError(f"a removal needs at least one row and one target and index per "
                             f"row; got {k} rows, {int(self.T.shape[0])} targets and "
                             f"{len(self.index)} indices.")

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.X.shape[0])

    @property
    def key(self) -> str:
        """Digest of the rows and targets (the single row's own digest for one
        row, so that stored single-row responses stay valid; a group's digest is
        the one earlier versions gave a group of weight-1 rows)."""
        if not self._key:
            if self.size == 1:
                self._key.append(sample_key(self.X[0], self.T[0]))
            else:
                digest = hashlib.sha256(b"removal")
                for i in range(self.size):
                    digest.update(sample_key(self.X[i], self.T[i]).encode())
                self._key.append(digest.hexdigest()[:32])
        return self._key[0]


class RowRemovals(Sequence):
    """One removal per row of ``(X, T)``, each :class:`Removal` made when read.

    What :func:`single_removals` returns: a sequence like a list of
    removals, holding only the rows, their targets and positions (a
    :class:`Removal` per row costs about 1.5 KB: 30 MB at 20,000 rows), so
    that the streamed influence matrices and self-influence of many rows
    stack and chunk them without copies (:func:`stacked_rows`,
    :func:`removal_chunks`). Slicing gives a :class:`RowRemovals` of views.
    """

    def __init__(self, X: Tensor, T: Tensor, index: np.ndarray) -> None:
        if X.shape[0] != T.shape[0] or X.shape[0] != len(index):
            raise ValueError(f"one target and index per row: {X.shape[0]} rows, "
                             f"{T.shape[0]} targets, {len(index)} indices.")
        self.X, self.T, self.index = X, T, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return RowRemovals(self.X[i], self.T[i], self.index[i])
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"removal {i} of {n}")
        i %= n
        return Removal(self.X[i:i + 1], self.T[i:i + 1], (int(self.index[i]),))

    def __repr__(self) -> str:
        return f"RowRemovals({len(self)} rows)"


def stacked_rows(removals: Sequence[Removal], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every removal's rows stacked: ``(X, T, owner)``, ``owner`` each row's
    removal (its position in ``removals``) on ``like``'s device. The rows
    themselves, not a copy, for :class:`RowRemovals`."""
    if isinstance(removals, RowRemovals):
        return removals.X, removals.T, torch.arange(len(removals), device=like.device)
    X = torch.cat([removal.X for removal in removals])
    T = torch.cat([removal.T for removal in removals])
    owner = torch.repeat_interleave(
        torch.arange(len(removals), device=like.device),
        torch.tensor([removal.size for removal in removals], device=like.device))
    return X, T, owner


def single_rows(removals: Sequence[Removal]) -> bool:
    """Whether every removal is one row (without making each of a :class:`RowRemovals`)."""
    return isinstance(removals, RowRemovals) or all(removal.size == 1 for removal in removals)


def removal_rows(removals: Sequence[Removal]) -> int:
    """Rows of all removals together."""
    return len(removals) if isinstance(removals, RowRemovals) else \
        sum(removal.size for removal in removals)


def removal_chunks(removals: Sequence[Removal], max_rows: int | None) -> list:
    """``removals`` in order, in chunks of at most ``max_rows`` rows each (one removal
    at least; ``None``: one chunk, none for no removals); slices of a
    :class:`RowRemovals`."""
    if isinstance(removals, RowRemovals):
        step = len(removals) if max_rows is None else max(1, int(max_rows))
        return [removals[s:s + step] for s in range(0, len(removals), step)]
    if max_rows is None:
        return [list(removals)] if removals else []
    chunks, current, rows = [], [], 0
    for removal in removals:
        if current and rows + removal.size > max_rows:
            chunks.append(current)
            current, rows = [], 0
        current.append(removal)
        rows += removal.size
    return chunks + ([current] if current else [])


def single_removals(X: Tensor, T: Tensor, index: np.ndarray) -> RowRemovals:
    """One removal per row (:class:`RowRemovals`)."""
    return RowRemovals(X, T, index)


def group_removals(X: Tensor, T: Tensor, index: np.ndarray,
                   groups: Any) -> tuple[list[Removal], np.ndarray]:
    """One removal per distinct label of ``groups``; returns the removals and the labels.

    Parameters
    ----------
    X, T : Tensor
        The rows and their targets.
    index : ndarray of int
        Their training positions (−1: not a training row).
    groups : array-like of shape (n_rows,)
        A label per row; rows with the same label are removed together.
        Removals come in the order of :func:`numpy.unique` of the labels.

    Returns
    -------
    removals : list of Removal
    labels : ndarray
        The group label of each removal.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != X.shape[0]:
        raise ValueError(f"groups must be 1-D with one label per row: {X.shape[0]} rows but "
                         f"groups of shape {groups.shape}.")
    if groups.dtype.kind == "f":
        missing = np.flatnonzero(np.isnan(groups))
    elif groups.dtype.kind == "O":
        missing = np.flatnonzero([label is None or (isinstance(label, (float, np.floating))
                                                    and np.isnan(label)) for label in groups])
    else:
        missing = np.empty(0, dtype=int)
    if missing.size:
        raise ValueError(
            f"groups has no label (None or NaN) for {missing.size} of its {groups.shape[0]} "
            f"rows (first: row {missing[0]}); give every row a group label, e.g. its own "
            "row number for a row that belongs to no group.")
    try:
        labels, inverse = np.unique(groups, return_inverse=True)
    except TypeError as exc:
        raise ValueError(
            f"groups labels must be of one kind that sorts (all numbers or all strings); "
            f"got {sorted({type(label).__name__ for label in groups.tolist()})} ({exc})."
        ) from None
    removals = []
    for g in range(len(labels)):
        rows = np.flatnonzero(inverse == g)
        position = torch.as_tensor(rows, device=X.device)
        removals.append(Removal(X[position], T[position], tuple(int(index[i]) for i in rows),
                                labels[g]))
    return removals, labels
