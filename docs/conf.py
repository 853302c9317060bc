"""Sphinx configuration of the layerwise_optax API reference (``make docs``).

The build needs no network: there is no intersphinx (its inventories are fetched
at build time), and the notebooks are rendered from their committed ``.ipynb``
files without being executed. ``make docs`` builds with ``-W --keep-going``, so
every warning fails it, and then checks that every public name is documented
(``docs/coverage.py``).
"""

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# JAX on CPU, quietly: autodoc imports the package (and the zoo, which imports flax).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import layerwise_optax  # noqa: E402

project = "layerwise_optax"
author = "layerwise_optax developers"
copyright = "the layerwise_optax developers; Apache-2.0"
release = version = layerwise_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    # MathJax served from the site itself (copied into _static), not from a CDN: the
    # pages' maths renders offline too.
    "sphinx-mathjax-offline",
]

# The notebooks are jupytext pairs in ../notebooks; Sphinx reads sources only under
# docs/, so the committed .ipynb files (no outputs) are copied to docs/notebooks/
# (git-ignored) at each build, with the figures their runs committed.
_NB_SRC = ROOT / "notebooks"
_NB_DST = DOCS / "notebooks"
if _NB_DST.exists():
    shutil.rmtree(_NB_DST)
_NB_DST.mkdir()
for _nb in sorted(_NB_SRC.glob("*.ipynb")):
    shutil.copy2(_nb, _NB_DST / _nb.name)
if (_NB_SRC / "figures").is_dir():
    shutil.copytree(_NB_SRC / "figures", _NB_DST / "figures")

source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
exclude_patterns = ["_build", "paper/*.json", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# Notebooks are rendered as committed, never executed (execution needs the zoo's
# full runs and minutes of CPU; tests/test_notebooks.py runs them in quick mode).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
# The notebooks' titles are their first heading; their later headings need no anchors.
myst_heading_anchors = 0

autodoc_member_order = "bysource"
# Types go next to each argument's description: the signatures stay readable.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"layerwise_optax {release}"
html_static_path = []

# No intersphinx: it fetches inventories over the network at build time, which
# would make an offline build fail or warn. Links to optax/jax are plain text.
