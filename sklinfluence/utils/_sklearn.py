"""The private scikit-learn API the estimators use, in one place.

scikit-learn's parameter constraints (``Interval``, ``StrOptions``) and the
``_fit_context`` decorator that checks them before ``fit`` are not public;
they have kept their names and behaviour through every release this package
supports. That range is declared in ``pyproject.toml`` and tested at both
ends (the suite runs at the newest versions and at the declared floors). A
release that moves them changes this module only.
"""

from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

__all__ = ["Interval", "StrOptions", "_fit_context"]
