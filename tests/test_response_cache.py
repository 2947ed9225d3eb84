"""The in-process response cache: who owns its entries, how long they live, its bound."""

import gc
import pickle

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.utils.validation import check_is_fitted

import sklinfluence.response.responder as response
from nets import make_net, toy_data
from sklinfluence import InfluenceEstimator, LOOEstimator, RemovalSplit, config_context, get_config
from sklinfluence.response.responder import RESPONSE_CACHE, CacheOwner, ResponseCache


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    return X, X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=20)


@pytest.fixture
def computed(monkeypatch):
    """Counts the responses actually computed (not found in the cache)."""
    count = [0]
    run = response.run_responses

    def counting(compute, items, **kwargs):
        items = list(items)
        count[0] += len(items)
        return run(compute, items, **kwargs)

    monkeypatch.setattr(response, "run_responses", counting)
    return count


def _loo(**params):
    return LOOEstimator(Ridge(alpha=1.0), random_state=0, **params)


def test_entries_live_while_an_estimator_of_the_family_lives(data):
    X, y = data
    est = _loo().fit(X, y)
    est.score_samples(X[:4])
    assert len(RESPONSE_CACHE) == 4 and RESPONSE_CACHE.nbytes == 4 * 4 * 8  # 4 params
    twin = clone(est)  # a clone (e.g. a grid-search candidate) shares the owner
    del est
    gc.collect()
    assert len(RESPONSE_CACHE) == 4
    del twin
    gc.collect()
    assert len(RESPONSE_CACHE) == 0 and RESPONSE_CACHE.nbytes == 0


def test_a_skorch_estimator_releases_its_responses_when_collected():
    X, y = toy_data("CrossEntropyLoss", n=20)
    est = InfluenceEstimator(make_net("CrossEntropyLoss", 4, max_epochs=2), random_state=0)
    est.fit(X, y).score(X[:3], y[:3])  # the LOO reference: 3 retrainings, cached
    assert len(RESPONSE_CACHE) == 3
    del est
    gc.collect()
    assert len(RESPONSE_CACHE) == 0 and RESPONSE_CACHE.nbytes == 0


def test_grid_search_computes_each_reference_once_and_releases_it(computed):
    X, y = toy_data("CrossEntropyLoss", n=20)
    template = InfluenceEstimator(make_net("CrossEntropyLoss", 4, max_epochs=2),
                                  random_state=0)
    search = GridSearchCV(template, {"damping": [1e-3, 1e-1, 10.0]},
                          cv=RemovalSplit(n_remove=4, random_state=0)).fit(X, y)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert computed[0] == 4  # three candidates, one LOO retraining per removed row
    assert len(RESPONSE_CACHE) == 4  # kept while the template (or best_estimator_) lives
    del search
    gc.collect()
    assert len(RESPONSE_CACHE) == 4  # the template is still alive
    del template
    gc.collect()
    assert len(RESPONSE_CACHE) == 0


def test_independent_estimators_share_while_both_live(data, computed):
    X, y = data
    first = _loo().fit(X, y)
    reference = first.param_change(X[:3])
    second = _loo().fit(X, y)  # not a clone: the same computation, its own owner
    assert_array_equal(second.param_change(X[:3]), reference)
    assert computed[0] == 3  # found, and now owned by both
    del first
    gc.collect()
    assert len(RESPONSE_CACHE) == 3
    del second
    gc.collect()
    assert len(RESPONSE_CACHE) == 0


def test_cache_off_stores_nothing_and_gives_the_same_results(data, computed):
    X, y = data
    cached = _loo().fit(X, y).param_change(X[:4])
    assert computed[0] == 4
    with config_context(response_cache_bytes=0):
        assert len(RESPONSE_CACHE) == 0  # turning it off empties it
        est = _loo().fit(X, y)
        first = est.param_change(X[:4])
        second = est.param_change(X[:4])
        assert len(RESPONSE_CACHE) == 0 and RESPONSE_CACHE.nbytes == 0
    assert computed[0] == 4 + 8  # recomputed at each call
    assert_array_equal(first, cached)
    assert_array_equal(second, cached)


def test_the_bound_is_the_configured_one(data):
    X, y = data
    est = _loo().fit(X, y)
    est.param_change(X[:5])  # 5 responses of 4 float64: 32 bytes each
    assert RESPONSE_CACHE.max_bytes == get_config()["response_cache_bytes"]
    with config_context(response_cache_bytes=100):
        assert RESPONSE_CACHE.max_bytes == 100 and ResponseCache().max_bytes == 100
        assert len(RESPONSE_CACHE) == 3 and RESPONSE_CACHE.nbytes == 96  # LRU evicted
        est.param_change(X[5:10])
        assert RESPONSE_CACHE.nbytes <= 100
    assert RESPONSE_CACHE.max_bytes == get_config()["response_cache_bytes"] > 100


def test_resize_evicts_the_least_recently_used():
    cache, owner = ResponseCache(max_bytes=240), CacheOwner()
    for name in "abc":
        cache.put(name, (torch.zeros(10, dtype=torch.float64), {}), owner=owner)
    assert len(cache) == 3 and cache.nbytes == 240
    assert cache.get("a") is not None  # now the most recently used
    cache.resize(160)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 160 and cache.max_bytes == 160
    cache.put("d", (torch.zeros(20, dtype=torch.float64), {}), owner=owner)  # alone at bound
    assert len(cache) == 1 and cache.nbytes == 160
    cache.put("e", (torch.zeros(21, dtype=torch.float64), {}), owner=owner)  # over: not kept
    assert cache.get("e") is None and cache.get("d") is not None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes must be None .* or an integer >= 0"):
        cache.resize(-1)


def test_a_row_view_does_not_pin_its_batch():
    cache, owner = ResponseCache(max_bytes=2**20), CacheOwner()
    batch = torch.arange(10_000, dtype=torch.float64).reshape(1000, 10)
    cache.put("row", (batch[3], {"seconds": 0.0}), owner=owner)
    stored = cache.get("row")[0]
    assert stored.untyped_storage().nbytes() == 80 and cache.nbytes == 80
    assert_array_equal(stored.numpy(), np.arange(30, 40))
    batch.zero_()  # a copy, not a view of the batch
    assert stored[0] == 30
    alone = torch.ones(10, dtype=torch.float64)
    cache.put("alone", (alone, {}), owner=owner)
    assert cache.get("alone")[0].data_ptr() == alone.data_ptr()  # compact: not copied


def test_entries_of_an_owner_collected_during_a_cache_call_are_dropped_after_it():
    cache, owner = ResponseCache(max_bytes=2**20), CacheOwner()
    cache.put("a", (torch.zeros(3), {}), owner=owner)
    with cache._lock:  # as if the collector ran inside a cache call
        del owner
        gc.collect()
    assert len(cache) == 0 and cache.nbytes == 0


def test_clones_share_the_owner_which_is_neither_a_parameter_nor_fitted_state(data):
    X, y = data
    est = _loo()
    twin = clone(est)
    assert twin._cache_owner is est._cache_owner is clone(twin)._cache_owner
    assert "_cache_owner" not in twin.get_params()
    assert repr(twin.get_params()) == repr(est.get_params())
    with pytest.raises(NotFittedError):
        check_is_fitted(twin)
    fitted = twin.fit(X, y)
    assert fitted.responder_.cache_owner() is est._cache_owner
    copy = pickle.loads(pickle.dumps(fitted))  # a copy is a family of its own
    assert copy._cache_owner is not est._cache_owner
    assert copy.responder_.cache_owner() is copy._cache_owner
    assert_array_equal(copy.param_change(X[:2]), fitted.param_change(X[:2]))


def test_disk_store_is_used_with_the_cache_off(data, tmp_path):
    X, y = data
    with config_context(response_cache_bytes=0):
        first = _loo(memory=str(tmp_path)).fit(X, y)
        reference = first.param_change(X[:3])
        again = _loo(memory=str(tmp_path)).fit(X, y)
        assert_array_equal(again.param_change(X[:3]), reference)
    assert "cold_start_loo" not in again.responder_.timings  # loaded, not recomputed
    assert len(RESPONSE_CACHE) == 0
