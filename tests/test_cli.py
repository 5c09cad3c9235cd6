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
    assert code == 1 and err.count('\n') == 1 and f'the disk holding {tmp_path} is full' in err and '--resume' in err, err
    assert 'the previous outputs there are unchanged' in err and 'Traceback' not in err, err
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


# ---------------------------------------------------------------- verify, then trust

def tree(d):
    "Every file under `d` (the private area included), with its bytes: to check that a refusal changed nothing."
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob('*')) if p.is_file()}


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    "A constant-lr run stopped by SIGTERM in epoch 2: a published interrupted set, carried on with --resume."
    d = tmp_path/'stopped'
    signal_at(monkeypatch, signal.SIGTERM, 1, True, 10)
    assert run_main(*EPOCHS, '--schedule', 'constant', '--out', d)[0] == 143
    monkeypatch.undo()
    return d


def refused(d, message, *argv):
    "`--resume` (or `argv`) on `d` exits 2 with one line holding `message`, and changes nothing in `d`."
    before = tree(d)
    code, out, err = run_main(*(argv or ('--resume',)), '--out', d)
    assert code == 2 and err.count('\n') == 1 and message in err, err
    assert tree(d) == before


def flip(path, where=0.5):
    raw = bytearray(path.read_bytes()); raw[int(len(raw)*where)] ^= 0x10; path.write_bytes(raw)


def test_resume_refuses_a_damaged_or_foreign_published_checkpoint(stopped, reference, tmp_path):
    ck = stopped/'checkpoint.pt'
    good = ck.read_bytes()
    flip(ck)
    refused(stopped, f"--resume: {ck} does not match the sha256 that {stopped/'summary.json'} lists for it")
    shutil_copy = __import__('shutil').copyfile
    shutil_copy(reference['constant']/'checkpoint.pt', ck)   # another run's checkpoint, whole
    refused(stopped, 'does not match the sha256')
    ck.write_bytes(good)
    code, _, err = run_main('--resume', '--out', stopped)
    assert code == 0, err
    same_run(stopped, reference['constant'])


def test_resume_checks_a_killed_runs_checkpoint_against_its_record(stopped, tmp_path, reference):
    # a run killed mid-epoch leaves its checkpoint in .lesson9/, unpublished: make one from the stopped run's
    work = stopped/'.lesson9'
    os.link(stopped/'checkpoint.pt', work/'checkpoint.pt')
    good = (work/'checkpoint.pt').read_bytes()
    (work/'checkpoint.pt').unlink(); (work/'checkpoint.pt').write_bytes(good)
    flip(work/'checkpoint.pt', 0.4)
    refused(stopped, 'is damaged: its record')
    (work/'checkpoint.pt').write_bytes(good)
    record = json.loads((work/'run.json').read_text())
    (work/'run.json').write_text(json.dumps(dict(record, run_id='0123456789abcdef')))
    refused(stopped, f"is from run {record['run_id']}, but {work/'run.json'} is of run 0123456789abcdef")
    (work/'run.json').unlink()   # no record at all: said, and it carries on from the whole file
    code, _, err = run_main('--resume', '--out', stopped)
    assert code == 0 and 'has no record of its run to check it against; it is whole, carrying on from it' in err, err
    same_run(stopped, reference['constant'])


def test_resume_on_a_folder_that_was_never_a_run_changes_nothing(tmp_path):
    (tmp_path/'notes.txt').write_text('mine')
    refused(tmp_path, f'--resume: no saved run in {tmp_path}')
    (tmp_path/'summary.json').write_text('not json')
    refused(tmp_path, 'summary.json is not valid JSON')
    assert not (tmp_path/'.lesson9').exists()


def test_a_publication_blocked_by_a_folder_changes_no_file(reference, tmp_path):
    assert run_main('--epochs', '1', '--schedule', 'constant', '--out', tmp_path)[0] == 0
    (tmp_path/'loss.png').unlink(); (tmp_path/'loss.png').mkdir()
    before = tree(tmp_path)
    code, _, err = run_main(*EPOCHS, '--schedule', 'constant', '--out', tmp_path)
    assert code == 1 and err.count('\n') == 1, err
    assert f'a folder is in the way of the output loss.png' in err and 'the previous outputs there are unchanged' in err, err
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith('.lesson9')} == {k: v for k, v in before.items() if not k.startswith('.lesson9')}
    (tmp_path/'loss.png').rmdir()
    code, _, err = run_main('--resume', '--out', tmp_path)
    assert code == 0, err
    same_run(tmp_path, reference['constant'])


def test_a_finite_blow_up_is_divergence_and_the_ratio_can_be_set(tmp_path):
    code, _, err = run_main('--lr', '1e6', '--schedule', 'constant', '--epochs', '1', '--out', tmp_path/'a')
    assert code == 3 and 'more than 10 times the first training loss' in err and err.count('\n') == 1, err
    assert outputs(tmp_path/'a')['status'] == 'diverged'
    code, _, err = run_main('--lr', '1e6', '--schedule', 'constant', '--epochs', '1', '--max-loss-ratio', 'off', '--out', tmp_path/'b')
    assert code == 0, err   # off: only a loss that is not a number stops it
    s = outputs(tmp_path/'b')
    assert s['config']['max_loss_ratio'] == 'off' and s['final']['train_loss'] > 1e6
    code, out, err = run_main('--evaluate', '--out', tmp_path/'a')
    assert code == 0 and out.strip().endswith(f"({tmp_path/'a'/'model.pt'}, a run that diverged: the weights where it stopped)"), out


@pytest.mark.parametrize('x,y,message', [
    (np_x := None, 'float', 'labels y must be integers (class numbers), got dtype float64'),
    (None, 'negative', 'labels y must be >= 0, got -1 at row 0'),
    (None, 'column', 'y must hold one label per image, shape (n,)'),
    (None, 'str', 'labels y must be integers (class numbers), got dtype <U'),
    ('nan', None, 'pixels x must be finite numbers; image 2 holds NaN or inf'),
])
def test_bad_data_is_refused_before_any_work(tmp_path, x, y, message):
    import numpy as np
    xs, ys = np.full((40, 784), 0.5), np.arange(40) % 10
    if x == 'nan': xs[2, 5] = np.nan
    ys = {'float': ys + 0.0, 'negative': ys - 1, 'column': ys[:, None], 'str': ys.astype(str), None: ys}[y]
    np.savez(tmp_path/'d.npz', x=xs, y=ys)
    (tmp_path/'out').mkdir()
    r = subprocess.run([sys.executable, '-m', 'lesson9', '--data', str(tmp_path/'d.npz'), '--out', str(tmp_path/'out')],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert list((tmp_path/'out').iterdir()) == []   # no lock, no .lesson9 left behind


def test_a_full_disk_while_saving_a_checkpoint_is_named(tmp_path, monkeypatch):
    real, saves = lesson9.checkpoint.atomic_write, []
    def write(path, fn):
        if Path(path).name == 'checkpoint.pt':
            saves.append(path)
            if len(saves) == 2: raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real(path, fn)
    monkeypatch.setattr(lesson9.checkpoint, 'atomic_write', write)
    code, _, err = run_main('--epochs', '3', '--schedule', 'constant', '--out', tmp_path)
    assert code == 1 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert 'the disk is full (No space left on device): files saved before are kept whole' in err, err
    assert err.strip().endswith(f'carry on with: lesson9-train --resume --out {tmp_path}'), err   # epoch 1's checkpoint is there


def test_a_second_signal_before_any_epoch_ended_says_nothing_was_saved(tmp_path, monkeypatch):
    real = Runner.one_batch
    def one_batch(self, xb, yb):
        if (self.epoch, self.in_train, self.iter) == (0, True, 5): os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)
        return real(self, xb, yb)
    monkeypatch.setattr(Runner, 'one_batch', one_batch)
    code, _, err = run_main(*EPOCHS, '--out', tmp_path)
    assert code == 143 and err == ("lesson9-train: error: stopped at once by a second SIGTERM, before the first epoch ended: "
                                   "nothing was saved to carry on from\n"), err
    monkeypatch.undo()
    refused(tmp_path, '--resume: no saved run in')


def test_ctrl_c_while_starting_up_is_one_line(monkeypatch):
    def interrupted(): raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'make_parser', interrupted)
    code, out, err = run_main('--epochs', '1')
    assert code == 130 and err == "lesson9-train: error: stopped by SIGINT before training started; nothing was saved\n", err


@pytest.mark.parametrize('argv', [['--epochs', '0'], ['--data', 'Embedded']])
def test_under_torchrun_only_process_0_prints_an_error(tmp_path, argv):
    for rank, lines in (('1', 0), ('0', 1)):
        r = subprocess.run([sys.executable, '-m', 'lesson9', *argv, '--out', str(tmp_path/'o')], capture_output=True, text=True,
                           env=dict(ENV, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE='2'))   # as torchrun sets them
        assert r.returncode == 2 and r.stderr.count('\n') == lines, (rank, r.stderr)


def test_the_summary_says_which_path_fast_took(tmp_path, monkeypatch):
    import lesson9.fast
    monkeypatch.setattr(lesson9.fast, 'why_not_fast', lambda cbs, learn: 'a reason given here')
    code, _, err = run_main('--epochs', '1', '--fast', '--out', tmp_path)
    assert code == 0, err
    s = outputs(tmp_path)
    assert s['config']['fast'] is True and s['fast_path'] == 'eager: a reason given here', s['fast_path']
    assert 'lesson9-train: note: --fast ran the batches eagerly: a reason given here' in err, err
    assert run_main('--epochs', '1', '--out', tmp_path)[0] == 0 and outputs(tmp_path)['fast_path'] is None
