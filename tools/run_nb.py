#!/usr/bin/env python
"""Run notebooks top to bottom in a fresh Jupyter kernel, as a reader does, and store their outputs.

The docs show each notebook's stored outputs, so after a change a notebook is run again and saved:

    python tools/run_nb.py nbs/05_anneal.ipynb            # run it; save it with its outputs if every cell passed
    python tools/run_nb.py --check nbs/0*.ipynb           # run them; save nothing

Each notebook runs on this Python's `python3` kernel, from nbs/, with the kernel's default number of
torch threads (no OMP_NUM_THREADS) and without MPLBACKEND, as in JupyterLab. A saved notebook is then
cleaned with `nbdev_clean`. A notebook with a failing cell is never saved: the error is printed and the
exit status is 1.
"""
import argparse, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_env()->dict:
    "A reader's kernel: this Python's bin first on PATH, the repository importable, default threads, no MPLBACKEND."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), env.get('PATH', '')])
    for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'MPLBACKEND'): env.pop(k, None)
    return env


def run(path:Path, save:bool, timeout:int=600)->bool:
    "Execute the notebook at `path` fresh; save it with its outputs when `save` and every cell passed. True if it passed."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, kernel_name='python3', timeout=timeout, resources={'metadata': {'path': str(path.parent)}}).execute(env=kernel_env())
    except CellExecutionError as e:
        print(f"{path}: FAILED after {time.perf_counter() - t0:.0f} s, nothing saved\n{str(e)[-3000:]}", file=sys.stderr)
        return False
    msg = f"{path}: passed in {time.perf_counter() - t0:.0f} s"
    if save:
        nbformat.write(nb, path)
        subprocess.run([str(Path(sys.executable).parent/'nbdev_clean'), '--fname', str(path)], cwd=ROOT, check=True)
        msg += ', saved with its outputs'
    print(msg)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='+', type=Path, help='notebooks to run')
    ap.add_argument('--check', action='store_true', help='run them but save nothing')
    ap.add_argument('--timeout', type=int, default=600, help='seconds allowed per cell (default 600)')
    a = ap.parse_args(argv)
    missing = [str(p) for p in a.notebooks if not p.is_file()]
    if missing: ap.error(f"no such notebook: {', '.join(missing)}")
    ok = [run(p.resolve(), not a.check, a.timeout) for p in a.notebooks]
    return 0 if all(ok) else 1


if __name__ == '__main__': sys.exit(main())
