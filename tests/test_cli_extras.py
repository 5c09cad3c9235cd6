"""The main job's options from 08a_extras: --early-stop/--monitor (best.pt, the summary's record of the stop),
--evaluate --best, --precision; each refused clearly where it cannot work, and carried on exactly by --resume."""
import json, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

import lesson9.extras
from test_cli import one_thread_here, outputs, run_main, same_run, signal_at  # one_thread_here: autouse here too

CONSTANT = ['--schedule', 'constant']


def improves_twice(monkeypatch):
    "Make the first two distinct values of the monitored metric improvements, and no later one (EarlyStopping and BestModel agree)."
    seen = []
    def improves(value, best, mode='min', min_delta=0.):
        if value not in seen: seen.append(value)
        return seen.index(value) < 2
    monkeypatch.setattr(lesson9.extras, 'improves', improves)


def test_early_stop_publishes_the_best_epoch_and_says_why(tmp_path, monkeypatch):
    improves_twice(monkeypatch)
    code, out, err = run_main('--epochs', '6', *CONSTANT, '--early-stop', '2', '--out', tmp_path/'es')
    assert code == 0, err
    s = outputs(tmp_path/'es')  # best.pt is in the manifest, with its sha256
    assert 'best.pt' in s['files'] and s['status'] == 'finished' and len(s['history']) == 4
    assert s['early_stop'] == dict(monitor='valid_loss', patience=2, best_epoch=2, best=s['history'][1]['valid_loss'], stopped_after=4,
                                   reason=f"valid_loss did not improve for 2 epochs (best {s['history'][1]['valid_loss']:.4f} after epoch 2)")
    assert 'stopped early: valid_loss did not improve for 2 epochs' in out
    monkeypatch.undo()
    # with a constant lr, the first 2 epochs of any run are the same: best.pt must be a 2-epoch run's model.pt, bit for bit
    assert run_main('--epochs', '2', *CONSTANT, '--out', tmp_path/'two')[0] == 0
    best, two = (torch.load(p, weights_only=True) for p in (tmp_path/'es'/'best.pt', tmp_path/'two'/'model.pt'))
    assert best.keys() == two.keys() and all(torch.equal(best[k], two[k]) for k in two)
    code, out, err = run_main('--evaluate', '--best', '--out', tmp_path/'es')
    assert code == 0 and out.startswith(f"valid_loss {s['history'][1]['valid_loss']:.10f} ") and 'best.pt' in out, (out, err)
    assert 'best.pt' not in outputs(tmp_path/'two')['files']  # without --early-stop the set is as before
    code, _, err = run_main('--evaluate', '--best', '--out', tmp_path/'two')
    assert code == 2 and 'no best.pt published' in err and '--early-stop' in err, err


def test_monitor_valid_acc_keeps_the_most_accurate_epoch(tmp_path):
    code, _, err = run_main('--epochs', '3', *CONSTANT, '--lr', '1.5', '--early-stop', '1', '--monitor', 'valid_acc', '--out', tmp_path)
    assert code == 0, err
    s = outputs(tmp_path)
    accs = [h['valid_acc'] for h in s['history']]
    e = s['early_stop']
    assert e['monitor'] == 'valid_acc' and e['best_epoch'] == 1 + accs.index(max(accs)) and e['best'] == max(accs)
    assert len(accs) == (e['stopped_after'] or 3)
    assert s['config']['early_stop'] == 1 and s['config']['monitor'] == 'valid_acc'
    code, out, _ = run_main('--evaluate', '--best', '--out', tmp_path)
    assert code == 0 and abs(float(out.split()[3]) - max(accs)) < 1e-9, out


def test_resume_with_early_stop_and_bf16_is_bit_identical(tmp_path, monkeypatch):
    argv = ['--epochs', '3', *CONSTANT, '--early-stop', '2', '--precision', 'bf16']
    assert run_main(*argv, '--out', tmp_path/'ref')[0] == 0
    signal_at(monkeypatch, signal.SIGTERM, 1, True, 10)
    assert run_main(*argv, '--out', tmp_path/'stopped')[0] == 143
    monkeypatch.undo()
    code, _, err = run_main('--resume', '--out', tmp_path/'stopped')
    assert code == 0, err
    same_run(tmp_path/'stopped', tmp_path/'ref')
    s, ref = outputs(tmp_path/'stopped'), outputs(tmp_path/'ref')
    assert s['early_stop'] == ref['early_stop'] and s['config']['precision'] == 'bf16'
    a, b = (torch.load(Path(d)/'best.pt', weights_only=True) for d in (tmp_path/'stopped', tmp_path/'ref'))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # --evaluate repeats the run's own bf16 validation
    code, out, _ = run_main('--evaluate', '--out', tmp_path/'ref')
    assert code == 0 and abs(float(out.split()[1]) - ref['final']['valid_loss']) < 1e-6, (out, ref['final'])


@pytest.mark.parametrize('argv,message', [
    (['--precision', 'fp16', '--device', 'cpu'], "argument --precision: precision 'fp16' needs a CUDA device"),
    (['--precision', 'fp8'], "argument --precision: invalid choice: 'fp8'"),
    (['--early-stop', '0'], "argument --early-stop: must be >= 1, got '0'"),
    (['--monitor', 'valid_acc'], "argument --monitor: it says what --early-stop watches; give --early-stop N too"),
    (['--monitor', 'train_loss', '--early-stop', '2'], "argument --monitor: invalid choice: 'train_loss'"),
    (['--best'], "--best goes with --evaluate"),
    (['--resume', '--precision', 'bf16'], "leave out --precision"),
])
def test_bad_values_are_refused_before_work_in_one_line(tmp_path, argv, message):
    r = subprocess.run([sys.executable, '-m', 'lesson9', *argv, '--out', 'run'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == '' and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # no folder made, nothing written


def test_mixed_precision_is_named_as_the_reason_the_fast_path_runs_eagerly(tmp_path):
    code, _, err = run_main('--epochs', '1', *CONSTANT, '--fast', '--precision', 'bf16', '--out', tmp_path)
    assert code == 0, err
    s = outputs(tmp_path)
    assert s['fast_path'].startswith("eager: MixedPrecision needs Python at after_pred"), s['fast_path']
    assert 'note: --fast ran the batches eagerly: MixedPrecision' in err


def test_help_lists_the_new_options():
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--help'], capture_output=True, text=True)
    for word in ('--early-stop', '--monitor', '--precision', '--best', 'best.pt', 'bf16', 'fp16'): assert word in r.stdout, word


def test_a_run_saved_before_these_options_still_resumes(tmp_path, monkeypatch):
    "A checkpoint whose saved options lack early_stop, monitor and precision (as older versions wrote them) carries on as fp32 without early stopping."
    import hashlib
    argv = ['--epochs', '2', *CONSTANT]
    assert run_main(*argv, '--out', tmp_path/'ref')[0] == 0
    signal_at(monkeypatch, signal.SIGTERM, 1, True, 10)
    d = tmp_path/'old'
    assert run_main(*argv, '--out', d)[0] == 143
    monkeypatch.undo()
    state = torch.load(d/'checkpoint.pt', weights_only=True)
    for k in ('early_stop', 'monitor', 'precision'): del state['extra']['options'][k]
    torch.save(state, d/'checkpoint.pt')
    s = json.loads((d/'summary.json').read_text())
    s['files']['checkpoint.pt'] = hashlib.sha256((d/'checkpoint.pt').read_bytes()).hexdigest()
    (d/'summary.json').write_text(json.dumps(s))
    code, _, err = run_main('--resume', '--out', d)
    assert code == 0, err
    same_run(d, tmp_path/'ref')
    s = outputs(d)
    assert s['early_stop'] is None and 'best.pt' not in s['files'] and 'precision' not in s['config']


def test_under_torchrun_two_processes_stop_together(tmp_path):
    """The main job with --early-stop on 2 processes. Each validates half the digits; the record every process reads
    is the global one, so they stop at the same epoch: were it not so, one would wait forever for the other in the
    next epoch's first collective. (At lr 1.5 the run is too chaotic to match one process's epoch for epoch.)"""
    import os
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    argv = ['-m', 'lesson9', '--epochs', '4', *CONSTANT, '--lr', '1.5', '--early-stop', '1', '--device', 'cpu']
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *argv, '--out', str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    s = outputs(tmp_path)
    e, losses = s['early_stop'], [h['valid_loss'] for h in s['history']]
    assert s['config']['processes'] == 2 and 'best.pt' in s['files']
    assert e['best_epoch'] == 1 + losses.index(min(losses)) and len(losses) == (e['stopped_after'] or 4)
    if e['stopped_after']: assert e['stopped_after'] - e['best_epoch'] == 1
    code, out, _ = run_main('--evaluate', '--best', '--out', tmp_path)  # the best epoch's weights, in one process
    assert code == 0 and abs(float(out.split()[1]) - e['best']) < 1e-5, (out, e)
