"""mkdocs hook: ship MathJax with the site, so that the maths renders offline.

MathJax 3 comes from the ``django-static-mathjax`` package (the ``docs`` extra), which bundles its
browser build: its ``es5`` folder is copied to ``site/javascripts/mathjax``, where ``mkdocs.yml``
loads ``tex-mml-chtml.js``; MathJax then finds its fonts and extensions beside that file.
"""

import shutil
from pathlib import Path

import mathjax


def on_post_build(config, **kwargs):
    shutil.copytree(Path(mathjax.__file__).parent / "static" / "mathjax" / "es5",
                    Path(config["site_dir"]) / "javascripts" / "mathjax", dirs_exist_ok=True)
