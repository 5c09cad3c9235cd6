#!/usr/bin/env python
"""Run notebooks with nbdev_test under several numerics regimes: other CPU kernels, other thread counts.

A notebook must pass on a learner's machine, not only on ours. Training is sensitive to rounding: one
different last bit in a matrix product can grow into a different run. ATen, PyTorch's kernel library,
picks its vector kernels by what the CPU offers; `ATEN_CPU_CAPABILITY` makes it use a lesser set
(`default` is the portable, unvectorised one; `avx2` is what an AVX2-only CPU gets), and the number of
torch threads changes how reductions are split. Each regime below is one such machine.

    python tools/regimes.py                          # every notebook, every regime
    python tools/regimes.py nbs/05_anneal.ipynb      # one notebook
    python tools/regimes.py -r portable-3 native-4   # some regimes (default: all but portable-1)

Prints a table: one row per notebook, one column per regime, and the first error of each failure.
Exit status 1 if anything failed. Takes a few minutes (each regime runs every notebook once).
"""
import argparse, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGIMES = {  # name: environment on top of the caller's
    'native-1':   {'OMP_NUM_THREADS': '1'},
    'native-4':   {'OMP_NUM_THREADS': '4'},
    'portable-1': {'ATEN_CPU_CAPABILITY': 'default', 'OMP_NUM_THREADS': '1'},
    'portable-3': {'ATEN_CPU_CAPABILITY': 'default', 'OMP_NUM_THREADS': '3'},
    'avx2-2':     {'ATEN_CPU_CAPABILITY': 'avx2', 'OMP_NUM_THREADS': '2'},
}


def nbdev_test(nb:Path, env:dict)->tuple:
    "Run one notebook with nbdev_test under `env`: (passed, seconds, last lines of the error)."
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev_test'), '--path', str(nb)], cwd=ROOT,
                       env={**os.environ, 'MPLBACKEND': 'Agg', **env}, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().splitlines()
    err = [i for i, l in enumerate(out) if 'Error' in l and not l.startswith(' ')]
    return r.returncode == 0, time.perf_counter() - t0, '\n  '.join(out[err[-1]:err[-1] + 3] if err else out[-3:])[:600]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', type=Path, help='notebooks (default: every one in nbs/)')
    ap.add_argument('-r', '--regimes', nargs='+', choices=list(REGIMES), default=[r for r in REGIMES if r != 'portable-1'],
                    help='regimes to run (default: all but portable-1, which the test suite runs)')
    ap.add_argument('-j', '--jobs', type=int, default=2, help='notebooks run at a time (default 2)')
    a = ap.parse_args(argv)
    nbs = a.notebooks or sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    missing = [str(p) for p in nbs if not p.is_file()]
    if missing: ap.error(f"no such notebook: {', '.join(missing)}")
    jobs = [(nb, r) for r in a.regimes for nb in nbs]
    with ThreadPoolExecutor(a.jobs) as ex: results = dict(zip(jobs, ex.map(lambda j: nbdev_test(j[0], REGIMES[j[1]]), jobs)))
    w = max(len(nb.name) for nb in nbs)
    print(f"{'notebook':{w}}  " + '  '.join(f'{r:>12}' for r in a.regimes))
    for nb in nbs:
        print(f"{nb.name:{w}}  " + '  '.join(f"{('ok' if results[nb, r][0] else 'FAIL'):>6} {results[nb, r][1]:3.0f} s" for r in a.regimes))
    failed = [(nb, r) for (nb, r), (ok, _, _) in results.items() if not ok]
    for nb, r in failed: print(f"\n{nb.name} under {r} ({' '.join(f'{k}={v}' for k, v in REGIMES[r].items())}):\n  {results[nb, r][2]}")
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
