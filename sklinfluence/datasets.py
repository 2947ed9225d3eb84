"""Data sets and models for the command line: built-in names or a CSV file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["BUILTIN", "Dataset", "MLP", "load_dataset", "make_net"]

#: Built-in data sets: name → task.
BUILTIN = {"digits": "classification", "breast_cancer": "classification",
           "diabetes": "regression", "synthetic": "classification"}


@dataclass
class Dataset:
    """Features, targets and what kind of problem they are."""

    X: np.ndarray
    y: np.ndarray
    task: str  # "classification" or "regression"
    name: str
    feature_names: list

    @property
    def n_classes(self) -> int:
        return len(np.unique(self.y)) if self.task == "classification" else 0


def _load_builtin(name: str, random_state: int) -> Dataset:
    from sklearn import datasets

    if name == "synthetic":
        X, y = datasets.make_classification(n_samples=600, n_features=20, n_informative=8,
                                            n_classes=3, random_state=random_state)
        names = [f"x{i}" for i in range(X.shape[1])]
    else:
        bunch = getattr(datasets, f"load_{name}")()
        X, y = bunch.data, bunch.target
        names = [str(n) for n in getattr(bunch, "feature_names", range(X.shape[1]))]
    return Dataset(np.asarray(X, dtype=np.float64), np.asarray(y), BUILTIN[name], name, names)


def _load_csv(path: Path, target: str | None, task: str) -> Dataset:
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file, and not a built-in data set "
                         f"({', '.join(BUILTIN)}).")
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"--data {path}: cannot read it as CSV ({exc}).") from exc
    if len(rows) < 3:
        raise ValueError(f"--data {path}: needs a header row and at least 2 data rows.")
    header, body = rows[0], rows[1:]
    if any(len(row) != len(header) for row in body):
        raise ValueError(f"--data {path}: rows have different numbers of fields.")
    target = header[-1] if target is None else target
    if target not in header:
        raise ValueError(f"--target {target!r} is not a column of {path}; columns are "
                         f"{', '.join(header)}.")
    column = header.index(target)
    features = [name for i, name in enumerate(header) if i != column]
    try:
        X = np.array([[float(v) for i, v in enumerate(row) if i != column] for row in body])
    except ValueError as exc:
        raise ValueError(f"--data {path}: feature columns must be numeric ({exc}); encode "
                         "categorical features before.") from exc
    if not np.all(np.isfinite(X)):
        raise ValueError(f"--data {path}: features contain NaN or infinite values.")
    y, task = _targets(np.array([row[column] for row in body]), target, task)
    return Dataset(X, y, task, path.name, features)


def _load_npz(path: Path, task: str) -> Dataset:
    """``X`` (any shape ``(n, ...)``: rows, images, sequences) and ``y`` from an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data or "y" not in data:
                raise ValueError(f"--data {path}: needs arrays named 'X' and 'y'; it holds "
                                 f"{', '.join(data.files) or 'none'}.")
            X, raw = data["X"], data["y"]
    except (OSError, ValueError) as exc:
        if str(exc).startswith("--data"):
            raise
        raise ValueError(f"--data {path}: cannot read it as .npz ({exc}).") from exc
    if X.ndim < 2 or raw.ndim != 1 or len(X) != len(raw) or len(X) < 2:
        raise ValueError(f"--data {path}: needs X of shape (n, ...) and y of shape (n,) "
                         f"with n >= 2; got X {X.shape} and y {raw.shape}.")
    try:
        X = X.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--data {path}: X must be numeric ({exc}).") from exc
    if not np.all(np.isfinite(X)):
        raise ValueError(f"--data {path}: X contains NaN or infinite values.")
    y, task = _targets(raw, "y", task)
    return Dataset(X, y, task, path.name, [f"x{i}" for i in range(int(np.prod(X.shape[1:])))])


def _targets(raw: np.ndarray, target: str, task: str) -> tuple[np.ndarray, str]:
    """Targets and task from a column of raw values (``task="auto"`` infers it)."""
    numeric = True
    try:
        values = raw.astype(np.float64)
    except ValueError:
        numeric = False
    if task == "auto":
        task = ("classification" if not numeric or
                (np.all(values == np.round(values)) and len(np.unique(values)) <= 20)
                else "regression")
    if task == "regression":
        if not numeric:
            raise ValueError(f"--target {target!r} is not numeric; use --task classification.")
        y = values
    elif numeric and not np.all(values == np.round(values)):
        raise ValueError(f"--target {target!r} has continuous values (like {raw[0]!r}), "
                         "which are not class labels; use --task regression.")
    else:
        y = values.astype(np.int64) if numeric else raw
    return y, task


def load_dataset(name: str, *, target: str | None = None, task: str = "auto",
                 random_state: int = 0) -> Dataset:
    """A built-in data set by name, a CSV file (``target`` column, default the last),
    or an ``.npz`` file with arrays ``X`` (rows, images ``(n, C, H, W)``, …) and ``y``."""
    if name in BUILTIN:
        data = _load_builtin(name, random_state)
        if task not in ("auto", data.task):
            raise ValueError(f"data set {name!r} is a {data.task} problem, not {task}.")
        return data
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path, task)
    return _load_csv(path, target, task)


class MLP(torch.nn.Sequential):
    """``Linear → Tanh`` blocks of the given widths, then a linear output (float64).

    ``flatten=True`` puts an ``nn.Flatten`` first, for inputs of more than one
    axis per row (images); ``n_in`` is then the number of values per row.
    """

    def __init__(self, n_in: int = 1, widths: tuple = (32,), n_out: int = 1,
                 flatten: bool = False):
        layers, previous = ([torch.nn.Flatten()] if flatten else []), n_in
        for width in widths:
            layers += [torch.nn.Linear(previous, width), torch.nn.Tanh()]
            previous = width
        layers.append(torch.nn.Linear(previous, n_out))
        super().__init__(*layers)
        self.double()


def make_net(data: Dataset, *, widths: tuple, epochs: int, lr: float, weight_decay: float,
             batch_size: int = 64):
    """A skorch net for ``data``: cross-entropy classifier or MSE regressor."""
    from skorch import NeuralNetClassifier, NeuralNetRegressor

    common = dict(module=MLP, module__n_in=int(np.prod(data.X.shape[1:])),
                  module__flatten=data.X.ndim > 2, module__widths=tuple(widths),
                  lr=lr, optimizer__momentum=0.9, optimizer__weight_decay=weight_decay,
                  batch_size=batch_size, max_epochs=epochs, iterator_train__shuffle=True,
                  verbose=0)
    if data.task == "classification":
        return NeuralNetClassifier(criterion=torch.nn.CrossEntropyLoss,
                                   module__n_out=data.n_classes, **common)
    return NeuralNetRegressor(module__n_out=1, **common)
