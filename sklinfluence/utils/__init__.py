"""Infrastructure every layer uses: memory limits (:mod:`~sklinfluence.utils.memory`),
torch threads (:mod:`~sklinfluence.utils.threads`), resumable joblib runs
(:mod:`~sklinfluence.utils.execution`), warnings attributed to the caller's line,
shared docstrings and scikit-learn's private API in one place.

Imports nothing from the package but ``_config`` and ``exceptions``.
"""
