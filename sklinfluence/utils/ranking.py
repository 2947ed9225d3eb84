"""The ``k`` largest scores per column of a matrix streamed in blocks of rows."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TopK"]


class TopK:
    """Keeps, for each of ``n_columns`` columns, the ``k`` largest scores seen and
    the row each came from, as blocks of rows arrive: memory ``k × n_columns``
    whatever the number of rows.

    Parameters
    ----------
    k : int
        How many to keep per column (fewer while fewer rows have arrived).
    n_columns : int
        Columns of every block.

    Examples
    --------
    >>> import torch
    >>> top = TopK(2, 1)
    >>> top.add(torch.tensor([[0.5], [3.0]]))
    >>> top.add(torch.tensor([[1.0], [-2.0]]))
    >>> top.result()
    (tensor([[1],
            [2]]), tensor([[3.],
            [1.]], dtype=torch.float64))
    """

    def __init__(self, k: int, n_columns: int) -> None:
        self.k = int(k)
        self.scores = torch.empty((0, n_columns), dtype=torch.float64)
        self.rows = torch.empty((0, n_columns), dtype=torch.long)
        self.n_rows = 0

    def add(self, block: Tensor, start: int | None = None) -> None:
        """Merge a ``(rows, n_columns)`` block whose first row is row ``start``
        (None: the row after the last one added)."""
        block = block.to(torch.float64).cpu()
        start = self.n_rows if start is None else int(start)
        index = torch.arange(start, start + block.shape[0]).unsqueeze(1)
        scores = torch.cat([self.scores, block])
        rows = torch.cat([self.rows, index.expand_as(block)])
        top = torch.topk(scores, min(self.k, scores.shape[0]), dim=0, sorted=True)
        self.scores, self.rows = top.values, rows.gather(0, top.indices)
        self.n_rows = max(self.n_rows, start + block.shape[0])

    def result(self) -> tuple[Tensor, Tensor]:
        """``(rows, scores)``, each ``(min(k, rows seen), n_columns)``, largest first."""
        return self.rows, self.scores
