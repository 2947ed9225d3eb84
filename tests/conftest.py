"""Test configuration: one torch thread (2-core machines), shared fixtures."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_response_cache():
    """Each test computes its own responses (the cache is process-wide)."""
    from sklinfluence.response.responder import RESPONSE_CACHE

    RESPONSE_CACHE.clear()
    yield
    RESPONSE_CACHE.clear()
