"""sklinfluence: influence functions, the PBRF and leave-one-out for skorch nets.

Implements Bae et al. (NeurIPS 2022), "If Influence Functions are the Answer,
Then What is the Question?", as scikit-learn estimators.
"""

from .influence import InfluenceEstimator

__all__ = ["InfluenceEstimator"]
__version__ = "0.1.0"
