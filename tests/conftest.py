"""Test configuration: one torch thread (2-core machines), shared fixtures."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
