"""Sphinx configuration of the momaestimator documentation.

Build (offline, warnings as errors)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

Intersphinx links to scikit-learn, PyTorch, NumPy and Python need their inventories from the
network; they are configured only when ``MOMA_DOCS_INTERSPHINX=1`` is set, so that the default
build works offline without warnings.
"""

import importlib.util
import os
import sys
import warnings
from pathlib import Path

# Tiny torch workloads on a shared machine: one intra-op thread is ~100x faster than two threads
# spinning against another busy process, and it keeps the gallery's run times in seconds.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import momaestimator  # noqa: E402

project = "momaestimator"
author = "momaestimator contributors"
copyright = "2025, momaestimator contributors"
release = momaestimator.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
# MathJax from the package's own copy, so formulas render without network (falls back to the CDN).
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    extensions.append("sphinx-mathjax-offline")

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "auto_examples/*.zip",
    "auto_examples/*.md5",
    "auto_examples/*.codeobj.json",
]

# -- API reference -------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# -- Gallery ---------------------------------------------------------------------------------------
# Files named plot_*.py run during the build (CPU, seconds each) and their figures are embedded;
# the other example files (real ViT-B/32 checkpoints, the full benchmark) are rendered, not run.
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "backreferences_dir": "gen_modules/backreferences",
    "doc_module": ("momaestimator",),
    "plot_gallery": "True",
}

# -- HTML ------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"momaestimator {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"benchmark_results": []}
html_show_sourcelink = False

myst_heading_anchors = 2

# -- Intersphinx: only on request (needs the network) --------------------------------------------
if os.environ.get("MOMA_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "joblib": ("https://joblib.readthedocs.io/en/stable", None),
    }

warnings.filterwarnings("ignore", message="Matplotlib is currently using agg", category=UserWarning)
