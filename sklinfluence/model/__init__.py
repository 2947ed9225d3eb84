"""The model layer: a trained net as a function of its flat parameters.

:class:`~sklinfluence.model.functional.FunctionalModel` (``f(θ, X)``, the
output losses of :mod:`~sklinfluence.model.losses`, weight decay) is the only
bridge from a skorch net or a scikit-learn linear model to the layers above;
the adapters (:mod:`~sklinfluence.model.adapters`) build it and retrain the net
(:mod:`~sklinfluence.model.retrain`, :mod:`~sklinfluence.model.ensemble`);
:mod:`~sklinfluence.model.removal` describes the rows a response removes.

Imports from utils only.
"""
