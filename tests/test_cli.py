"""The main job as users and faults treat it: real signals at chosen batches, resume, two runs into one folder,
a full disk while the outputs are written, divergence, unexpected errors, and every bad value refused up front."""
import contextlib, errno, hashlib, io, json, os, signal, stat, subprocess, sys
from pathlib import Path

import pytest
import torch

import lesson9.checkpoint
import lesson9.cli as cli
from lesson9.callbacks import Runner

EPOCHS = ['--epochs', '2']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')  # bit-identical runs need the same number of threads


@pytest.fixture(scope='module', autouse=True)
def one_thread_here():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_main(*argv):
    "Run `lesson9-train` in this process; return (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = cli.main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def start(*argv, cwd=None):
    "Start `python -m lesson9` as a user would, output piped."
    return subprocess.Popen([sys.executable, '-m', 'lesson9', *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=cwd)


def outputs(d):
    "The published set: summary, and each file's bytes, checked against the manifest."
    d = Path(d)
    s = json.loads((d/'summary.json').read_text())
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith('.')) == sorted(list(s['files']) + ['summary.json'])
    for name, sha in s['files'].items(): assert hashlib.sha256((d/name).read_bytes()).hexdigest() == sha, name
    assert not [p for p in d.rglob('*') if p.name.endswith('.part') or p.name.startswith('publish')], list(d.rglob('*'))
    return s


def weights(d): return torch.load(Path(d)/'model.pt', weights_only=True)


def same_run(a, b):
    "Two runs ended in the same place: history and weights, bit for bit."
    sa, sb = outputs(a), outputs(b)
    assert sa['history'] == sb['history']
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "Uninterrupted runs, one per schedule."
    refs = {}
    for schedule in ('constant', 'one_cycle'):
        d = tmp_path_factory.mktemp(f'ref-{schedule}')
        code, _, err = run_main(*EPOCHS, '--schedule', schedule, '--out', d)
        assert code == 0, err
        refs[schedule] = d
    return refs


def signal_at(monkeypatch, sig, epoch, in_train, it):
    "Send `sig` to this process just before the runner starts batch `it` of `epoch` in the given phase."
    real = Runner.one_batch
    def one_batch(self, xb, yb):
        if (self.epoch, self.in_train, self.iter) == (epoch, in_train, it): os.kill(os.getpid(), sig)
        return real(self, xb, yb)
    monkeypatch.setattr(Runner, 'one_batch', one_batch)


@pytest.mark.parametrize('schedule,sig,epoch,in_train,it,where', [
    ('constant', signal.SIGINT, 0, True, 40, 'in epoch 1, after training batch 41 of 125'),
    ('one_cycle', signal.SIGTERM, 1, True, 0, 'in epoch 2, after training batch 1 of 125'),
    ('one_cycle', signal.SIGINT, 0, True, 124, 'in epoch 1, after training batch 125 of 125'),   # before validation
    ('constant', signal.SIGTERM, 0, False, 3, 'in epoch 1, after validation batch 4 of 16'),
    ('one_cycle', signal.SIGINT, 0, False, 15, 'in epoch 1, after validation batch 16 of 16'),  # validation done, epoch not closed
])
def test_signal_at_a_batch_saves_and_resume_gives_the_same_run(reference, tmp_path, monkeypatch, schedule, sig, epoch, in_train, it, where):
    signal_at(monkeypatch, sig, epoch, in_train, it)
    code, out, err = run_main(*EPOCHS, '--schedule', schedule, '--out', tmp_path)
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    name = signal.Signals(sig).name
    assert err == f"lesson9-train: stopped by {name} {where}; carry on with: lesson9-train --resume --out {tmp_path}\n"
    s = outputs(tmp_path)
    assert s['status'] == 'interrupted' and sorted(s['files']) == ['checkpoint.pt', 'loss.png', 'lr.png', 'model.pt']
    assert len(s['history']) == epoch
    monkeypatch.undo()
    code, out, err = run_main('--resume', '--out', tmp_path)
    assert code == 0, err
    assert outputs(tmp_path)['status'] == 'finished'
    same_run(tmp_path, reference[schedule])


def test_signal_at_an_epoch_end(reference, tmp_path, monkeypatch):
    real_row, rows = cli._row, []
    def row(h):  # the epoch's row is printed at after_epoch, before the checkpoint callback runs
        if not rows: os.kill(os.getpid(), signal.SIGINT)   # at the end of the first epoch
        rows.append(h); return real_row(h)
    monkeypatch.setattr(cli, '_row', row)
    code, _, err = run_main(*EPOCHS, '--schedule', 'one_cycle', '--out', tmp_path)
    assert code == 130 and 'stopped by SIGINT after epoch 1;' in err, err
    assert len(outputs(tmp_path)['history']) == 1
    monkeypatch.undo()
    assert run_main('--resume', '--out', tmp_path)[0] == 0
    same_run(tmp_path, reference['one_cycle'])


def test_real_signal_to_a_process_then_resume(reference, tmp_path):
    job = start(*EPOCHS, '--schedule', 'constant', '--out', tmp_path)
    assert job.stdout.readline().split()[0] == 'epoch'
    assert job.stdout.readline().split()[0] == '1'   # rows reach the pipe as they are printed
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert err.count('\n') == 1 and 'Traceback' not in err and err.startswith('lesson9-train: stopped by SIGTERM')
    assert outputs(tmp_path)['status'] == 'interrupted'
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--resume', '--out', str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[0] == '1'   # the saved epochs' rows come first
    same_run(tmp_path, reference['constant'])


def test_second_run_into_a_folder_in_use_is_refused(tmp_path):
    job = start('--epochs', '500', '--out', tmp_path)
    try:
        assert job.stdout.readline().split()[0] == 'epoch'
        assert job.stdout.readline().split()[0] == '1'     # training is under way
        code, out, err = run_main('--epochs', '1', '--out', tmp_path)
        assert code == 2 and err == f"lesson9-train: error: argument --out: {tmp_path} is in use by another run (pid {job.pid}); wait for it or choose another folder\n"
    finally:
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=120)
    assert job.returncode == 130
    assert outputs(tmp_path)['config']['epochs'] == 500   # the set is the first run's, complete


def test_full_disk_while_publishing_keeps_the_previous_set_then_resume_writes_it(reference, tmp_path, monkeypatch):
    assert run_main('--epochs', '1', '--out', tmp_path)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real = lesson9.checkpoint._write_file
    def write(dst, src):
        if dst.name == 'lr.png': raise OSError(errno.ENOSPC, 'No space left on device')
        return real(dst, src)
    monkeypatch.setattr(lesson9.checkpoint, '_write_file', write)
    code, _, err = run_main(*EPOCHS, '--schedule', 'constant', '--out', tmp_path)
    assert code == 1 and err.count('\n') == 1 and 'No space left on device' in err and '--resume' in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before   # the first run's set, untouched
    assert outputs(tmp_path)['config']['epochs'] == 1
    monkeypatch.undo()
    code, _, err = run_main('--resume', '--out', tmp_path)   # the finished run's outputs, from its checkpoint
    assert code == 0, err
    same_run(tmp_path, reference['constant'])


def test_divergence_exits_3_with_strict_json(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--lr', '1e38', '--schedule', 'constant', '--epochs', '3', '--out', str(tmp_path)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 3 and r.stderr.count('\n') == 1 and 'at epoch 1, batch 2 of 125' in r.stderr, r.stderr
    raw = (tmp_path/'summary.json').read_text()
    assert 'NaN' not in raw and 'Infinity' not in raw
    s = outputs(tmp_path)
    assert s['status'] == 'diverged' and len(s['history']) == 1
    assert not (tmp_path/'.lesson9'/'checkpoint.pt').exists()


def test_unexpected_error_is_one_line_with_the_traceback_saved(tmp_path, monkeypatch):
    real = Runner.one_batch
    def one_batch(self, xb, yb):
        if self.n_iter == 5: raise RuntimeError('something broke')
        return real(self, xb, yb)
    monkeypatch.setattr(Runner, 'one_batch', one_batch)
    code, _, err = run_main('--epochs', '1', '--out', tmp_path)
    assert code == 1 and err.count('\n') == 1 and err.startswith('lesson9-train: error: RuntimeError: something broke'), err
    log = Path(err.split('the full traceback is in ')[1].split(';')[0])
    assert 'Traceback' in log.read_text() and 'something broke' in log.read_text()
    log.unlink()
    with pytest.raises(RuntimeError, match='something broke'): cli.main(['--epochs', '1', '--out', str(tmp_path), '--debug'])


def test_outputs_keep_the_umask(tmp_path):
    old = os.umask(0o022)
    try: assert run_main('--epochs', '1', '--out', tmp_path)[0] == 0
    finally: os.umask(old)
    for name in ('summary.json', 'model.pt', 'checkpoint.pt', 'loss.png', 'lr.png'):
        assert stat.S_IMODE((tmp_path/name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize('argv,message', [
    (['--seed', '-1'], "argument --seed: must be >= 0, got '-1'"),
    (['--lr', 'inf'], "argument --lr: must be a finite number, got 'inf'"),
    (['--lr', 'nan'], "argument --lr: must be a finite number, got 'nan'"),
    (['--device', 'meta'], "'meta' is not a device that can train"),
    (['--data', 'Embedded'], "did you mean 'embedded'?"),
    (['--data', 'afile'], 'afile is not an .npz file (a zip of arrays, as numpy.savez writes)'),
    (['--out', 'afile'], 'afile is a file, not a folder'),
    (['--resume', '--epochs', '3'], 'leave out --epochs'),
])
def test_bad_values_are_refused_before_work_in_one_line(tmp_path, argv, message):
    (tmp_path/'afile').write_text('mine')
    r = subprocess.run([sys.executable, '-m', 'lesson9', *argv], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == '' and r.stderr.count('\n') == 1 and message in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile'] and (tmp_path/'afile').read_text() == 'mine'


def test_help_documents_resume_outputs_and_exit_codes():
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--help'], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ('--resume', 'summary.json', 'model.pt', 'checkpoint.pt', 'loss.png', 'lr.png', '130', '143', 'diverged'):
        assert word in r.stdout, word


def test_fast_path_flag_trains_the_same_run(reference, tmp_path):
    code, _, err = run_main(*EPOCHS, '--schedule', 'constant', '--fast', '--out', tmp_path)
    assert code == 0, err
    s, ref = outputs(tmp_path), outputs(reference['constant'])
    assert s['config']['fast'] is True and ref['config']['fast'] is False
    for a, b in zip(s['history'], ref['history']):
        assert all(abs(a[k] - b[k]) <= 1e-5 for k in a), (a, b)
    w, wr = weights(tmp_path), weights(reference['constant'])
    assert all(torch.allclose(w[k], wr[k], atol=1e-5, rtol=0) for k in w)
