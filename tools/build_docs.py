#!/usr/bin/env python
"""Build the docs site and README.md from the notebooks in nbs/, offline, without Quarto.

    python tools/build_docs.py                 # docs/_build/html from nbs/*.ipynb, and README.md from nbs/index.ipynb
    python tools/build_docs.py --readme        # only README.md
    python tools/build_docs.py --check-readme  # exit 1 when README.md is not what nbs/index.ipynb gives

nbdev's own `nbdev_docs`/`nbdev_readme` hand their work to Quarto, which cannot be installed here.
This tool keeps nbdev's part and replaces Quarto's:

1. nbdev's processors (`nbdev.processors.FilterDefaults`) run over each notebook, as for
   `nbdev_docs`: `#| hide` and `#| export` cells go, the title cell becomes front matter, a
   `show_doc` cell follows each exported function or class, and those cells are executed
   (nbdev's `exec_show_docs` runs only the notebook's export and import cells) so that each
   holds its API entry as markdown: signature, docstring and per-parameter docs. A
   `show_doc(name)` of a name the notebook exports is rendered again, by the same show_doc,
   from the exported module, whose classes keep their parameter docs (see `_module_doc`).
   Any warning nbdev gives here (e.g. a cell mixing imports with other code) fails the build.
2. What Quarto would do with the result is done here for Sphinx + myst-nb: Quarto's cell
   options become myst-nb tags (`echo: false` -> remove-input, `output: false` ->
   remove-output, `include: false` -> cell dropped, `code-fold: true` -> hide-input), and an
   `output: asis` cell becomes a markdown cell holding its output, so an API entry is a real
   section of the page (in the page's contents and in the search index).
3. Backticked exported names become links to their API entries (nbdev's `NbdevLookup`):
   relative `page.ipynb#name` links on the site, which Sphinx checks, and the absolute URLs of
   the published site in README.md. A link whose entry does not exist (a private name) is dropped.
4. Sphinx renders docs/_src into docs/_build/html with -W: any warning fails the build.
   Pages keep the notebooks' numbered order and nbdev's page names (01_data.ipynb ->
   data.html, as in `_modidx.py`); notebooks are never executed, their stored outputs are shown.
"""
import argparse, ast, difflib, importlib, inspect, os, re, shutil, subprocess, sys, time, warnings
from concurrent.futures import ProcessPoolExecutor
from configparser import ConfigParser
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT/'docs'
SRC, OUT = DOCS/'_src', DOCS/'_build'/'html'
README = ROOT/'README.md'

class DocsError(Exception):
    "A notebook cannot be turned into a page or README.md as it stands; the message says which and why."

def settings()->dict:
    "The [DEFAULT] section of settings.ini."
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])

def page_name(nb_path:Path)->str:
    "nbdev's page name for a notebook: the file name without its number prefix (`02a_why_sqrt5` -> `why_sqrt5`)."
    from nbdev.doclinks import _nbpath2html  # the rule nbdev uses for the doc links in _modidx.py
    return _nbpath2html(Path(nb_path.name)).stem

def notebooks(nbs:Path=None)->list:
    "The notebooks that make pages, in their numbered order, `index.ipynb` first."
    nbs = Path(nbs or ROOT/settings()['nbs_path'])
    found = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    index = [p for p in found if p.name == 'index.ipynb']
    if not index: raise DocsError(f"{nbs} has no index.ipynb: it is the home page and README.md")
    res = index + [p for p in found if p.name != 'index.ipynb']
    names = [page_name(p) for p in res]
    dups = {n for n in names if names.count(n) > 1}
    if dups: raise DocsError(f"notebooks {[p.name for p in res if page_name(p) in dups]} would share the page name(s) {sorted(dups)}")
    return res

# ---------------------------------------------------------------- 1. nbdev's processors

def process_notebook(path:str)->dict:
    "Run nbdev's docs processors over one notebook (in its folder); return title, description and page cells."
    os.environ['IN_TEST'] = '1'                  # as nbdev's own docs processing does
    os.environ.setdefault('MPLBACKEND', 'Agg')
    from execnb.nbio import read_nb
    from nbdev.processors import FilterDefaults, add_fold, add_links, insert_warning

    class DocsProcs(FilterDefaults):
        "nbdev's processors, less three that only make sense for Quarto's output or are done in step 3."
        def base_procs(self): return [p for p in super().base_procs() if p not in (add_links, insert_warning, add_fold)]

    path, cwd = Path(path).resolve(), os.getcwd()
    os.chdir(path.parent)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            nb = read_nb(path)
            module = _exported_module(nb)
            try: DocsProcs()(nb)
            except Exception as e:
                cause = f"\n{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ''
                hint = ("\n(nbdev runs only the export, import and show_doc cells to render the API entries, so a cell "
                        "that mixes imports with other code runs out of context: give imports a cell of their own)") if 'import' in str(e) else ''
                raise DocsError(f"{path.name}: nbdev's processors failed: {e}{cause}{hint}") from None
    finally: os.chdir(cwd)
    problems = [f"{path.name}: {w.category.__name__}: {w.message}" for w in caught
                if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    if any('imports and other code' in p for p in problems):
        problems.append("(nbdev runs every cell that imports something to render the API entries: "
                        "give imports a cell of their own, see nbdev's FAQ)")
    if problems: raise DocsError(f"{path.name}: warnings from nbdev's processors (strict build):\n" + '\n'.join(problems))
    fm = dict(nb.get('frontmatter_') or {})
    if not fm.get('title'): raise DocsError(f"{path.name} has no title cell (`# Title` then `> summary`)")
    cells = [c for c in nb.cells if not (c.cell_type == 'raw' and c.source.lstrip().startswith('---'))]
    return dict(name=page_name(path), nb=path.name, title=fm['title'], description=fm.get('description', ''),
                metadata=dict(nb.metadata), cells=_page_cells(cells, path.name, module))

def _exported_module(nb):
    "The module this notebook exports to (its `#| default_exp`), imported; None for a notebook that exports nothing."
    for c in nb.cells:
        if c.cell_type == 'code' and (m := re.search(r'^\s*#\|\s*default_exp\s+(\S+)', c.source, re.M)):
            return importlib.import_module(f"{settings()['lib_name']}.{m.group(1)}")

def _module_doc(src:str, module)->str:
    """nbdev's show_doc markdown for a `show_doc(name)` cell, rendered from `name` in the exported `module`; None if not there.

    nbdev renders the entry from the object the notebook's cells defined in an IPython shell. For a
    class that loses its parameter docs (docments reads them from the source, which `inspect` cannot
    find for a class defined in a shell: a dataclass's field comments vanish). The exported module
    holds the same definitions (nbdev_export wrote it from these cells) with a real source file,
    so its object renders completely, with the right line in the [source] link."""
    try: body = ast.parse(src).body
    except SyntaxError: return None
    if module is None or len(body) != 1 or not isinstance(body[0], ast.Expr) or not isinstance(call := body[0].value, ast.Call): return None
    if call.keywords or len(call.args) != 1 or not re.fullmatch(r'[A-Za-z_]\w*(\.\w+)*', name := ast.unparse(call.args[0])): return None
    obj = module
    for part in name.split('.'):
        if (obj := getattr(obj, part, None)) is None: return None
    if getattr(obj, '__module__', None) != module.__name__: return None   # imported into the module, documented where it is defined
    from nbdev.showdoc import show_doc
    md = _fix_inherited_object_init(obj, show_doc(obj)._repr_markdown_())
    try:   # nbdev looks the line up by the short name only, so for a module's object its link says #LNone
        cfg, rel = settings(), Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT).as_posix()
        url = f"{cfg['git_url'].rstrip('/')}/blob/{cfg['branch']}/{rel}#L{inspect.getsourcelines(obj)[1]}"
        md = re.sub(r'\[source\]\([^)\s]*\)', lambda m: f'[source]({url})', md, count=1)
    except (TypeError, OSError, ValueError): pass
    return md

_re_object_init_sig = re.compile(r'(```python\ndef \w+)\(\n\s*\*args, \*\*kwargs\n\):')

def _fix_inherited_object_init(obj, md:str)->str:
    """`md` with a class's real signature where it has no `__init__` of its own or from a base but `object`'s.

    fastcore documents a class by its `__init__`; for a class that has none (a callback such as
    `Recorder`) that is `object.__init__`, shown as `(*args, **kwargs)`, though the class takes no
    argument at all (`inspect.signature(Recorder)` is `()`)."""
    if not inspect.isclass(obj) or obj.__init__ is not object.__init__ or obj.__new__ is not object.__new__: return md
    if str(inspect.signature(obj)) != '()': return md
    return _re_object_init_sig.sub(r'\1():', md, count=1)

# ---------------------------------------------------------------- 2. what Quarto would do

_re_dir = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_re_heading = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_re_srclink = re.compile(r'\{target="_blank"[^}]*\}')
_re_ident = re.compile(r'[A-Za-z_][\w.]*')

def _split_directives(src:str):
    "Quarto/nbdev `#| key: value` lines at the top of a code cell, and the code after them."
    lines, dirs = src.splitlines(), {}
    while lines and (m := _re_dir.match(lines[0])):
        dirs[m.group(1)] = m.group(2).strip('"\'').lower(); lines.pop(0)
    return dirs, '\n'.join(lines).strip('\n')

def _headings(md:str):
    "(level, text) of each ATX heading in markdown, outside fenced code."
    fence = False
    for line in md.splitlines():
        if line.lstrip().startswith(('```', '~~~')): fence = not fence
        elif not fence and (m := _re_heading.match(line)): yield len(m.group(1)), m.group(2)

def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')

def _asis_markdown(cell, level:int, nb_name:str, api:bool, module_md:str=None)->str:
    "The markdown an `output: asis` cell emits; for a show_doc entry (`api`), its heading at `level`, marked, with the source link under it."
    mds = [module_md] if module_md else [_text(o['data']['text/markdown']) for o in cell.get('outputs', []) if 'text/markdown' in o.get('data', {})]
    if not mds: raise DocsError(f"{nb_name}: an `output: asis` cell has no markdown output (was it executed?):\n{cell.source}")
    if not api: return '\n\n'.join(md.strip() for md in mds)
    res = []
    for md in mds:
        lines = md.strip().splitlines()
        if lines and lines[0].strip() == '---': lines.pop(0)   # Quarto's rule above each entry; furo spaces sections itself
        src = [l.replace('#LNone)', ')') for l in lines if _re_srclink.search(l)]   # nbdev found no line number
        lines = [l for l in lines if not _re_srclink.search(l)]
        for i, l in enumerate(lines):
            if m := _re_heading.match(l):
                lines[i:i+1] = ['{.api-entry}', '#'*level + ' ' + m.group(2), '', *(_re_srclink.sub('{.sourcelink}', s) for s in src)]
                break
        else: lines = src + lines
        res.append('\n'.join(lines).strip())
    return '\n\n'.join(res)

def _page_cells(cells, nb_name:str, module=None)->list:
    "nbformat cells for myst-nb: Quarto options -> tags, `asis` -> markdown, API headings one below the current section."
    res, level = [], 1
    for i, c in enumerate(cells):
        cid = c.get('id') or f'cell-{i}'
        if c.cell_type == 'markdown':
            for lvl, _ in _headings(c.source): level = lvl
            res.append(dict(cell_type='markdown', id=cid, metadata={}, source=c.source))
            continue
        if c.cell_type != 'code': continue
        for o in c.get('outputs', []):
            if o.get('output_type') == 'error':
                raise DocsError(f"{nb_name}: a cell has a stored error ({o.get('ename')}: {o.get('evalue')}); rerun the notebook:\n{c.source}")
        dirs, src = _split_directives(c.source)
        if dirs.get('include') == 'false': continue
        if dirs.get('output') == 'asis':
            api = src.lstrip().startswith('show_doc(')
            md = _asis_markdown(c, min(3, level+1), nb_name, api, _module_doc(src, module) if api else None)   # entries in a row are siblings
            res.append(dict(cell_type='markdown', id=cid, metadata={}, source=md))
            continue
        tags = []
        if dirs.get('echo') == 'false': tags.append('remove-input')
        if dirs.get('output') == 'false': tags.append('remove-output')
        if dirs.get('code-fold') == 'true': tags.append('hide-input')
        if not src and not c.get('outputs'): continue
        if not src and 'remove-input' not in tags: tags.append('remove-input')
        res.append(dict(cell_type='code', id=cid, metadata={'tags': tags} if tags else {},
                        execution_count=c.get('execution_count'), outputs=list(c.get('outputs', [])), source=src))
    return res

# ---------------------------------------------------------------- 3. links

def api_anchors(page:dict)->set:
    "nbdev anchors (lower-cased names) of the headings on a page that are Python names: its API entries."
    return {t.lower() for c in page['cells'] if c['cell_type'] == 'markdown'
            for _, t in _headings(c['source']) if _re_ident.fullmatch(t)}

def link_markdown(md:str, pages:dict, anchors:dict, site:bool, cfg:dict, lookup)->str:
    "Link backticked exported names and `NN_name.ipynb` links: to `page.ipynb#anchor` on the `site`, else to the published URLs."
    base = cfg['doc_host'].rstrip('/') + cfg['doc_baseurl'].rstrip('/') + '/'
    md = lookup.linkify(md)
    def sym(m):
        name, page, anchor = m.group(1), m.group(2), m.group(3)
        known = anchors.get(page)   # None: that page was not processed (README.md), so trust nbdev: public names have entries
        private = re.sub(r'\(\)$', '', name).split('.')[-1].startswith('_')
        if page not in pages or (anchor not in known if known is not None else private):
            return f"`{name}`"      # no entry to land on (e.g. a private name)
        return f"[`{name}`]({page}.ipynb#{anchor})" if site else m.group(0)
    md = re.sub(r'\[`([^`]+)`\]\(' + re.escape(base) + r'([\w-]+)\.html#([\w.]+)\)', sym, md)
    by_nb = {nb: name for name, nb in pages.items()}
    def nblink(m):
        target, frag = m.group(1), m.group(2) or ''
        name = by_nb.get(target) or (target.rsplit('.', 1)[0] if target.rsplit('.', 1)[0] in pages else None)
        if name is None: return m.group(0)
        return f"]({name}.ipynb{frag})" if site else f"]({base}{name}.html{frag})"
    return re.sub(r'\]\(([\w.-]+\.(?:ipynb|html))(#[^)\s]*)?\)', nblink, md)

def link_pages(pages_in:list, site:bool, nbs:Path=None)->list:
    "Each processed page with its markdown linked (see `link_markdown`); `nbs` lists the pages that exist."
    from nbdev.doclinks import NbdevLookup
    cfg = settings()
    lookup = NbdevLookup(incl_libs=cfg['lib_name'])
    pages = {page_name(p): p.name for p in notebooks(nbs)} | {p['name']: p['nb'] for p in pages_in}
    anchors = {p['name']: api_anchors(p) for p in pages_in}
    out = []
    for p in pages_in:
        cells = [dict(c, source=link_markdown(c['source'], pages, anchors, site, cfg, lookup)) if c['cell_type'] == 'markdown' else c
                 for c in p['cells']]
        out.append(dict(p, cells=cells))
    return out

# ---------------------------------------------------------------- outputs: site sources and README.md

def _title_cell(p:dict)->dict:
    md = f"# {p['title']}" + (f"\n\n> {p['description']}" if p['description'] else '')
    return dict(cell_type='markdown', id='title', metadata={}, source=md)

IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'}

def write_sources(pages:list, src:Path, nbs:Path):
    "Write the linked pages as notebooks for Sphinx into `src`, with a toctree in numbered order on the home page."
    import nbformat
    if src.exists(): shutil.rmtree(src)
    src.mkdir(parents=True)
    for f in nbs.rglob('*'):   # images the notebooks' markdown refers to by relative path (nbs/images/...)
        rel = f.relative_to(nbs)
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not any(part.startswith(('.', '_')) for part in rel.parts):
            (src/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, src/rel)
    order = [p['name'] for p in pages if p['name'] != 'index']
    for p in pages:
        cells = [_title_cell(p)] + p['cells']
        if p['name'] == 'index':
            toc = '\n'.join(['```{toctree}', ':hidden:', ':caption: Notebooks', '', *order, '```'])
            cells.append(dict(cell_type='markdown', id='toctree', metadata={}, source=toc))
        nb = nbformat.from_dict(dict(nbformat=4, nbformat_minor=5, metadata=p['metadata'], cells=cells))
        nbformat.validate(nb)
        nbformat.write(nb, src/f"{p['name']}.ipynb")

def readme_markdown(p:dict)->str:
    "README.md for the processed, linked index page, in GitHub-flavoured markdown."
    parts = [f"# {p['title']}",
             "<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! Edit nbs/index.ipynb, then run `python tools/build_docs.py`. -->"]
    if p['description']: parts.append(f"> {p['description']}")
    for c in p['cells']:
        if c['cell_type'] == 'markdown':
            md = c['source'].replace('{.sourcelink}', '')
            parts.append('\n'.join(l for l in md.splitlines() if l != '{.api-entry}').strip()); continue
        tags = c['metadata'].get('tags', [])
        if 'remove-input' not in tags: parts.append(f"```python\n{c['source']}\n```")
        if 'remove-output' in tags: continue
        stream = ''.join(_text(o['text']) for o in c['outputs'] if o['output_type'] == 'stream')
        if stream.strip(): parts.append(f"```\n{stream.rstrip()}\n```")
        for o in c['outputs']:
            data = o.get('data', {})
            if not data: continue
            if any(k.startswith('image/') for k in data):
                raise DocsError("README.md shows text only, but a cell of index.ipynb has an image output; "
                                f"hide that cell (`#| hide`) or move the plot to a numbered notebook:\n{c['source']}")
            if 'text/markdown' in data: parts.append(_text(data['text/markdown']).strip())
            elif 'text/plain' in data: parts.append(f"```\n{_text(data['text/plain']).rstrip()}\n```")
    return '\n\n'.join(x for x in parts if x) + '\n'

def expected_readme(index:dict=None, nbs:Path=None)->str:
    "README.md as nbs/index.ipynb gives it now."
    if index is None: index = process_notebook(str(notebooks(nbs)[0]))
    return readme_markdown(link_pages([index], site=False, nbs=nbs)[0])

def check_readme()->bool:
    "True when README.md is up to date; else print a diff and say how to fix it."
    want = expected_readme()
    have = README.read_text(encoding='utf-8') if README.exists() else ''
    if have == want: return True
    sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True), 'README.md', 'from nbs/index.ipynb'))
    print("\nREADME.md is out of date with nbs/index.ipynb: run `python tools/build_docs.py` (or `--readme`) and commit it.")
    return False

def process_all(nbs:list)->list:
    "Processed pages for `nbs`, two at a time, each in a fresh process; every notebook's problems are reported together."
    if len(nbs) == 1: return [process_notebook(str(nbs[0]))]
    with ProcessPoolExecutor(max_workers=min(len(nbs), os.cpu_count() or 1, 4), mp_context=get_context('spawn')) as ex:
        futs = [ex.submit(process_notebook, str(p)) for p in nbs]
    errors = [f.exception() for f in futs if f.exception() is not None]
    if any(not isinstance(e, DocsError) for e in errors): raise next(e for e in errors if not isinstance(e, DocsError))
    if errors: raise DocsError('\n'.join(str(e) for e in errors))
    return [f.result() for f in futs]

def sphinx(src:Path, out:Path):
    "Render `src` into `out` with Sphinx; any warning fails (raises DocsError)."
    if out.exists(): shutil.rmtree(out)
    doctrees = out.parent/(out.name + '.doctrees')
    cmd = [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-E', '-q', '-b', 'html',
           '-c', str(DOCS), '-d', str(doctrees), str(src), str(out)]
    r = subprocess.run(cmd, cwd=ROOT)
    shutil.rmtree(doctrees, ignore_errors=True)
    if r.returncode: raise DocsError(f"sphinx-build failed (exit {r.returncode}); every warning above is an error")

def build(src:Path=SRC, out:Path=OUT, readme:bool=True, nbs:Path=None)->list:
    "Process every notebook, write README.md (if `readme`), the Sphinx sources in `src` and the site in `out`."
    t0 = time.perf_counter()
    nb_paths = notebooks(nbs)
    pages = process_all(nb_paths)
    t1 = time.perf_counter()
    if readme: README.write_text(expected_readme(pages[0], nbs), encoding='utf-8')
    write_sources(link_pages(pages, site=True, nbs=nbs), Path(src), nb_paths[0].parent)
    sphinx(Path(src), Path(out))
    t2 = time.perf_counter()
    print(f"docs: {len(pages)} pages in {out} (nbdev processors {t1-t0:.1f} s, Sphinx {t2-t1:.1f} s)"
          + ("; README.md written" if readme else ''))
    return pages

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument('--readme', action='store_true', help='only write README.md from nbs/index.ipynb')
    g.add_argument('--check-readme', action='store_true', help='exit 1 if README.md is out of date')
    g.add_argument('--no-readme', action='store_true', help='build the site but leave README.md alone')
    ap.add_argument('--nbs', type=Path, default=None, help='folder of notebooks, inside the repository so nbdev finds settings.ini (default: nbs_path)')
    ap.add_argument('--src', type=Path, default=SRC, help='folder for the processed notebooks Sphinx reads (default docs/_src)')
    ap.add_argument('--out', type=Path, default=OUT, help='folder for the HTML site (default docs/_build/html)')
    a = ap.parse_args(argv)
    try:
        if a.check_readme: return 0 if check_readme() else 1
        if a.readme:
            README.write_text(expected_readme(), encoding='utf-8'); print("README.md written"); return 0
        build(a.src.resolve(), a.out.resolve(), readme=not a.no_readme, nbs=a.nbs)
    except DocsError as e:
        print(f"docs build failed: {e}", file=sys.stderr); return 1
    return 0

if __name__ == '__main__':
    # run as the module `build_docs`, so that the worker processes (spawned) find process_notebook and DocsError there
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_docs
    sys.exit(build_docs.main())
