"""The library chooses torch's thread count inside its own computations and restores it."""

import pytest
import torch
from skorch.callbacks import Callback

from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, config_context, set_config
from sklinfluence.utils import threads as threads_module
from sklinfluence.cli import main
from sklinfluence.utils.threads import MANY_THREADS_MIN_PARAMS, THREAD_VARIABLES, automatic_threads

X, Y = toy_data("MSELoss", n=30)
SEEN: list = []  # thread counts seen while the net trains (callbacks are cloned: module level)


class RecordThreads(Callback):
    def on_epoch_end(self, net, **kwargs):
        SEEN.append(torch.get_num_threads())


@pytest.fixture
def caller_threads(monkeypatch):
    """No thread variables set, the caller on 3 threads; torch's setting restored after."""
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    SEEN.clear()
    yield 3
    torch.set_num_threads(before)


def net(**kw):
    return make_net("MSELoss", 4, max_epochs=2, callbacks=[RecordThreads()], **kw)


def test_small_models_compute_on_one_thread_and_the_callers_setting_comes_back(caller_threads):
    est = InfluenceEstimator(net(), random_state=0).fit(X, Y)
    assert SEEN == [1, 1]
    assert torch.get_num_threads() == caller_threads
    est.score_samples(X[:3])
    assert torch.get_num_threads() == caller_threads


def test_thread_variables_leave_torch_alone(caller_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    InfluenceEstimator(net(), random_state=0).fit(X, Y)
    assert SEEN == [3, 3]
    assert automatic_threads(10) is None


def test_set_config_overrides_the_choice(caller_threads):
    with config_context(n_threads=2):
        InfluenceEstimator(net(), random_state=0).fit(X, Y)
        assert automatic_threads(10) == 2
    assert SEEN == [2, 2]
    assert torch.get_num_threads() == caller_threads


def test_large_models_get_the_available_cores_once_their_size_is_known(caller_threads,
                                                                       monkeypatch):
    monkeypatch.setattr(threads_module, "_available_cores", lambda: 2)
    wide = make_net("MSELoss", 4, hidden=MANY_THREADS_MIN_PARAMS // 4, max_epochs=1,
                    callbacks=[RecordThreads()])
    est = InfluenceEstimator(wide, solver="cg", random_state=0).fit(X[:6], Y[:6])
    assert est.model_.n_params >= MANY_THREADS_MIN_PARAMS
    assert SEEN == [2]
    assert torch.get_num_threads() == caller_threads


def test_the_setting_is_restored_when_a_computation_fails(caller_threads):
    with pytest.raises(ValueError, match="not training rows"):
        Decomposer(net(), random_state=0).fit(X, Y).transform(X[:2] + 9.0)
    assert torch.get_num_threads() == caller_threads


def test_the_command_line_takes_n_threads(caller_threads, tmp_path, capsys):
    seen = []
    original = threads_module._apply

    def spy(n_params):
        original(n_params)
        seen.append(torch.get_num_threads())

    threads_module._apply = spy
    try:
        assert main(["rank", "--n-train", "60", "--epochs", "2", "--quiet", "--method", "loss",
                     "--n-threads", "2", "--output", str(tmp_path)]) == 0
    finally:
        threads_module._apply = original
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == caller_threads


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_n_threads_is_refused(value):
    with pytest.raises(ValueError, match="n_threads must be None"):
        set_config(n_threads=value)


def test_response_cache_bytes_is_validated():
    with pytest.raises(ValueError, match="response_cache_bytes must be an integer"):
        set_config(response_cache_bytes=-1)
    with pytest.raises(TypeError, match="unknown settings"):
        with config_context(threads=2):
            pass  # pragma: no cover
