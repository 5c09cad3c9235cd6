"""Every notebook in nbs/ passes as a learner runs it, and on numerics other than this machine's.

Two runs of every notebook, each reported per notebook, so one failure never hides the others:

1. **In a Jupyter kernel, as a learner runs it.** Each notebook is executed fresh by nbclient on the
   `python3` kernel of this environment, from nbs/, with the kernel's default number of torch threads
   (no OMP_NUM_THREADS) and without MPLBACKEND (a learner's kernel has Jupyter's inline backend), one
   notebook at a time. No cell may fail; every cell that made a figure (a `<Figure ...>` text or an
   image) shows it as an image, and so does every cell whose stored output is an image (what the docs
   show); 05_anneal shows each of its 9 figures as an image; `ProgressCallback` draws its HTML bar in a
   notebook, and nothing when turned off.
2. **Under nbdev_test on another machine's numerics.** ATen's portable kernels
   (`ATEN_CPU_CAPABILITY=default`, the unvectorised code a CPU without AVX gets) and one torch
   thread, two notebooks at a time: other rounding in every matrix product and reduction, and
   another thread count than the kernels above, so a notebook that pinned one machine's training
   results fails here. `tools/regimes.py` runs more such regimes by hand.
"""
import json, os, re, sys, time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tools'))
import regimes  # noqa: E402
import run_nb  # noqa: E402

NBS = ROOT/'nbs'
NOTEBOOKS = sorted(p.name for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
CELL_TIMEOUT = 600                  # seconds per cell; the slowest cells train for a few seconds
IMAGE_TYPES = ('image/png', 'image/svg+xml')
_figure_text = re.compile(r'<\w*Figure size [\d.]+x[\d.]+ with \d+ Axes>')
OTHER_NUMERICS = 'portable-1'       # a regime of tools/regimes.py

PROGRESS_NB = [
    "import torch\n"
    "from lesson9.callbacks import DataBunch, Learner, ProgressCallback, get_model, get_runner\n"
    "from lesson9.data import get_data\n"
    "from lesson9.training import Dataset, cross_entropy, get_dls",
    "x, y, xv, yv = get_data()\n"
    "def learner():\n"
    "    torch.manual_seed(0)\n"
    "    data = DataBunch(*get_dls(Dataset(x[:1024], y[:1024]), Dataset(xv[:256], yv[:256]), 64, seed=0), c=10)\n"
    "    return Learner(*get_model(data, lr=0.5, nh=50), cross_entropy, data)",
    "get_runner([ProgressCallback()]).fit(2, learner())",
    "get_runner([ProgressCallback(enabled=False)]).fit(2, learner())",
]


def execute(nb_json:str, name:str)->dict:
    "Run a notebook (JSON text) fresh in nbs/ on the python3 kernel with default threads; its executed JSON, or the error, and the seconds taken."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.reads(nb_json, as_version=4)
    for c in nb.cells:   # only what this run shows counts: a cell that never ran must not keep its saved outputs
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    t0, error = time.perf_counter(), None
    client = NotebookClient(nb, kernel_name='python3', timeout=CELL_TIMEOUT, resources={'metadata': {'path': str(NBS)}})
    try: client.execute(env=run_nb.kernel_env())
    except CellExecutionError as e: error = str(e)[-3000:]
    return dict(name=name, nb=nbformat.writes(nb), error=error, seconds=time.perf_counter() - t0)


def _progress_nb()->str:
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in PROGRESS_NB],
                                  metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    return nbformat.writes(nb)


@pytest.fixture(scope='module')
def executed():
    "Every notebook in nbs/ and the progress notebook, executed once, one at a time; {name: result}."
    jobs = [((NBS/n).read_text(encoding='utf-8'), n) for n in NOTEBOOKS] + [(_progress_nb(), 'progress')]
    t0 = time.perf_counter()
    # one at a time, as a learner runs them: a kernel's default threads already take every core
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context('spawn')) as ex:
        res = {r['name']: r for r in ex.map(execute, *zip(*jobs))}
    times = ', '.join(f"{n} {r['seconds']:.0f} s" for n, r in res.items())
    print(f"\nnotebooks executed in {time.perf_counter() - t0:.0f} s: {times}")
    return res


def _text(x): return ''.join(x) if isinstance(x, list) else (x or '')


def figure_problems(cells:list, stored:list=None)->list:
    "Code cells that made a figure but show no image; with `stored` (the notebook as saved), also cells whose saved image is gone."
    problems = []
    for i, c in enumerate(cells):
        if c['cell_type'] != 'code': continue
        outs = c.get('outputs', [])
        images = any(k in o.get('data', {}) for o in outs for k in IMAGE_TYPES)
        texts = [_text(o.get('data', {}).get('text/plain')) + _text(o.get('text')) for o in outs]
        figure = next((m.group(0) for t in texts if (m := _figure_text.search(t))), None)
        src = _text(c['source']).strip().splitlines()
        where = f"cell {i} ({src[-1][:60] if src else ''!r})"
        if figure and not images: problems.append(f"{where} shows {figure!r} as text, not as an image")
        was_image = stored is not None and any(k in o.get('data', {}) for o in stored[i].get('outputs', []) for k in IMAGE_TYPES)
        if was_image and not images: problems.append(f"{where} has an image in the saved notebook but none when run fresh")
    return problems


def test_figure_problems_catches_a_figure_shown_as_text():
    "The check itself: a figure shown as text is caught, an image is not, and a lost saved image is caught."
    as_text = {'cell_type': 'code', 'source': 'fig', 'outputs': [
        {'output_type': 'execute_result', 'data': {'text/plain': '<Figure size 450x300 with 1 Axes>'}}]}
    as_image = {'cell_type': 'code', 'source': 'fig', 'outputs': [
        {'output_type': 'execute_result', 'data': {'text/plain': '<Figure size 450x300 with 1 Axes>', 'image/png': 'iVBOR'}}]}
    nothing = {'cell_type': 'code', 'source': 'plt.plot([1])', 'outputs': []}
    assert len(figure_problems([as_text])) == 1 and figure_problems([as_image]) == []
    assert len(figure_problems([nothing], stored=[as_image])) == 1 and figure_problems([nothing]) == []


@pytest.fixture(scope='module')
def other_numerics():
    "Every notebook under nbdev_test with ATen's portable kernels and one thread, two at a time; {name: (passed, seconds, error)}."
    env = regimes.REGIMES[OTHER_NUMERICS]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex: res = dict(zip(NOTEBOOKS, ex.map(lambda n: regimes.nbdev_test(NBS/n, env), NOTEBOOKS)))
    print(f"\nnbdev_test under {OTHER_NUMERICS} in {time.perf_counter() - t0:.0f} s: " + ', '.join(f"{n} {r[1]:.0f} s" for n, r in res.items()))
    return res


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_passes_on_other_numerics(name, other_numerics):
    passed, _, error = other_numerics[name]
    env = ' '.join(f'{k}={v}' for k, v in regimes.REGIMES[OTHER_NUMERICS].items())
    assert passed, f"{env} nbdev_test --path nbs/{name} failed:\n  {error}"


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_fresh_in_a_kernel(name, executed):
    r = executed[name]
    assert r['error'] is None, f"{name} failed in a fresh kernel:\n{r['error']}"


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_figures_render_as_images(name, executed):
    cells = json.loads(executed[name]['nb'])['cells']
    stored = json.loads((NBS/name).read_text(encoding='utf-8'))['cells']
    problems = figure_problems(cells, stored)
    assert not problems, f"{name}:\n" + '\n'.join(problems)


def test_anneal_shows_every_figure(executed):
    "05_anneal makes 9 figures (the first batches, Recorder, schedules, LR finder): each one is an image in a fresh kernel."
    name = '05_anneal.ipynb'
    if name not in executed: pytest.skip(f"nbs/{name} does not exist")
    cells = [c for c in json.loads(executed[name]['nb'])['cells'] if c['cell_type'] == 'code']
    figures = [c for c in cells if any(_figure_text.search(_text(o.get('data', {}).get('text/plain'))) for o in c['outputs'])]
    images = [c for c in cells if any(k in o.get('data', {}) for o in c['outputs'] for k in IMAGE_TYPES)]
    assert len(figures) == 9 and images == figures, (len(figures), len(images))


def test_progress_bar_in_a_notebook(executed):
    r = executed['progress']
    assert r['error'] is None, r['error']
    on, off = json.loads(r['nb'])['cells'][2:4]
    html = [_text(o['data']['text/html']) for o in on['outputs'] if 'text/html' in o.get('data', {})]
    bars = [h for h in html if '<progress' in h]
    assert len(bars) == 2, html                                  # one bar per epoch, left in place
    for epoch, h in enumerate(bars, 1):
        assert "<progress value='16' class='' max='16'" in h, h  # 1,024 samples in batches of 64: full
        assert re.search(rf"\[16/16 \d\d:\d\d&lt;\d\d:\d\d epoch {epoch}/2\]", h), h   # batches, elapsed < left
    text = ''.join(_text(o.get('text')) for o in on['outputs'] if o['output_type'] == 'stream')
    assert [l.split(' |')[0] for l in text.splitlines()] == ['epoch 1', 'epoch 2'], text   # the rows, and no text bar
    assert not any('text/html' in o.get('data', {}) for o in off['outputs']), off['outputs']
    assert [l.split(' |')[0] for l in ''.join(_text(o.get('text')) for o in off['outputs']).splitlines()] == ['epoch 1', 'epoch 2']
