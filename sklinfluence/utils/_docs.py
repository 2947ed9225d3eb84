"""Parameter descriptions that several estimators share, written once.

A class docstring names a fragment on a line of its own, ``{execution}`` at
the parameters' indentation; :func:`fill_doc` puts the text there.
"""

from __future__ import annotations

_FRAGMENTS = {
    "pbrf_batch": """\
removal_batch_size : int, default=32
    Removed samples whose PBRF is solved together: their gradients are
    vectorised over a stack of parameter copies and iterate with the
    damped Gauss–Newton matrix shared by all (a chord method; samples
    that do not contract fall back to one-at-a-time Newton). Answers
    equal the one-at-a-time path to within ``tol``; 1 solves one at a
    time. Memory per sample in a batch: about ``8 (4P + 3 N W)`` bytes for
    ``P`` parameters, ``N`` training rows and ``W`` summed layer widths;
    once per fit, building the shared factor holds about ``18 P²``
    bytes where it is dense (the matrix, its factor and the build's
    accumulator; plus ``4096 K P`` for ``K`` outputs when some parameters
    are outside ``nn.Linear`` layers).""",
    "measure": """\
measure : {"loss", "linear"}, default="loss"
    How a response is turned into a score (:mod:`sklinfluence.response.measure`):
    ``"loss"``, the change of the loss at the response,
    ``Q(θˢ + Δθ) − Q(θˢ)``; ``"linear"``, its first-order form
    ``∇Q(θˢ)ᵀ Δθ`` (for the influence rungs the classic influence function,
    :class:`~sklinfluence.InfluenceEstimator`'s default).""",
    "execution": """\
n_jobs : int, default=None
    joblib workers over removed samples (``None``: 1 unless in a
    ``joblib.parallel_config`` context; ``-1``: all cores). Each worker
    uses one torch thread. ``with joblib.parallel_config(backend="dask")``
    runs the work on a Dask cluster.
memory : str, path or joblib.Memory, default=None
    Directory where each removed sample's finished response is saved as
    it completes, keyed by everything that determines it; a killed run
    restarted with the same ``memory`` recomputes only what is missing.
verbose : int, default=0
    > 0 shows a progress bar over removed samples.""",
}


def fill_doc(cls):
    """Replace each ``{name}`` line of ``cls.__doc__`` by the fragment ``name``."""
    doc = cls.__doc__
    for name, text in _FRAGMENTS.items():
        marker = "{" + name + "}"
        for line in doc.splitlines():
            if line.strip() == marker:
                indent = line[:len(line) - len(line.lstrip())]
                block = "\n".join(indent + row if row else row for row in text.splitlines())
                doc = doc.replace(line, block)
    cls.__doc__ = doc
    return cls
