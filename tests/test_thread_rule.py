"""The thread rule at its boundary: a model of at least ``MANY_THREADS_MIN_PARAMS``
(100,000) parameters computes on every available core, one parameter fewer on one
thread — whether the size is known when the section starts or learnt inside it."""

import pytest
import torch

from sklinfluence.utils import threads as threads_module
from sklinfluence.utils.threads import (MANY_THREADS_MIN_PARAMS, THREAD_VARIABLES, automatic_threads,
                                  compute_section, model_size_known)

CORES = 7  # what the machine is said to have: neither 1 nor the caller's setting


@pytest.fixture
def default_rule(monkeypatch):
    """No thread variables, no configured count, ``CORES`` available cores, the caller
    on 3 threads (torch's own setting restored after)."""
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads_module, "_available_cores", lambda: CORES)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_the_boundary_is_100000_parameters_inclusive(default_rule):
    assert MANY_THREADS_MIN_PARAMS == 100_000
    assert automatic_threads(99_999) == 1
    assert automatic_threads(100_000) == CORES
    assert automatic_threads(100_001) == CORES
    assert automatic_threads(None) == 1


class _Fitted:
    """Stands for a fitted estimator whose model has ``n_params`` parameters."""

    def __init__(self, n_params):
        self.model_ = type("Model", (), {"n_params": n_params})()

    @compute_section
    def threads_inside(self):
        return torch.get_num_threads()


class _Unfitted:
    """Learns its model's size inside the section (as ``fit`` does)."""

    @compute_section
    def threads_after_learning(self, n_params):
        model_size_known(n_params)
        return torch.get_num_threads()


@pytest.mark.parametrize("n_params, expected", [(99_999, 1), (100_000, CORES),
                                                (100_001, CORES)])
def test_a_section_uses_the_rule_at_the_boundary_and_restores_the_caller(default_rule,
                                                                         n_params, expected):
    assert _Fitted(n_params).threads_inside() == expected
    assert torch.get_num_threads() == 3
    assert _Unfitted().threads_after_learning(n_params) == expected
    assert torch.get_num_threads() == 3
