"""The response layer: what a removal does to the trained parameters, rung by rung.

A removal (:class:`~sklinfluence.model.removal.Removal`) is a set of training
rows; a rung (:mod:`~sklinfluence.response.rungs`) is one way of computing its
response ``Δθ`` — retraining, the PBRF (:mod:`~sklinfluence.response.pbrf`),
influence. The :class:`~sklinfluence.response.responder.Responder` owns the
solvers, the in-memory cache (:mod:`~sklinfluence.response.cache`), the disk
store, batching and joblib/Dask workers, the same way for every rung;
:mod:`~sklinfluence.response.measure` turns responses into numbers.

Imports from the layers below only: solvers, curvature, model, utils.
"""
