"""The in-process cache of computed responses, owned by estimator families.

Ground-truth responses (retrainings, PBRF solves) are expensive and a grid
search asks for the same reference once per candidate. :data:`RESPONSE_CACHE`
keeps them, keyed by everything that determines them
(:meth:`~sklinfluence.response.responder.Responder.rung_key` and the removal's key), on
behalf of :class:`CacheOwner` tokens: an estimator and its clones share one,
and an entry is dropped when the last estimator of every family that computed
or reused it is garbage collected. Its size is
``get_config()["response_cache_bytes"]`` (:func:`sklinfluence.set_config`).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from .._config import get_config, on_change

__all__ = ["CacheOwner", "ResponseCache", "RESPONSE_CACHE"]


class CacheOwner:
    """A token that owns cached responses: one per estimator and its clones.

    :class:`~sklinfluence.base.BaseResponseEstimator` creates one the first
    time an estimator is fitted or cloned and gives it to every clone, so
    the candidates of a grid search (clones of one estimator) share one
    owner. :data:`RESPONSE_CACHE` drops an owner's responses when the token
    is garbage collected, that is when the last estimator of the family (and
    its fitted ``responder_``) is gone. A copy (``pickle``, ``deepcopy``) is
    a new token: a copied estimator is a family of its own.
    """

    __slots__ = ("serial", "__weakref__")
    _serials = itertools.count()

    def __init__(self) -> None:
        self.serial = next(CacheOwner._serials)

    def __reduce__(self) -> tuple:
        return (CacheOwner, ())

    def __repr__(self) -> str:
        return f"CacheOwner(serial={self.serial})"


@dataclass
class _Entry:
    value: tuple
    nbytes: int
    owners: set = field(default_factory=set)


def _owner_gone(cache_ref: weakref.ref, serial: int) -> None:
    """Finalizer of a :class:`CacheOwner`: drop its responses (now, or at the next call)."""
    cache = cache_ref()
    if cache is None:
        return
    cache._gone.append(serial)
    # Non-blocking: the collector may run inside a cache call (this thread holds the
    # lock) or while another thread is in one; that call drops the entries instead.
    if cache._lock.acquire(blocking=False):
        try:
            cache._collect()
        finally:
            cache._lock.release()


def _compact(delta: Tensor) -> Tensor:
    """``delta`` detached and owning exactly its bytes (a row view of a batch is copied)."""
    delta = delta.detach()
    if (not delta.is_contiguous()
            or delta.untyped_storage().nbytes() != delta.numel() * delta.element_size()):
        delta = delta.clone(memory_format=torch.contiguous_format)
    return delta


class ResponseCache:
    """In-process LRU of computed responses, bounded by the bytes it holds.

    Keys are :meth:`Responder.rung_key` digests plus the removed sample, so
    a response is reused only where it would be recomputed identically.
    Every entry records the :class:`CacheOwner` tokens of the estimator
    families that computed or reused it, and is dropped when the last of
    them is garbage collected: responses are shared across calls, across an
    estimator's clones (grid-search candidates) and across estimators alive
    at the same time, never kept for estimators that are gone.

    Parameters
    ----------
    max_bytes : int or None, default=None
        Bound on the bytes of responses held; ``0`` stores nothing. ``None``
        follows ``get_config()["response_cache_bytes"]`` (see
        :func:`sklinfluence.set_config`), as :data:`RESPONSE_CACHE` does.

    Attributes
    ----------
    max_bytes : int
        The bound in force.
    nbytes : int
        Bytes of responses held (each counted once, however many owners).

    Examples
    --------
    >>> from sklinfluence.response.responder import RESPONSE_CACHE
    >>> len(RESPONSE_CACHE), RESPONSE_CACHE.nbytes  # entries, bytes held
    (0, 0)
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._max_bytes = _check_max_bytes(max_bytes)
        self._items: OrderedDict = OrderedDict()  # key -> _Entry, least recently used first
        self._owned: dict = {}  # owner serial -> keys of its entries (finalizer registered)
        self._gone: list = []  # serials of collected owners not yet dropped
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def max_bytes(self) -> int:
        """The bound in force (the configured one unless set for this cache)."""
        if self._max_bytes is not None:
            return self._max_bytes
        return get_config()["response_cache_bytes"]

    @property
    def nbytes(self) -> int:
        """Bytes of responses held."""
        with self._lock:
            self._collect()
            return self._nbytes

    def get(self, key: tuple, owner: CacheOwner | None = None) -> tuple | None:
        """The cached ``(delta, info)`` of ``key``, or None; ``owner`` becomes an owner of it."""
        with self._lock:
            self._collect()
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            if owner is not None:
                self._adopt(key, entry, owner)
            return entry.value

    def put(self, key: tuple, value: tuple, *, owner: CacheOwner) -> None:
        """Keep ``value = (delta, info)`` for ``key`` while ``owner`` (or another owner) lives.

        ``delta`` is stored detached and compact: a view (e.g. a row of a
        batch) is copied so that it does not hold the whole batch's memory.
        Nothing is stored when it alone exceeds the bound.
        """
        size = value[0].numel() * value[0].element_size()
        if size > self.max_bytes:
            return
        delta = _compact(value[0])
        with self._lock:
            self._collect()
            if size > self.max_bytes:  # changed meanwhile
                return
            owners = set()
            if key in self._items:
                owners = self._items[key].owners
                self._remove(key)
            entry = _Entry((delta, value[1]), size)
            self._items[key] = entry
            self._nbytes += size
            for serial in owners:  # still registered: they are alive
                entry.owners.add(serial)
                self._owned[serial].add(key)
            self._adopt(key, entry, owner)
            self._evict(self.max_bytes)
            self._collect()

    def resize(self, max_bytes: int | None = None) -> None:
        """Set the bound (``None``: follow the configuration) and evict to meet it.

        The least recently used entries go first. For :data:`RESPONSE_CACHE`
        prefer ``sklinfluence.set_config(response_cache_bytes=...)``, which
        calls this.
        """
        max_bytes = _check_max_bytes(max_bytes)
        with self._lock:
            self._max_bytes = max_bytes
            self._collect()
            self._evict(self.max_bytes)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._items.clear()
            self._nbytes = 0
            for keys in self._owned.values():
                keys.clear()
            self._collect()

    def __len__(self) -> int:
        with self._lock:
            self._collect()
            return len(self._items)

    def __repr__(self) -> str:
        return f"ResponseCache({len(self)} responses, {self.nbytes} of {self.max_bytes} bytes)"

    # Internals; called with the lock held.
    def _adopt(self, key: tuple, entry: _Entry, owner: CacheOwner) -> None:
        keys = self._owned.get(owner.serial)
        if keys is None:
            keys = self._owned[owner.serial] = set()
            finalizer = weakref.finalize(owner, _owner_gone, weakref.ref(self), owner.serial)
            finalizer.atexit = False
        keys.add(key)
        entry.owners.add(owner.serial)

    def _remove(self, key: tuple) -> None:
        entry = self._items.pop(key)
        self._nbytes -= entry.nbytes
        for serial in entry.owners:
            self._owned[serial].discard(key)

    def _evict(self, bound: int) -> None:
        while self._nbytes > bound:
            self._remove(next(iter(self._items)))

    def _collect(self) -> None:
        while self._gone:
            serial = self._gone.pop()
            for key in self._owned.pop(serial, ()):
                entry = self._items.get(key)
                if entry is None:
                    continue
                entry.owners.discard(serial)
                if not entry.owners:
                    del self._items[key]
                    self._nbytes -= entry.nbytes


def _check_max_bytes(max_bytes: Any) -> int | None:
    if max_bytes is not None and (isinstance(max_bytes, bool)
                                  or not isinstance(max_bytes, Integral) or max_bytes < 0):
        raise ValueError(
            "max_bytes must be None (follow get_config()['response_cache_bytes']) or an "
            f"integer >= 0 (0 stores nothing), got {max_bytes!r}.")
    return None if max_bytes is None else int(max_bytes)


#: The process-wide response cache (see :class:`ResponseCache`); its bound is
#: ``get_config()["response_cache_bytes"]``.
RESPONSE_CACHE = ResponseCache()
# follow each new setting at once, evicting to meet it
on_change("response_cache_bytes", lambda: RESPONSE_CACHE.resize(None))
