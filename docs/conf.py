"""Sphinx configuration for the lesson9 site. Build it with `python tools/build_docs.py`.

The sources Sphinx reads are not the notebooks in nbs/ but docs/_src/, written by
tools/build_docs.py after nbdev's processors have run over each notebook. Notebooks are
never executed here: their stored outputs are what the pages show.
"""
import sys
from configparser import ConfigParser
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here/'_ext'))
cfg = ConfigParser(delimiters=['='])
cfg.read(here.parent/'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

project = cfg['lib_name']
author = cfg['author']
copyright = cfg['copyright']
release = version = cfg['version']

extensions = ['myst_nb', 'sphinx.ext.mathjax', 'lesson9_sphinx']
root_doc = 'index'
exclude_patterns = ['**.ipynb_checkpoints']
templates_path = []
suppress_warnings = []          # strict: tools/build_docs.py runs sphinx-build -W
show_warning_types = True
smartquotes = False             # docstrings and prose quote code: keep ' and " as typed

# myst-nb: render stored outputs, never run a kernel
nb_execution_mode = 'off'
nb_merge_streams = True
nb_output_stderr = 'show'       # a warning a notebook printed is part of what it shows
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_inline', 'attrs_block', 'colon_fence', 'deflist', 'strikethrough']
myst_heading_anchors = 4
myst_heading_slug_func = 'lesson9_sphinx.heading_slug'
myst_dmath_double_inline = True

html_theme = 'furo'
html_title = f"{project} {version}"
html_static_path = ['_static']
html_css_files = ['lesson9.css']
html_favicon = '_static/favicon.svg'    # also spares browsers a 404 (a console error) on /favicon.ico
html_baseurl = cfg['doc_host'].rstrip('/') + cfg['doc_baseurl'].rstrip('/') + '/'
html_copy_source = False         # no _sources/*.ipynb.txt copies of the processed notebooks
html_use_index = False           # no genindex.html: the API entries are not Sphinx objects, it would be empty
html_show_sourcelink = False
html_theme_options = {'top_of_page_buttons': []}   # no 'edit/view source' buttons pointing at docs/_src
