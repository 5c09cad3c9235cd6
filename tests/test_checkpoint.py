"""lesson9.checkpoint as the package ships it: exact resume from any batch boundary, stop on request, the divergence
check, and the run folder's one-set publishing."""
import contextlib, copy, errno, json, math, os, shutil
from pathlib import Path

import pytest
import torch

import lesson9.checkpoint as ck
from lesson9.anneal import Recorder, lr_find, one_cycle
from lesson9.callbacks import AvgStatsCallback, Callback, CancelTrain, DataBunch, GradientAccumulation, Learner, Runner
from lesson9.checkpoint import (Checkpoint, CheckpointError, DivergenceCallback, RunFolder, RunFolderBusy, TrainingDiverged,
                                load_checkpoint, read_checkpoint, save_checkpoint, sha256sum, strict_json)
from lesson9.data import get_data
from lesson9.training import SGD, Dataset, accuracy, cross_entropy, get_dls, get_mlp

x_train, y_train, x_valid, y_valid = get_data()
x_train, y_train, x_valid, y_valid = x_train[:600], y_train[:600], x_valid[:200], y_valid[:200]


@pytest.fixture(autouse=True)
def _one_thread(one_thread): pass


def make_learner(seed=0, loader_seed=0, lr=0.3, num_workers=0):
    torch.manual_seed(seed)
    data = DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), 64, seed=loader_seed, num_workers=num_workers), c=10)
    model = get_mlp(784, 50, 10)
    return Learner(model, SGD(model.parameters(), lr=lr, momentum=0.9), cross_entropy, data)


def make_runner(schedule, *cbs, accumulate=False):
    return Runner([AvgStatsCallback([accuracy], report=None), Recorder(), DivergenceCallback(), *cbs]
                  + (one_cycle(0.3) if schedule == 'one_cycle' else []) + ([GradientAccumulation(3)] if accumulate else []))


class StopAt(Callback):
    _order = 20
    def __init__(self, ckpt, epoch, in_train=True, it=None): self.ckpt, self.at = ckpt, (epoch, in_train, it)
    def after_batch(self):
        if (self.epoch, self.in_train, self.iter) == self.at: self.ckpt.request_stop('test')
    def after_epoch(self):
        if self.at == (self.epoch, True, None): self.ckpt.request_stop('test')


def outcome(run, learn):
    return dict(weights=[p.detach().clone() for p in learn.model.parameters()], history=run.avg_stats.history,
                losses=run.recorder.losses, lrs=run.recorder.lrs, counters=(run.n_iter, run.n_epochs, run.pos))


def assert_same(a, b):
    for k in ('history', 'losses', 'lrs', 'counters'): assert a[k] == b[k], k
    assert all(torch.equal(p, q) for p, q in zip(a['weights'], b['weights']))


@pytest.mark.parametrize('schedule,loader_seed,accumulate,num_workers', [
    ('constant', 0, False, 0), ('one_cycle', None, False, 0), ('one_cycle', 0, True, 0), ('constant', 0, False, 2)])
def test_stopped_anywhere_and_carried_on_equals_the_run_that_never_stopped(tmp_path, schedule, loader_seed, accumulate, num_workers):
    torch.manual_seed(1)
    learn = make_learner(loader_seed=loader_seed, num_workers=num_workers)
    run = make_runner(schedule, accumulate=accumulate); run.fit(3, learn)
    whole = outcome(run, learn)
    for at in [(0, True, 1), (1, True, 9), (1, False, 0), (2, False, 1), (0, True, None)]:
        ckpt = Checkpoint(tmp_path/'ck.pt')
        torch.manual_seed(1)
        run = make_runner(schedule, StopAt(ckpt, *at), ckpt, accumulate=accumulate)
        run.fit(3, make_learner(loader_seed=loader_seed, num_workers=num_workers))
        assert ckpt.stopped_at is not None
        torch.manual_seed(99)
        again = make_learner(seed=5, loader_seed=None if loader_seed is None else 42, num_workers=num_workers)
        state, extra = load_checkpoint(tmp_path/'ck.pt', again)
        run2 = make_runner(schedule, accumulate=accumulate); run2.fit(3, again, resume=state)
        assert_same(outcome(run2, again), whole)


def test_checkpoint_saves_every_epoch_and_loads_safely(tmp_path):
    run = make_runner('constant', Checkpoint(tmp_path/'ck.pt', extra={'note': 'hi'}))
    run.fit(2, make_learner())
    state = torch.load(tmp_path/'ck.pt', weights_only=True)
    assert state['runner']['epoch'] == 2 and state['extra'] == {'note': 'hi'} and state['format'] == ck.CHECKPOINT_FORMAT
    assert all(not v.is_cuda for v in state['model'].values())
    with pytest.raises(CheckpointError, match='no checkpoint at'): read_checkpoint(tmp_path/'nope.pt')
    (tmp_path/'bad.pt').write_bytes(b'junk')
    with pytest.raises(CheckpointError, match='bad.pt is not a readable checkpoint'): read_checkpoint(tmp_path/'bad.pt')
    torch.save({'format': 99}, tmp_path/'old.pt')
    with pytest.raises(CheckpointError, match='not a lesson9 checkpoint of format 1'): read_checkpoint(tmp_path/'old.pt')
    other = make_learner(); other.data = DataBunch(*get_dls(Dataset(x_train[:100], y_train[:100]), Dataset(x_valid, y_valid), 64, seed=0), c=10)
    with pytest.raises(CheckpointError, match='does not fit this learner'): load_checkpoint(tmp_path/'ck.pt', other)
    with pytest.raises(ValueError, match='every=0'): Checkpoint(tmp_path/'x.pt', every=0)


def test_checkpoint_every_k_epochs(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(ck, 'save_checkpoint', lambda path, run, extra=None: saved.append(run.epoch) or {'runner': run.state_dict()})
    make_runner('constant', Checkpoint(tmp_path/'ck.pt', every=2)).fit(5, make_learner())
    assert saved == [1, 3, 4]   # after epochs 2 and 4, and the last


def test_divergence_named_at_its_batch_and_checked_without_a_sync_per_batch(monkeypatch):
    run = make_runner('constant')
    with pytest.raises(TrainingDiverged, match=r'at epoch 1, batch 2 of 10 \(training batch 2 of the fit\)'): run.fit(2, make_learner(lr=1e38))
    syncs = []
    real = ck.DivergenceCallback._check
    monkeypatch.setattr(ck.DivergenceCallback, '_check', lambda self: syncs.append(1) or real(self))
    make_runner('constant').fit(2, make_learner())
    assert len(syncs) == 2                      # once per epoch, not once per batch
    run = Runner([DivergenceCallback(every=3), Recorder()])
    with pytest.raises(TrainingDiverged, match='batch 2 of 10'): run.fit(2, make_learner(lr=1e38))
    assert len(run.recorder.losses) == 3
    with pytest.raises(ValueError, match='every=0'): DivergenceCallback(every=0)
    for bad in (1, 0.5, True, math.inf, '10'):
        with pytest.raises(ValueError, match=f"max_ratio must be None or a finite number > 1, got max_ratio={bad!r}"): DivergenceCallback(max_ratio=bad)
    DivergenceCallback(max_ratio=1.01)


def test_divergence_check_carries_unchecked_losses_over_a_resume(tmp_path):
    # the loss goes bad in the middle of epoch 1; the run is stopped after it and carried on: the check still catches it
    class Poison(Callback):
        _order = -1
        def after_pred(self):
            if self.in_train and self.n_iter == 3: self.run.pred = self.run.pred * math.inf
    ckpt = Checkpoint(tmp_path/'ck.pt')
    Runner([AvgStatsCallback([accuracy], report=None), Recorder(), DivergenceCallback(), Poison(), StopAt(ckpt, 0, True, 5), ckpt]).fit(2, make_learner())
    again = make_learner()
    state, _ = load_checkpoint(tmp_path/'ck.pt', again)
    with pytest.raises(TrainingDiverged, match='batch 4 of 10'):
        Runner([AvgStatsCallback([accuracy], report=None), Recorder(), DivergenceCallback()]).fit(2, again, resume=state)


def test_strict_json():
    assert json.loads(strict_json({'a': math.nan, 'b': [math.inf, -math.inf, 1.5], 'c': 'x'})) == {'a': None, 'b': [None, None, 1.5], 'c': 'x'}
    assert 'NaN' not in strict_json([math.nan])


def _set(folder):
    s = folder.summary()
    names = sorted(p.name for p in folder.path.iterdir() if not p.name.startswith('.'))
    assert names == sorted(list(s['files']) + ['summary.json'])
    for n, sha in s['files'].items(): assert sha256sum(folder.path/n) == sha
    assert not [p for p in folder.work.iterdir() if p.name.startswith('publish')]
    return s


def test_run_folder_publishes_all_or_nothing(tmp_path):
    with RunFolder(tmp_path/'r') as f:
        f.publish({'a': b'1', 'b': b'1'}, {'run': 1})
        def broken(fh): fh.write(b'half'); raise OSError(errno.ENOSPC, 'No space left on device')
        with pytest.raises(OSError, match='No space'): f.publish({'a': b'2', 'c': broken}, {'run': 2})
        assert _set(f)['run'] == 1 and (f.path/'a').read_bytes() == b'1'
        with pytest.raises(ZeroDivisionError): f.publish({'a': lambda fh: 1/0}, {'run': 2})
        assert _set(f)['run'] == 1
        src = f.work/'big.bin'; src.write_bytes(b'moved')
        f.publish({'a': b'3', 'big.bin': src}, {'run': 3})
        s = _set(f)
        assert s['run'] == 3 and not (f.path/'b').exists() and (f.path/'big.bin').read_bytes() == b'moved'
        for bad in ('../x', '.hidden', 'summary.json'):
            with pytest.raises(ValueError): f.publish({bad: b''}, {})
        with pytest.raises(RunFolderBusy, match=f'pid {os.getpid()}'): RunFolder(tmp_path/'r').open()
    RunFolder(tmp_path/'r').open().close()


def _killed_after(monkeypatch, n):
    "`os.replace` that stops, like a killed process, after `n` renames of a published set (the journal's not counted)."
    real, calls = os.replace, []
    def replace(src, dst):
        if Path(dst).name != 'publish.json':
            if len(calls) == n: raise KeyboardInterrupt('killed')
            calls.append(dst)
        real(src, dst)
    monkeypatch.setattr(os, 'replace', replace)


@pytest.mark.parametrize('n', [0, 1, 2, 3, 4])  # a aside, a in, b in, summary.json aside (the 5th puts it in)
def test_run_folder_finishes_a_publication_killed_after_any_rename(tmp_path, monkeypatch, n):
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'old': b'1'}, {'run': 1})
    with RunFolder(tmp_path) as f:
        _killed_after(monkeypatch, n)
        with pytest.raises(KeyboardInterrupt): f.publish({'a': b'2', 'b': b'2'}, {'run': 2})
        monkeypatch.undo()
    assert (tmp_path/'.lesson9'/'publish.json').exists()
    with RunFolder(tmp_path) as f:
        s = _set(f)
        assert s['run'] == 2 and (tmp_path/'a').read_bytes() == (tmp_path/'b').read_bytes() == b'2' and not (tmp_path/'old').exists()
    assert not (tmp_path/'.lesson9'/'publish.json').exists() and not list((tmp_path/'.lesson9').glob('publish-*'))


@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_run_folder_puts_the_previous_set_back_when_an_unfinished_one_lost_a_file(tmp_path, monkeypatch, n):
    "Recovery never deletes what the manifest in place lists: here `checkpoint.pt`, which the unfinished set drops."
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'checkpoint.pt': b'state'}, {'run': 1})
    with RunFolder(tmp_path) as f:
        _killed_after(monkeypatch, n)
        with pytest.raises(KeyboardInterrupt): f.publish({'a': b'2', 'b': b'2'}, {'run': 2})
        monkeypatch.undo()
    stage = tmp_path/'.lesson9'/json.loads((tmp_path/'.lesson9'/'publish.json').read_text())['stage']
    (stage/'new'/'b').unlink(missing_ok=True); (stage/'new'/'summary.json').unlink(missing_ok=True)  # the new set is no longer whole
    with RunFolder(tmp_path) as f:
        assert _set(f)['run'] == 1 and (tmp_path/'a').read_bytes() == b'1' and (tmp_path/'checkpoint.pt').read_bytes() == b'state'


def test_run_folder_finishes_a_publication_killed_after_its_manifest_went_in(tmp_path, monkeypatch):
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'old': b'1'}, {'run': 1})
    with RunFolder(tmp_path) as f:
        def killed(self, j): raise KeyboardInterrupt('killed')
        monkeypatch.setattr(RunFolder, '_commit', killed)   # every file moved in, the manifest too; the old set not yet cleared
        with pytest.raises(KeyboardInterrupt): f.publish({'a': b'2', 'b': b'2'}, {'run': 2})
        monkeypatch.undo()
    assert (tmp_path/'.lesson9'/'publish.json').exists()
    with RunFolder(tmp_path) as f:
        assert _set(f)['run'] == 2 and (tmp_path/'a').read_bytes() == b'2' and not (tmp_path/'old').exists()


@pytest.mark.parametrize('n', [1, 2])
def test_run_folder_undoing_a_publication_keeps_a_file_both_sets_share(tmp_path, monkeypatch, n):
    "`b` is the same in both sets and was not moved yet: undoing the unfinished set must not take it for a new file."
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'b': b'same'}, {'run': 1})
    with RunFolder(tmp_path) as f:
        _killed_after(monkeypatch, n)
        with pytest.raises(KeyboardInterrupt): f.publish({'a': b'2', 'b': b'same', 'c': b'2'}, {'run': 2})
        monkeypatch.undo()
    stage = tmp_path/'.lesson9'/json.loads((tmp_path/'.lesson9'/'publish.json').read_text())['stage']
    (stage/'new'/'c').unlink(); (stage/'new'/'summary.json').unlink()  # the new set is no longer whole: it is undone
    with RunFolder(tmp_path) as f:
        assert _set(f)['run'] == 1 and (tmp_path/'a').read_bytes() == b'1' and (tmp_path/'b').read_bytes() == b'same'


def test_run_folder_does_not_finish_a_set_whose_moved_file_changed(tmp_path, monkeypatch):
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'b': b'1'}, {'run': 1})
    with RunFolder(tmp_path) as f:
        _killed_after(monkeypatch, 2)   # a aside, the new a in
        with pytest.raises(KeyboardInterrupt): f.publish({'a': b'2', 'b': b'2'}, {'run': 2})
        monkeypatch.undo()
    (tmp_path/'a').write_bytes(b'changed since')   # the moved-in file is no longer the set's: finishing would publish it
    with RunFolder(tmp_path) as f:
        assert _set(f)['run'] == 1 and (tmp_path/'a').read_bytes() == b'1' and (tmp_path/'b').read_bytes() == b'1'


@pytest.mark.skipif(not Path('/proc/self/fd').is_dir(), reason='names an open file through /proc (Linux)')
def test_run_folder_flushes_every_published_file_to_disk(tmp_path, monkeypatch):
    synced, real = [], os.fsync
    def fsync(fd):
        synced.append(os.readlink(f'/proc/self/fd/{fd}')); real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    with RunFolder(tmp_path) as f: f.publish({'a': b'1', 'b': lambda fh: fh.write(b'2')}, {'run': 1})
    names = {Path(s).name for s in synced}
    assert {'a', 'b', 'summary.json'} <= names and str(tmp_path) in synced, synced   # each file, and the folder after the renames


def test_run_folder_undoes_a_failed_rename_and_refuses_a_folder_in_the_way(tmp_path, monkeypatch):
    with RunFolder(tmp_path) as f:
        f.publish({'a': b'1', 'b': b'1', 'checkpoint.pt': b'state'}, {'run': 1})
        real, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 5: raise PermissionError(errno.EPERM, 'Operation not permitted', str(dst))
            real(src, dst)
        monkeypatch.setattr(os, 'replace', replace)
        with pytest.raises(PermissionError): f.publish({'a': b'2', 'b': b'2'}, {'run': 2})   # drops checkpoint.pt
        monkeypatch.undo()
        assert _set(f)['run'] == 1 and (tmp_path/'a').read_bytes() == b'1' and (tmp_path/'checkpoint.pt').read_bytes() == b'state'
        assert not (tmp_path/'.lesson9'/'publish.json').exists()
        (tmp_path/'b').unlink(); (tmp_path/'b').mkdir()
        with pytest.raises(IsADirectoryError, match='a folder is in the way of the output b'): f.publish({'a': b'3', 'b': b'3'}, {'run': 3})
        assert (tmp_path/'a').read_bytes() == b'1' and f.summary()['run'] == 1 and (tmp_path/'b').is_dir()


def test_run_folder_leaves_a_stage_without_journal_nowhere(tmp_path):
    with RunFolder(tmp_path) as f: f.publish({'a': b'1'}, {'run': 1})
    (tmp_path/'.lesson9'/'publish-crashed').mkdir()  # killed while staging, before its journal
    with RunFolder(tmp_path) as f: assert _set(f)['run'] == 1
    assert not (tmp_path/'.lesson9'/'publish-crashed').exists()


def test_run_folder_close_discard_removes_only_what_its_open_made(tmp_path):
    f = RunFolder(tmp_path/'new').open(); f.close(discard=True)
    assert sorted(p.name for p in (tmp_path/'new').iterdir()) == []
    with RunFolder(tmp_path/'old') as f: f.publish({'a': b'1'}, {'run': 1})
    (tmp_path/'old'/'.lesson9'/'lock').write_bytes(b'12345')   # the pid of the run that held it last
    f = RunFolder(tmp_path/'old').open()
    assert (tmp_path/'old'/'.lesson9'/'lock').read_bytes() == str(os.getpid()).encode()
    f.close(discard=True)
    assert (tmp_path/'old'/'.lesson9'/'lock').read_bytes() == b'12345' and _set(RunFolder(tmp_path/'old'))['run'] == 1


def test_read_checkpoint_refuses_a_damaged_or_partial_file(tmp_path):
    ckpt = Checkpoint(tmp_path/'ck.pt')
    make_runner('constant', ckpt).fit(1, make_learner())
    raw = bytearray((tmp_path/'ck.pt').read_bytes())
    with __import__('zipfile').ZipFile(tmp_path/'ck.pt') as z:   # flip one bit inside the weights' record
        info = max(z.infolist(), key=lambda i: i.file_size)
    pos = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    raw[pos] ^= 1; (tmp_path/'bad.pt').write_bytes(raw)
    with pytest.raises(CheckpointError, match=r'bad.pt is damaged: its record .* no longer matches the checksum'): read_checkpoint(tmp_path/'bad.pt')
    state = read_checkpoint(tmp_path/'ck.pt')
    for key, value in [('runner', None), ('opt', [1, 2]), ('extra', 'x')]:
        broken = dict(state); broken.pop(key) if value is None else broken.__setitem__(key, value)
        torch.save(broken, tmp_path/'partial.pt')
        with pytest.raises(CheckpointError, match=f"partial.pt is not a whole checkpoint: expected dicts for {key}"): read_checkpoint(tmp_path/'partial.pt')


def test_divergence_by_ratio_to_the_first_loss(tmp_path):
    class Inflate(Callback):
        _order = 40
        def after_loss(self):
            if self.in_train and self.n_iter >= 4: self.run.loss = self.run.loss * 50
    with pytest.raises(TrainingDiverged, match=r'at epoch 1, batch 5 of 10 .*more than 10 times the first training loss \(2\.'):
        Runner([Inflate(), DivergenceCallback()]).fit(2, make_learner())
    with pytest.raises(TrainingDiverged, match='batch 5 of 10'):
        Runner([Inflate(), DivergenceCallback(every=1, max_ratio=20)]).fit(2, make_learner())
    Runner([Inflate(), DivergenceCallback(max_ratio=60)]).fit(1, make_learner())   # 50 times is under 60
    Runner([Inflate(), DivergenceCallback(max_ratio=None)]).fit(1, make_learner())
    # the first loss is part of the state: a resumed fit measures against the run's first loss, not its own
    ckpt = Checkpoint(tmp_path/'ck.pt')
    Runner([DivergenceCallback(), ckpt, StopAt(ckpt, 0, True, 1)]).fit(2, make_learner())
    class InflateLate(Callback):
        _order = 40
        def after_loss(self):
            if self.in_train: self.run.loss = self.run.loss * 8   # 8 times: under 10 times its own first, over 10 times the run's
    learn = make_learner(); state, _ = load_checkpoint(tmp_path/'ck.pt', learn)
    state['cbs']['divergence']['start'] = state['cbs']['divergence']['start'] * 0.5
    with pytest.raises(TrainingDiverged, match='more than 10 times'): Runner([InflateLate(), DivergenceCallback(), Checkpoint(tmp_path/'ck2.pt')]).fit(2, learn, resume=state)


def test_lr_find_leaves_loaders_and_random_state_as_they_were():
    def fit_after(find):
        learn = make_learner(loader_seed=None)
        torch.manual_seed(5)
        if find: lr_find(learn, max_iter=12)
        run = make_runner('constant'); run.fit(1, learn)
        return outcome(run, learn)
    assert_same(fit_after(True), fit_after(False))


def test_a_fit_that_raised_leaves_nothing_for_the_next():
    class FailOnce(Callback):
        def after_backward(self):
            if not getattr(self, 'failed', False): self.failed = True; raise RuntimeError('fails once after backward')
    class SeeError(Callback):
        def after_fit(self): self.seen = self.run.error
    learn, see = make_learner(), SeeError()
    run = Runner([FailOnce(), see])
    with pytest.raises(RuntimeError, match='fails once'): run.fit(1, learn)
    assert all(p.grad is None for p in learn.model.parameters())
    assert isinstance(see.seen, RuntimeError) and run.error is None
    run.fit(1, learn)                       # the next fit: the same as a fit of the same weights that never failed
    assert see.seen is None
    fresh = make_learner()
    next(iter(fresh.data.train_dl))         # the failed fit drew its epoch's order: so does this one
    Runner().fit(1, fresh)
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), fresh.model.parameters()))


def _momentum_checkpoint(tmp_path):
    "A checkpoint of a momentum-SGD run stopped inside epoch 2 (shuffled loader with its own generator)."
    ckpt = Checkpoint(tmp_path/'ck.pt')
    make_runner('constant', ckpt, StopAt(ckpt, 1, True, 3)).fit(2, make_learner())
    return read_checkpoint(tmp_path/'ck.pt')


def _put(d, path, value):
    *head, last = path
    for k in head: d = d[k]
    if value is KeyError: del d[last]
    else: d[last] = value


@pytest.mark.parametrize('path,value,message', [
    (('model', '0.weight'), lambda t: t.double(), "model weight '0.weight' is torch.float64 (50, 784), the model's torch.float32 (50, 784)"),
    (('model', '2.bias'), lambda t: t[:5], "model weight '2.bias' is torch.float32 (5,), the model's torch.float32 (10,)"),
    (('model', '2.bias'), KeyError, "the model's keys differ: missing ['2.bias']"),
    (('model', 'extra'), lambda t: torch.zeros(1), "unexpected ['extra']"),
    (('opt', 'state', 7), lambda t: {'momentum_buffer': torch.zeros(3)}, "holds state for parameter 7, which none of its param groups lists"),
    (('opt', 'state', 0, 'momentum_buffer'), lambda t: t[:3], "momentum_buffer of parameter 0 is torch.float32 (3, 784), the parameter torch.float32 (50, 784)"),
    (('loaders', 'train_dl', 'order'), lambda t: t.clone().index_fill_(0, torch.tensor([0]), 600), 'not an order of 600 samples'),
    (('loaders', 'train_dl', 'order'), lambda t: t.float(), 'the saved order must be a 1-d int64 tensor, got torch.float32'),
    (('loaders', 'train_dl', 'generator'), lambda t: 3, 'the saved generator state must be a uint8 tensor, got int'),
    (('rng', 'cpu'), lambda t: t[:10], "the random state is not torch's"),
    (('runner', 'pos'), lambda t: 1.5, 'the saved position pos=1.5 is outside [0, 1]'),
    (('runner', 'iter'), lambda t: 'three', "the saved state's iter must be a number >= 0, got 'three'"),
    (('runner', 'in_train'), lambda t: 1, "the saved state's in_train must be True or False, got 1"),
    (('runner', 'cbs'), KeyError, "missing ['cbs']"),
])
def test_a_checkpoint_is_checked_as_data_before_it_is_loaded(tmp_path, path, value, message):
    state = _momentum_checkpoint(tmp_path)
    old = state
    for k in path[:-1]: old = old[k]
    _put(state, path, value if value is KeyError else value(old.get(path[-1]) if isinstance(old, dict) else None))
    torch.save(state, tmp_path/'bad.pt')
    learn = make_learner(seed=5)
    Runner([]).fit(1, learn)   # momentum buffers and a loader order of its own, to be kept
    before = [p.detach().clone() for p in learn.model.parameters()], learn.opt.state_dict(), ck._loader_states(learn.data)
    before = __import__('copy').deepcopy(before)
    with pytest.raises(CheckpointError, match='bad.pt does not fit this learner: .*' + __import__('re').escape(message)):
        load_checkpoint(tmp_path/'bad.pt', learn)
    weights, opt, loaders = before   # a checkpoint that does not fit changes nothing
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), weights))
    now = learn.opt.state_dict()
    assert [{k: v for k, v in g.items() if k != 'params'} for g in now['param_groups']] == [{k: v for k, v in g.items() if k != 'params'} for g in opt['param_groups']]
    assert all(torch.equal(now['state'][i]['momentum_buffer'], s['momentum_buffer']) for i, s in opt['state'].items())
    for k, sd in ck._loader_states(learn.data).items():
        assert torch.equal(sd['order'], loaders[k]['order']) and torch.equal(sd['generator'], loaders[k]['generator'])


def test_the_loop_checker_carries_on_across_a_resume(tmp_path):
    from lesson9.callbacks import InvariantsCallback
    ckpt = Checkpoint(tmp_path/'ck.pt')
    Runner([InvariantsCallback(), AvgStatsCallback([accuracy], report=None), ckpt, StopAt(ckpt, 1, True, 3)]).fit(3, make_learner())
    learn = make_learner(seed=4)
    state, _ = load_checkpoint(tmp_path/'ck.pt', learn)
    assert state['cbs']['invariants'] == {'n_train': 14}
    run = Runner([InvariantsCallback(), AvgStatsCallback([accuracy], report=None)]); run.fit(3, learn, resume=state)
    assert run.n_iter == 30


def test_accuracy_as_a_count_refuses_targets_of_another_shape():
    from lesson9.callbacks import AvgStats, n_correct
    out, y = torch.randn(8, 10), torch.arange(8)
    one_hot = torch.eye(10)[y].long()
    for f in (lambda: n_correct(out, one_hot), lambda: AvgStats([accuracy], True).accumulate(torch.tensor(1.), out, one_hot)):
        with pytest.raises(ValueError, match=r'target must hold one label per row of out: expected shape \(8,\), got \(8, 10\)'): f()
    assert n_correct(out, y) == (out.argmax(1) == y).sum()


class _Planted:
    "Unpickled, it would create the file `path`: what a crafted checkpoint could run if the loader unpickled anything."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (open, (self.path, 'w'))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    planted = tmp_path/'ran'
    state = {'format': 1, 'model': {'w': _Planted(str(planted))}, 'opt': {}, 'runner': {}, 'loaders': {}, 'rng': {}, 'extra': {}}
    torch.save(state, tmp_path/'crafted.pt')  # a well-formed zip: only the unpickling can refuse it
    with pytest.raises(CheckpointError, match=r'crafted.pt is not a readable checkpoint: UnpicklingError'):
        read_checkpoint(tmp_path/'crafted.pt')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'): load_checkpoint(tmp_path/'crafted.pt', make_learner())
    assert not planted.exists()


def test_validation_losses_never_count_as_divergence():
    "The check reads training losses only: a validation loss 1000 times the first training loss is a bad model, not a diverged run."
    learn = make_learner()
    base = learn.loss_func
    learn.loss_func = lambda pred, yb: base(pred, yb) * (1 if learn.model.training else 1000)
    run = Runner([AvgStatsCallback([], report=None), DivergenceCallback(every=1)])
    run.fit(2, learn)
    assert run.avg_stats.history[-1]['valid_loss'] > 100 * run.avg_stats.history[-1]['train_loss']


class _Wrapped(torch.nn.Module):
    "A model inside a wrapper that keeps it as `.module`, as DistributedDataParallel does."
    def __init__(self, module): super().__init__(); self.module = module
    def forward(self, x): return self.module(x)


def test_training_state_is_a_copy_of_the_inner_model_on_the_cpu():
    learn = make_learner()
    states = []
    class Grab(Callback):
        def after_epoch(self): states.append(ck.training_state(self.run))
    learn.model = _Wrapped(learn.model)
    Runner([Grab()]).fit(2, learn)
    inner = learn.model.module.state_dict()
    assert list(states[0]['model']) == list(inner)            # the model's own keys, not 'module.0.weight'
    assert all(torch.equal(states[1]['model'][k], v) for k, v in inner.items())
    assert not any(torch.equal(states[0]['model'][k], v) for k, v in inner.items() if k.endswith('weight'))  # epoch 2 moved them: a copy
    assert all(t.data_ptr() != v.data_ptr() for t, v in zip(states[1]['model'].values(), inner.values()))


def test_a_checkpoint_with_other_loaders_does_not_fit(tmp_path):
    ckpt = Checkpoint(tmp_path/'ck.pt')
    Runner([ckpt]).fit(1, make_learner())
    learn = make_learner()
    learn.data.valid_dl = torch.utils.data.DataLoader(Dataset(x_valid, y_valid), 128)  # torch's loader keeps no state
    with pytest.raises(CheckpointError, match=r"ck.pt does not fit this learner: the checkpoint has loader states for \['train_dl', 'valid_dl'\], this learner's loaders \['train_dl'\]"):
        load_checkpoint(tmp_path/'ck.pt', learn)


class _SaveAt(Callback):
    "Keeps `run.state_dict()` at one batch (epoch, in_train, iter) and stops the fit there, as a signal would."
    _order = 200
    def __init__(self, at): self.at, self.state = at, None
    def after_batch(self):
        if (self.epoch, self.in_train, self.iter) == self.at:
            self.state = self.run.state_dict(); raise CancelTrain()


def test_resume_refuses_another_fit_or_other_callbacks_and_leaves_the_state_as_it_was():
    save, learn = _SaveAt((0, True, 3)), make_learner()
    Runner([AvgStatsCallback([accuracy], report=None), save]).fit(2, learn)
    state = save.state
    with pytest.raises(ValueError, match='the saved run is a fit of 2 epochs, not 3: resume it with epochs=2'):
        Runner([AvgStatsCallback([accuracy], report=None)]).fit(3, make_learner(), resume=state)
    with pytest.raises(ValueError, match=r"the saved state is for callbacks with state \['avg_stats'\], but this runner's are \['avg_stats', 'recorder'\]"):
        Runner([AvgStatsCallback([accuracy], report=None), Recorder()]).fit(2, make_learner(), resume=state)
    kept = copy.deepcopy(state)
    Runner([AvgStatsCallback([accuracy], report=None)]).fit(2, learn, resume=state)   # the learner as the stop left it
    saved, now = kept['cbs']['avg_stats']['train'], state['cbs']['avg_stats']['train']
    assert saved['count'] == now['count'] and all(torch.equal(a, b) for a, b in zip(saved['sums'], now['sums']))  # a resumed fit adds to copies


def test_two_callbacks_with_state_under_one_name_are_refused():
    class Twin(AvgStatsCallback): name = 'avg_stats'
    save = _SaveAt((0, True, 0))
    with pytest.raises(ValueError, match="two callbacks named 'avg_stats' hold state: rename one"):
        Runner([AvgStatsCallback([accuracy], report=None), Twin([accuracy], report=None), save]).fit(1, make_learner())


def test_a_phase_saved_complete_is_not_run_again_even_by_a_loader_that_cannot_continue():
    "Saved after the last training batch: the resumed epoch goes straight to validation, with any loader (torch's too)."
    def learner():
        learn = make_learner()
        learn.data.train_dl = torch.utils.data.DataLoader(Dataset(x_train, y_train), 64)  # no iter_from: it cannot continue an epoch
        return learn
    n = len(learner().data.train_dl)
    save = _SaveAt((0, True, n - 1))
    Runner([save]).fit(1, learner())
    class Count(Callback):
        seen = []
        def after_batch(self): self.seen.append(self.in_train)
    Runner([Count()]).fit(1, learner(), resume=save.state)
    assert Count.seen == [False] * len(make_learner().data.valid_dl)


def test_a_saved_state_is_a_snapshot_that_later_batches_do_not_change():
    "A state kept in memory (not only one written to a file) must not follow the training it was taken from."
    class Keep(Callback):
        _order = 200
        def after_batch(self):
            if (self.epoch, self.in_train, self.iter) == (0, True, 1):   # inside an accumulation window of 3
                self.state = self.run.state_dict(); self.copy = copy.deepcopy(self.state)
    keep = Keep()
    Runner([AvgStatsCallback([accuracy], report=None), GradientAccumulation(3), keep]).fit(1, make_learner())
    window, at_save = keep.state['cbs']['gradient_accumulation'], keep.copy['cbs']['gradient_accumulation']
    assert any(g is not None for g in at_save['grads'])
    assert all(torch.equal(a, b) for a, b in zip(window['grads'], at_save['grads']) if b is not None)
    train, train_at_save = keep.state['cbs']['avg_stats']['train'], keep.copy['cbs']['avg_stats']['train']
    assert all(torch.equal(a, b) for a, b in zip(train['sums'], train_at_save['sums']))


def _same_opt(a, b):
    "Two optimizer `state_dict()`s equal: every hyper-parameter of every param group, and every state tensor bit for bit."
    assert a['param_groups'] == b['param_groups'], (a['param_groups'], b['param_groups'])
    assert a['state'].keys() == b['state'].keys()
    for k in a['state']:
        sa, sb = a['state'][k], b['state'][k]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) if torch.is_tensor(sa[n]) else sa[n] == sb[n] for n in sa), k


@pytest.mark.parametrize('schedule', ['one_cycle', 'wd_and_betas'])
def test_a_resumed_fit_leaves_the_optimizer_as_the_fit_that_never_stopped(tmp_path, schedule):
    "Stopped anywhere, inside the last epoch too or after it, a resumed fit ends with the same param groups and state."
    from lesson9.anneal import ParamScheduler, sched_cos, sched_lin
    if schedule == 'one_cycle':  # lr and momentum of our SGD (lr 0.3/25 at pos 0, 0.3/1e4 at pos 1)
        def learner(seed=0): return make_learner(seed=seed)
        def scheds(): return one_cycle(0.3)
    else:  # torch's Adam: lr, momentum as betas[0], and weight decay, none of them ending where it starts
        def learner(seed=0):
            learn = make_learner(seed=seed)
            learn.opt = torch.optim.Adam(learn.model.parameters(), lr=1e-3, weight_decay=0.)
            return learn
        def scheds(): return [ParamScheduler('lr', sched_cos(1e-3, 1e-5)), ParamScheduler('momentum', sched_lin(0.95, 0.85)),
                              ParamScheduler('weight_decay', sched_lin(0., 1e-4))]
    def runner(*cbs): return Runner([AvgStatsCallback([accuracy], report=None), Recorder(), *scheds(), *cbs])
    torch.manual_seed(1)
    learn = learner(); runner().fit(3, learn)
    whole = learn.opt.state_dict()
    # 10 training and 4 validation batches an epoch: stops early, mid-training, in validation, after the last
    # training batch, inside the last validation, and after the last epoch
    for at in [(0, True, 1), (1, True, 9), (1, False, 0), (2, True, 8), (2, True, 9), (2, False, 1), (2, True, None)]:
        ckpt = Checkpoint(tmp_path/'ck.pt')
        torch.manual_seed(1)
        runner(StopAt(ckpt, *at), ckpt).fit(3, learner())
        assert ckpt.stopped_at is not None, at
        torch.manual_seed(99)
        again = learner(seed=5)
        state, _ = load_checkpoint(tmp_path/'ck.pt', again)
        runner().fit(3, again, resume=state)
        _same_opt(again.opt.state_dict(), whole)
