"""`ProgressCallback` on a real terminal (a pseudo-terminal) and in a pipe, from a plain Python process.

On a terminal: one line per epoch on stdout, redrawn in place (`\\r`), with batches done, elapsed time
and time left, erased when the epoch's training ends so the printed rows stay. In a pipe: the rows
only. (Its HTML bar in a notebook is checked in tests/test_notebooks.py.)
"""
import os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import torch
from lesson9.callbacks import DataBunch, Learner, ProgressCallback, get_model, get_runner, in_notebook
from lesson9.data import get_data
from lesson9.training import Dataset, cross_entropy, get_dls
torch.set_num_threads(1)
assert not in_notebook()
x, y, xv, yv = get_data()
torch.manual_seed(0)
data = DataBunch(*get_dls(Dataset(x[:1024], y[:1024]), Dataset(xv[:256], yv[:256]), 64, seed=0), c=10)
get_runner([ProgressCallback()]).fit(2, Learner(*get_model(data, lr=0.5, nh=50), cross_entropy, data))
import sys, lesson9.anneal, lesson9.cli
assert 'matplotlib' not in sys.modules, "training without a figure loaded matplotlib"
assert sys.stdout.isatty() or 'fastprogress' not in sys.modules, "no bar to draw, yet fastprogress was loaded"
"""


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])), COLUMNS='100')


def screen(text:str)->list:
    "The lines a terminal shows after `text`: `\\r` returns to the line's start and what follows overwrites it."
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == '\n': lines.append(''.join(cur).rstrip()); cur, col = [], 0
        elif ch == '\r': col = 0
        else:
            if col < len(cur): cur[col] = ch
            else: cur.append(ch)
            col += 1
    return lines + ([''.join(cur).rstrip()] if cur else [])


def test_screen():
    assert screen('abcdef\rxy\n12\r  \rz') == ['xycdef', 'z']


def test_bar_on_a_terminal():
    pty = pytest.importorskip('pty')
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, '-c', SCRIPT], stdout=slave, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try: data = os.read(master, 4096)
        except OSError: break          # the child closed the terminal (EIO on Linux)
        if not data: break
        chunks.append(data)
    os.close(master)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 0, err.decode()
    out = b''.join(chunks).decode().replace('\r\n', '\n')
    for epoch in (1, 2):   # a full bar: batches done, elapsed < left
        assert re.search(rf"\repoch {epoch}/2 \|█+\| 100\.00% \[16/16 \d\d:\d\d<\d\d:\d\d\]", out), out
    assert out.index('[16/16 ') < out.index('epoch 1 | train loss') < out.index('\repoch 2/2'), out
    shown = screen(out)   # what is left on the terminal: the rows, each bar erased under them
    row = r'epoch {} \| train loss \d\.\d{{4}} acc \d\.\d{{4}} \| valid loss \d\.\d{{4}} acc \d\.\d{{4}}'
    assert len(shown) == 2 and all(re.fullmatch(row.format(i), l) for i, l in enumerate(shown, 1)), shown


def test_silent_in_a_pipe():
    r = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [l.split(' |')[0] for l in r.stdout.splitlines()] == ['epoch 1', 'epoch 2'], repr(r.stdout)
    assert '\r' not in r.stdout and '█' not in r.stdout and r.stderr == '', (r.stdout, r.stderr)
