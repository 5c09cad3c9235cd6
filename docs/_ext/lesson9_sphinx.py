"""Small Sphinx extension for the lesson9 site: nbdev-style anchors and MathJax served locally.

- `heading_slug` is MyST's heading slug function (`myst_heading_slug_func`): an API entry's
  heading (`### get_data`, `### Learner.fit`) gets nbdev's anchor, the name in lower case.
  MyST checks links like `data.ipynb#get_data` against these slugs at build time and also
  writes each slug into the page as an HTML id, so the links nbdev puts in `_modidx.py` and
  README.md (`data.html#get_data`) land on the entry too.
- `ApiAnchorsFirst` hands that anchor to the API entry when a prose heading on the same page
  claimed it first ("## Gain" before the entry for `gain`), so `#gain` means the entry.
- `copy_mathjax` copies MathJax 3 from the `sphinx-mathjax-offline` wheel into `_static/`, only
  the files the `tex-chtml` component loads, so pages with formulas need no CDN.
"""
import re, shutil
from pathlib import Path

from docutils import nodes
from docutils.transforms import Transform

_ident = re.compile(r'[A-Za-z_][\w.]*')

def heading_slug(text:str)->str:
    "nbdev's anchor (lower-cased name) for an API heading, GitHub's slug for any other heading."
    text = text.strip()
    if _ident.fullmatch(text): return text.lower()
    return re.sub(r'[^\w\- ]', '', text.lower()).replace(' ', '-')

class ApiAnchorsFirst(Transform):
    "Swap heading slugs so that each API entry (a section of class `api-entry`) owns its nbdev anchor."
    default_priority = 650   # after MyST has given each heading its slug, before AddSlugIds (700) makes them HTML ids

    def apply(self, **kwargs):
        slugs = getattr(self.document, 'myst_slugs', None)   # slug -> (line, id, title); MyST resolves links with it
        if not slugs: return
        owner = {sec['slug']: sec for sec in self.document.findall(nodes.section) if sec.get('slug')}
        for sec in self.document.findall(nodes.section):
            if 'api-entry' not in sec['classes'] or not sec.get('slug'): continue
            want, mine = heading_slug(sec[0].astext()), sec['slug']
            other = owner.get(want)
            if other is None or other is sec or 'api-entry' in other['classes']: continue
            sec['slug'], other['slug'] = want, mine
            slugs[want], slugs[mine] = slugs[mine], slugs[want]
            owner[want], owner[mine] = sec, other
            if self.document.ids.get(want) is other:      # docutils gave the prose section the same HTML id: move it
                other['ids'] = [mine if i == want else i for i in other['ids']]
                self.document.ids[mine] = other
                sec['ids'].insert(0, want)
                self.document.ids[want] = sec

def _mathjax_dir()->Path:
    import importlib.util
    spec = importlib.util.find_spec('sphinx-mathjax-offline')
    if spec is None: raise RuntimeError("sphinx-mathjax-offline is not installed: pip install -e '.[dev]'")
    return Path(spec.origin).parent/'static'/'mathjax'

# tex-chtml.js bundles TeX input and CommonHTML output; it loads fonts, TeX extensions (autoload)
# and, from its menu, the accessibility tools (a11y, which need sre) from these folders.
MATHJAX_FILES = ('tex-chtml.js', 'output/chtml', 'input/tex/extensions', 'ui', 'a11y', 'sre')

def copy_mathjax(app, exc):
    "After a successful build, copy the MathJax files that `tex-chtml.js` loads into `_static/mathjax`."
    if exc is not None or app.builder.format != 'html': return
    src, dest = _mathjax_dir(), Path(app.outdir)/'_static'/'mathjax'
    for rel in MATHJAX_FILES:
        s, d = src/rel, dest/rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir(): shutil.copytree(s, d, dirs_exist_ok=True)
        else: shutil.copy2(s, d)

def setup(app):
    app.config.mathjax_path = 'mathjax/tex-chtml.js'
    app.add_transform(ApiAnchorsFirst)
    app.connect('build-finished', copy_mathjax)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
