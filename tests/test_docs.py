"""The docs site and README.md (tools/build_docs.py), and the GitHub workflows.

- the site builds from the notebooks with Sphinx -W (no warning) in under 3 minutes;
- pages follow the notebooks' numbered order, every exported function and class has an API
  entry (signature, docstring, parameter docs), hidden and exported cells stay hidden;
- README.md is what nbs/index.ipynb gives;
- .github/workflows/*.yaml are valid workflows (check-jsonschema's GitHub schema and zizmor, offline);
- headless Chromium opens every page from a server on 127.0.0.1: no console error, no broken
  internal link or image, a rendered plot on the 01_data, 02a and 05 pages, search finds
  `get_data` and `combine_scheds` on their pages; screenshots go to test-artifacts/docs/.

The browser tests skip when Chromium is missing (`apt-get update && apt-get install -y chromium
chromium-driver`), except under CI=true, where they fail.
"""
import base64, functools, html, http.client, http.server, json, os, re, shutil, subprocess, sys, tempfile, threading, time, urllib.error, urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tools'))
import build_docs  # noqa: E402

ARTIFACTS = ROOT/'test-artifacts'/'docs'
NBS = ROOT/build_docs.settings()['nbs_path']
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"

def page_of(nb_stem): return build_docs.page_name(Path(nb_stem + '.ipynb'))

# ---------------------------------------------------------------- parsing the built HTML

class _CellInputs(HTMLParser):
    "Text inside myst-nb's `div.cell_input` blocks: the code a page shows."
    def __init__(self):
        super().__init__(); self.depth, self.inside, self.text = 0, None, []
    def handle_starttag(self, tag, attrs):
        if tag != 'div': return
        self.depth += 1
        if self.inside is None and 'cell_input' in (dict(attrs).get('class') or '').split(): self.inside = self.depth
    def handle_endtag(self, tag):
        if tag != 'div': return
        if self.inside == self.depth: self.inside = None
        self.depth -= 1
    def handle_data(self, data):
        if self.inside is not None: self.text.append(data)

def parse_page(path:Path)->SimpleNamespace:
    "What a built page holds: code shown in cells, the article's text, all ids, the ids of API-entry sections."
    src = path.read_text(encoding='utf-8')
    p = _CellInputs(); p.feed(src)
    article = src[src.index('<article'):src.index('</article>')]
    article = re.sub(r'<(script|style)\b.*?</\1>', '', article, flags=re.S)
    text = re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', '', article)))
    api_ids = {m.group(1) for tag in re.findall(r'<section\b[^>]*>', src) if 'api-entry' in tag
               for m in [re.search(r'\bid="([^"]+)"', tag)] if m}
    return SimpleNamespace(inputs=html.unescape(''.join(p.text)), text=text, ids=set(re.findall(r'\sid="([^"]+)"', src)), api_ids=api_ids)

# ---------------------------------------------------------------- the build

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site, built once by the docs command into a temporary folder (README.md is left alone)."
    d = tmp_path_factory.mktemp('docs')
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, 'tools/build_docs.py', '--no-readme', '--src', str(d/'src'), '--out', str(d/'html')],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, f"docs build failed:\n{r.stdout}\n{r.stderr}"
    nbs = build_docs.notebooks()
    return SimpleNamespace(html=d/'html', seconds=seconds, log=r.stdout + r.stderr, nbs=nbs,
                           pages=[build_docs.page_name(p) for p in nbs])

def test_build_is_strict(site):
    # the time is reported, not asserted: timings belong to benchmarks, not to the test suite
    print(f"docs build: {site.seconds:.1f} s; {site.log.strip()}")
    assert 'WARNING' not in site.log and 'ERROR' not in site.log, site.log
    for name in site.pages: assert (site.html/f'{name}.html').is_file(), f"no page for {name}"

def test_sidebar_follows_the_numbered_notebooks(site):
    src = (site.html/'index.html').read_text(encoding='utf-8')
    tree = src[src.index('class="sidebar-tree"'):]
    tree = tree[:tree.index('</div>')]
    linked = [h[:-len('.html')] for h in re.findall(r'href="([\w-]+\.html)"', tree)]
    assert linked == [n for n in site.pages if n != 'index'], linked

def _exported():
    "Public functions and classes exported to `lesson9.<module>`, with the page nbdev documents them on."
    from lesson9._modidx import d
    for mod, syms in d['syms'].items():
        for qual, (doc, _) in syms.items():
            name = qual[len(mod)+1:]
            if '.' in name or name.startswith('_'): continue   # methods and private names get no automatic entry
            page, anchor = doc.split('#')
            yield mod, name, page[:-len('.html')], anchor

def test_every_exported_name_has_an_api_entry(site):
    import importlib
    from fastcore.docments import docments
    pages, missing = {}, []
    for mod, name, page, anchor in _exported():
        if page not in site.pages: continue     # its notebook is not in nbs/ (yet)
        p = pages.setdefault(page, parse_page(site.html/f'{page}.html'))
        obj = getattr(importlib.import_module(mod), name)
        if anchor not in p.ids or re.sub(r'[^a-z0-9]+', '-', anchor).strip('-') not in p.api_ids:   # docutils' id of the section
            missing.append(f"{page}.html has no API entry for {name} (id {anchor})"); continue
        doc = re.sub(r'\s+', ' ', (obj.__doc__ or '').replace('`', '')).strip()
        if doc and doc not in p.text: missing.append(f"{page}.html: docstring of {name} not shown: {doc!r}")
        try: params = docments(obj, full=False)
        except Exception: params = {}
        for k, v in params.items():
            if v and k != 'return' and re.sub(r'\s+', ' ', v).replace('`', '') not in p.text.replace('`', ''):
                missing.append(f"{page}.html: parameter doc of {name}({k}) not shown: {v!r}")
    assert pages, "no exported names found in lesson9/_modidx.py: run nbdev_export"
    assert not missing, '\n'.join(missing)

_hidden_dirs = re.compile(r'^\s*#\|\s*(hide|export|exporti|default_exp)\b', re.M)

def test_classes_show_their_real_signature(site):
    "A class with no `__init__` of its own (a callback) is documented as taking no argument, not `(*args, **kwargs)`."
    text = parse_page(site.html/f"{page_of('05_anneal')}.html").text
    assert 'def Recorder(): Records the lr' in text, text[text.find('Recorder'):][:300]
    text = parse_page(site.html/f"{page_of('04_callbacks')}.html").text
    assert 'def TrainEvalCallback(): Puts the model' in text, text[text.find('TrainEvalCallback'):][:300]

def test_pages_speak_of_the_library_only(site):
    "No page refers readers to an issue or a task: the prose is about the library."
    for name in site.pages:
        m = re.search(r'.{0,60}\b(?:the|this|an?) (?:issue|task)\b.{0,60}', parse_page(site.html/f'{name}.html').text, re.I)
        assert m is None, f"{name}.html: {m.group(0)!r}"

def test_files_users_look_for():
    "LICENSE is the license the package metadata claims, with the copyright of settings.ini; CONTRIBUTING and CHANGELOG exist."
    cfg = build_docs.settings()
    lic = (ROOT/'LICENSE').read_text(encoding='utf-8')
    assert cfg['license'] == 'apache2' and 'Apache License\n' in lic and 'Version 2.0, January 2004' in lic, lic[:200]
    assert 'END OF TERMS AND CONDITIONS' in lic and f"Copyright {cfg['copyright']}" in lic
    contributing = (ROOT/'CONTRIBUTING.md').read_text(encoding='utf-8')
    for cmd in ('nbdev_export', 'nbdev_clean', 'nbdev_test --path', 'pytest', 'tools/build_docs.py', 'bash tools/dev.sh test'):
        assert cmd in contributing, cmd
    changelog = (ROOT/'CHANGELOG.md').read_text(encoding='utf-8')
    assert '## Unreleased' in changelog and f"## {cfg['version']}" in changelog, changelog[:300]

def test_hidden_and_exported_cells_stay_hidden(site):
    problems = []
    for nb_path, name in zip(site.nbs, site.pages):
        cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
        shown = '\n'.join(''.join(c['source']) for c in cells if not _hidden_dirs.search(''.join(c['source'])))
        inputs = parse_page(site.html/f'{name}.html').inputs
        for c in cells:
            src = ''.join(c['source'])
            if c['cell_type'] != 'code' or not _hidden_dirs.search(src): continue
            for line in src.splitlines():
                l = line.strip()
                if len(l) < 8 or l.startswith('#') or l in shown: continue
                if l in inputs: problems.append(f"{name}.html shows a line of a hidden cell: {l!r}")
        if 'show_doc(' in inputs: problems.append(f"{name}.html shows a show_doc call")
    assert not problems, '\n'.join(problems)

def test_readme_is_up_to_date():
    r = subprocess.run([sys.executable, 'tools/build_docs.py', '--check-readme'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def test_readme_example_prints_what_the_readme_shows():
    "The README's training example, run as a reader copies it, prints the rows the README shows (to the last digit shown, give or take 1)."
    readme = (ROOT/'README.md').read_text(encoding='utf-8')
    example = readme[readme.index("Train the lesson's model"):]
    blocks = re.findall(r'```(\w*)\n(.*?)\n```', example, re.S)
    code = '\n'.join(src for lang, src in blocks[:2] if lang == 'python')
    shown = next(src for lang, src in blocks if lang == '')
    assert 'torch.manual_seed(' in code and 'seed=' in code and shown.startswith('epoch 1 |'), (code, shown)
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    got, want = r.stdout.strip().splitlines(), shown.splitlines()
    number = re.compile(r'\d+\.\d+')
    assert [number.sub('#', l) for l in got] == [number.sub('#', l) for l in want], (got, want)
    for g, w in zip(got, want):
        for a, b in zip(number.findall(g), number.findall(w)):
            assert abs(float(a) - float(b)) <= 1.5e-4, f"printed {g!r}, the README shows {w!r}"

def test_readme_generation_links_and_strips_site_markup():
    "README.md links names to the published site and carries none of the site's MyST attributes."
    cfg = build_docs.settings()
    base = cfg['doc_host'].rstrip('/') + cfg['doc_baseurl'].rstrip('/') + '/'
    page = dict(title='T', description='D', cells=[
        dict(cell_type='markdown', source="{.api-entry}\n### get_data\n\n[source](https://x/y.py#L1){.sourcelink}\n\nSee `get_data` and [data](01_data.ipynb)."),
        dict(cell_type='code', metadata={}, source='1+1', outputs=[dict(output_type='execute_result', data={'text/plain': '2'})])])
    page['cells'][0]['source'] += " Private `_fetch_to` is not linked."
    md = build_docs.readme_markdown(build_docs.link_pages([page | dict(name='index', nb='index.ipynb')], site=False)[0])
    assert md.startswith('# T\n') and '> D' in md
    assert '{.' not in md, md
    assert f'[`get_data`]({base}data.html#get_data)' in md and f'[data]({base}data.html)' in md, md
    assert ' `_fetch_to` ' in md, md
    assert '```python\n1+1\n```\n\n```\n2\n```' in md, md

# ---------------------------------------------------------------- workflows

WORKFLOWS = sorted((ROOT/'.github'/'workflows').glob('*.y*ml'))

def _tool(name):
    exe = Path(sys.executable).parent/name
    return str(exe) if exe.exists() else shutil.which(name)

def test_workflows_match_githubs_schema():
    assert {'deploy.yaml'} <= {p.name for p in WORKFLOWS}, WORKFLOWS
    exe = _tool('check-jsonschema')
    assert exe, "check-jsonschema is missing: pip install -e '.[dev]'"
    r = subprocess.run([exe, '--builtin-schema', 'vendor.github-workflows', *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def test_workflows_pass_zizmor_offline():
    exe = _tool('zizmor')
    assert exe, "zizmor is missing: pip install -e '.[dev]'"
    r = subprocess.run([exe, '--offline', '--config', str(ROOT/'.github'/'zizmor.yml'), *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def test_deploy_workflow_builds_and_publishes_the_site():
    import yaml
    wf = yaml.safe_load((ROOT/'.github'/'workflows'/'deploy.yaml').read_text())
    steps = wf['jobs']['build']['steps']
    runs = '\n'.join(s.get('run', '') for s in steps)
    assert 'tools/build_docs.py --check-readme' in runs and 'tools/build_docs.py --no-readme' in runs, runs
    upload = next(s for s in steps if s.get('uses', '').startswith('actions/upload-pages-artifact@'))
    assert upload['with']['path'] == 'docs/_build/html'
    deploy = wf['jobs']['deploy']
    assert deploy['needs'] == 'build' and deploy['permissions'] == {'pages': 'write', 'id-token': 'write'}
    assert any(s.get('uses', '').startswith('actions/deploy-pages@') for s in deploy['steps'])
    assert wf['permissions'] == {'contents': 'read'}   # the build job gets no write access

# ---------------------------------------------------------------- in a browser

def _find_chrome():
    "(chrome, chromedriver) paths, or None: $LESSON9_CHROME/$LESSON9_CHROMEDRIVER, else Debian's chromium, else Chrome."
    chrome = os.environ.get('LESSON9_CHROME') or next(filter(None, map(shutil.which, ['chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'])), None)
    driver = os.environ.get('LESSON9_CHROMEDRIVER') or shutil.which('chromedriver')
    if not driver and os.environ.get('CHROMEWEBDRIVER'):   # GitHub's Ubuntu runners ship chromedriver there
        cand = Path(os.environ['CHROMEWEBDRIVER'])/'chromedriver'
        driver = str(cand) if cand.exists() else None
    return (chrome, driver) if chrome and driver else None

@pytest.fixture(scope='module')
def browser():
    "Headless Chromium through Selenium and the system's chromedriver; no network beyond 127.0.0.1."
    found = _find_chrome()
    if found is None:
        msg = f"Chromium and chromedriver are needed for the docs browser tests: {INSTALL}"
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'): pytest.fail(msg + " (CI=true: not skipping)")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ['SE_OFFLINE'] = 'true'        # Selenium Manager must not try to download anything
    profile = tempfile.mkdtemp(prefix='lesson9-chromium-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
              '--disable-sync', '--no-first-run', '--disable-quic', '--disable-dev-shm-usage', '--hide-scrollbars',
              f'--user-data-dir={profile}', '--window-size=1280,1000',
              # any host but 127.0.0.1 is unreachable, so a page that needs a CDN fails here on every machine
              '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1']:
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)

class QuietServer(http.server.ThreadingHTTPServer):
    "An HTTP server that lets a client hang up early (a browser leaving a page): no BrokenPipe traceback on stderr."
    daemon_threads = True
    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError): return   # BrokenPipeError, ConnectionResetError ...
        super().handle_error(request, client_address)

def test_server_is_quiet_when_a_client_hangs_up(capfd):
    "The server's handler raising a ConnectionError (a client gone) prints nothing; any other error still prints."
    class Hangup(http.server.BaseHTTPRequestHandler):
        def do_GET(self): raise BrokenPipeError(32, 'Broken pipe')
    class Fails(http.server.BaseHTTPRequestHandler):
        def do_GET(self): raise ValueError('a real error')
    for handler, shown in ((Hangup, False), (Fails, True)):
        srv = QuietServer(('127.0.0.1', 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try: urllib.request.urlopen(f'http://127.0.0.1:{srv.server_port}/', timeout=10)
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException): pass
        srv.shutdown(); srv.server_close()
        err = capfd.readouterr().err
        assert ('Traceback' in err) == shown, err

@pytest.fixture(scope='module')
def server(site):
    "The built site served over HTTP on 127.0.0.1 (search needs HTTP to fetch its index in some browsers)."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    srv = QuietServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site.html)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_port}/'
    srv.shutdown(); srv.server_close()

@pytest.fixture(scope='module')
def artifacts():
    if ARTIFACTS.exists(): shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS

def _open(driver, url):
    "Load `url`, wait until it and MathJax (if any) are done, return the console messages it logged."
    driver.get(url)
    deadline = time.time() + 30
    while time.time() < deadline:
        if driver.execute_script("return document.readyState === 'complete' && (!window.MathJax || !MathJax.startup"
                                 " || MathJax.startup.promise === undefined || window.__mjDone === true)"): break
        driver.execute_script("if (window.MathJax && MathJax.startup && MathJax.startup.promise && !window.__mjWait)"
                              " { window.__mjWait = true; MathJax.startup.promise.then(() => window.__mjDone = true); }")
        time.sleep(0.1)
    return driver.get_log('browser')

def _screenshot(driver, path:Path):
    "A full-page PNG (capped at 20,000 px high)."
    h = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    w = driver.execute_script("return Math.ceil(document.documentElement.scrollWidth)")
    shot = driver.execute_cdp_cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True,
                                  'clip': {'x': 0, 'y': 0, 'width': w, 'height': min(h, 20000), 'scale': 1}})
    path.write_bytes(base64.b64decode(shot['data']))

_page_facts = """
const same = a => a.origin === location.origin;
return {
  links: [...document.querySelectorAll('a[href]')].filter(same).map(a => a.href),
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  badImages: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
  wideCode: [...document.querySelectorAll('article pre')].filter(p => p.scrollWidth > p.clientWidth + 1)
              .map(p => p.textContent.split('\\n').reduce((a, b) => b.length > a.length ? b : a, '').slice(0, 80)),
  plots: [...document.querySelectorAll('.cell_output img')].map(i => {
           const r = i.getBoundingClientRect();
           return {src: i.src, w: i.naturalWidth, h: i.naturalHeight, shownW: r.width, shownH: r.height}; }),
};"""

@pytest.fixture(scope='module')
def visited(site, server, browser, artifacts):
    "Every page of the site opened once in Chromium: console messages, links, ids, images; a screenshot each."
    res = {}
    for f in sorted(site.html.glob('*.html')):
        logs = _open(browser, server + f.name)
        facts = browser.execute_script(_page_facts)
        _screenshot(browser, artifacts/f"{f.stem}.png")
        res[f.name] = SimpleNamespace(logs=logs, **facts)
    return res

def test_pages_have_no_console_errors(visited):
    errors = [f"{name}: {e['level']}: {e['message']}" for name, v in visited.items() for e in v.logs if e['level'] == 'SEVERE']
    assert not errors, '\n'.join(errors)

def test_internal_links_and_images_resolve(site, server, visited):
    problems, checked = [], set()
    for name, v in visited.items():
        problems += [f"{name}: image did not load: {src}" for src in v.badImages]
        for link in v.links:
            url, _, frag = link.partition('#')
            rel = url[len(server):].split('?')[0] or 'index.html'
            if (rel, frag) in checked: continue
            checked.add((rel, frag))
            if rel in visited:
                if frag and urllib.request.unquote(frag) not in visited[rel].ids: problems.append(f"{name}: link to missing anchor {rel}#{frag}")
                continue
            try: urllib.request.urlopen(url, timeout=10).close()
            except urllib.error.URLError as e: problems.append(f"{name}: broken link {rel} ({e})")
    assert checked, "no internal links found"
    assert not problems, '\n'.join(problems)

def test_code_fits_the_column(visited):
    "No code block (cell, signature, output) runs past the text column: long lines wrap."
    wide = [f"{name}: {line!r}" for name, v in visited.items() for line in v.wideCode]
    assert not wide, '\n'.join(wide)

@pytest.mark.parametrize('nb', ['01_data', '02a_why_sqrt5', '05_anneal'])
def test_plots_render(nb, visited):
    if not (NBS/f'{nb}.ipynb').exists(): pytest.skip(f"nbs/{nb}.ipynb does not exist yet: no page to check for plots")
    plots = visited[f'{page_of(nb)}.html'].plots
    shown = [p for p in plots if p['w'] > 0 and p['h'] > 0 and p['shownW'] > 0 and p['shownH'] > 0]
    assert shown, f"no plot rendered with a non-zero size on {page_of(nb)}.html: {plots}"

@pytest.mark.parametrize('term,nb', [('get_data', '01_data'), ('combine_scheds', '05_anneal')])
def test_search_finds_the_page(term, nb, site, server, browser, artifacts):
    if not (NBS/f'{nb}.ipynb').exists(): pytest.skip(f"nbs/{nb}.ipynb does not exist yet: nothing to search {term!r} for")
    logs = _open(browser, f"{server}search.html?q={term}")
    deadline = time.time() + 30
    while time.time() < deadline and not browser.execute_script("return !!document.querySelector('#search-results .search-summary')"):
        time.sleep(0.1)
    hits = browser.execute_script("return [...document.querySelectorAll('#search-results ul.search li a')].map(a => a.href)")
    _screenshot(browser, artifacts/f"search-{term}.png")
    assert not [e for e in logs if e['level'] == 'SEVERE'], logs
    page = f'{page_of(nb)}.html'
    assert any(h[len(server):].split('#')[0] == page for h in hits), f"searching {term!r} did not find {page}: {hits}"
