"""Sphinx configuration: numpydoc API reference and a sphinx-gallery of examples/."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sklinfluence import __version__  # noqa: E402

project = "sklinfluence"
author = "the sklinfluence developers"
release = version = __version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json"]
html_theme = "alabaster"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/",  # run every example: the gallery shows real output
    "download_all_examples": False,
    "plot_gallery": "True",
    "remove_config_comments": True,
}
suppress_warnings = ["config.cache"]
