"""The package as users get it: in sync with the notebooks, clean notebooks, package data, entry points."""
import os, shutil, subprocess, sys, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _copy_project(dest):
    for name in ('settings.ini', 'setup.py'): shutil.copy(ROOT/name, dest/name)
    for name in ('nbs', 'lesson9'):
        shutil.copytree(ROOT/name, dest/name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


def test_modules_are_exactly_what_the_notebooks_export(tmp_path):
    _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev_export'], cwd=tmp_path, check=True, capture_output=True)
    ours = {p.relative_to(ROOT): p.read_text() for p in (ROOT/'lesson9').rglob('*.py') if '__pycache__' not in p.parts}
    exported = {p.relative_to(tmp_path): p.read_text() for p in (tmp_path/'lesson9').rglob('*.py') if '__pycache__' not in p.parts}
    assert sorted(ours) == sorted(exported), 'modules without a notebook, or notebooks without a module'
    stale = [str(k) for k in ours if ours[k] != exported[k]]
    assert not stale, f'run nbdev_export: these modules differ from their notebooks: {stale}'


def test_notebooks_are_committed_clean(tmp_path):
    _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev_clean'], cwd=tmp_path, check=True, capture_output=True)
    dirty = [p.name for p in (ROOT/'nbs').glob('*.ipynb') if p.read_bytes() != (tmp_path/'nbs'/p.name).read_bytes()]
    assert not dirty, f'run nbdev_clean: {dirty}'


def test_wheel_carries_the_embedded_data(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel, = tmp_path.glob('lesson9-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert 'lesson9/assets/mnist10k.npz' in names and 'lesson9/assets/README.md' in names
    assert 'lesson9/__main__.py' in names


@pytest.mark.parametrize('cmd', [[sys.executable, '-m', 'lesson9'], [str(BIN/'lesson9-train')]])
def test_entry_points_reject_bad_options_in_one_line(cmd, tmp_path):
    r = subprocess.run(cmd + ['--lr', 'fast'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.strip().splitlines() == ["lesson9-train: error: argument --lr: expected a number, got 'fast'"]
    assert 'Traceback' not in r.stderr


def test_unreadable_data_file_is_one_line_exit_2(tmp_path):
    (tmp_path/'bad.npz').write_bytes(b'\x00'*10)
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--data', 'bad.npz', '--out', 'o'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'bad.npz' in r.stderr, r.stderr
    assert not (tmp_path/'o').exists()  # nothing written for a run that never started
