"""lesson9.callbacks: the Runner's events and cancels, callbacks' safety, weighted stats, devices, gradient accumulation,
and parity with 03's fit."""
import copy, math, pickle, traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesson9.callbacks import (EVENTS, AvgStats, AvgStatsCallback, Callback, CancelBatch, CancelEpoch, CancelTrain,
                               CudaCallback, DataBunch, DeviceCallback, GradientAccumulation, InvariantsCallback, Learner,
                               ProgressCallback, Runner, TrainEvalCallback, as_device, camel2snake, format_stats,
                               get_model, get_runner, listify, print_stats)
from lesson9.training import SGD, DataLoader, Dataset, Optimizer, accuracy, cross_entropy, fit, get_dls

pytestmark = pytest.mark.usefixtures("one_thread")


TRAIN = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']
VALID = ['begin_batch', 'after_pred', 'after_loss', 'after_batch']


def _data(n_train=7, n_valid=4, bs=3, n_in=5, c=3, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_valid, n_in, generator=g), torch.randint(0, c, (n_train + n_valid,), generator=g)
    train, valid = Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:])
    return DataBunch(DataLoader(train, bs, shuffle=shuffle, seed=seed), DataLoader(valid, 2*bs), c=c)


def _learner(data=None, seed=0, opt_func=SGD, lr=0.1, loss_func=cross_entropy, **kw):
    data = data or _data(**kw)
    torch.manual_seed(seed)
    model = nn.Linear(data.train_ds.x.shape[1], data.c)
    return Learner(model, opt_func(model.parameters(), lr=lr), loss_func, data)


class Raise(Callback):
    "Raise `exc` at `event` in epoch `epoch`, phase `train` and batch `it` (None: any)."
    _order = 2000  # after InvariantsCallback, which then records the event being cancelled
    def __init__(self, exc, event, epoch=0, train=True, it=None):
        self.exc, self.where = exc, (epoch, train, it)
        setattr(self, event, self._maybe)
    def _maybe(self):
        epoch, train, it = self.where
        if (epoch, train) == (self.run.epoch, self.run.in_train) and it in (None, self.run.iter): raise self.exc('raised')


def _events(*cbs, epochs=2, learn=None):
    chk = InvariantsCallback()
    Runner([*cbs, chk]).fit(epochs, learn or _learner())
    return chk.events


# ---------------------------------------------------------------- helpers and Callback basics

def test_camel2snake_and_listify():
    assert camel2snake('TrainEvalCallback') == 'train_eval_callback'
    assert camel2snake('AvgStatsCallback') == 'avg_stats_callback'
    assert camel2snake('HTTPServer') == 'http_server'
    assert [listify(None), listify(2), listify('ab'), listify((1, 2)), listify(range(2))] == [[], [2], ['ab'], [1, 2], [0, 1]]
    l = [1]; assert listify(l) is l


def test_callback_names():
    class Foo(Callback): pass
    class BarBazCallback(Callback): pass
    assert [TrainEvalCallback().name, AvgStatsCallback().name, Foo().name, BarBazCallback().name, Callback().name] == \
           ['train_eval', 'avg_stats', 'foo', 'bar_baz', 'callback']


class Settings(Callback):
    def __init__(self, k): self.k = k


@pytest.mark.parametrize('dup', [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_callbacks_copy_and_pickle_without_a_runner(dup):
    c = Settings([1, 2])
    d = dup(c)
    assert type(d) is Settings and d.k == [1, 2] and d.run is None


@pytest.mark.parametrize('dup', [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_copies_of_an_attached_callback_are_detached(dup):
    c = Settings(3); run = Runner(c)
    d = dup(c)
    assert c.run is run and d.run is None and d.k == 3


def test_missing_attribute_is_attribute_error_not_recursion():
    c = Settings(1)
    with pytest.raises(AttributeError, match="Settings has no attribute 'nope' \\(it is not attached to a runner\\)"):
        c.nope
    assert getattr(c, 'nope', 7) == 7 and not hasattr(c, '__setstate__x')
    Runner(c)  # attached: public names are read from the runner, private and dunder names never are
    assert c.in_train is False and c.pos == 0.
    with pytest.raises(AttributeError, match='nope'): c.nope
    with pytest.raises(AttributeError, match='private names are not forwarded'): c._cbs
    with pytest.raises(AttributeError): c.__deepcopy__


def test_callback_reads_the_learner_through_the_runner():
    seen = {}
    class Spy(Callback):
        def begin_fit(self): seen.update(model=self.model, opt=self.opt, data=self.data, epochs=self.epochs)
    learn = _learner()
    Runner(Spy()).fit(3, learn)
    assert seen == dict(model=learn.model, opt=learn.opt, data=learn.data, epochs=3)


# ---------------------------------------------------------------- events and dispatch

def test_events_are_the_lessons_plus_cancels():
    assert EVENTS[:11] == ('begin_fit', 'begin_epoch', 'begin_batch', 'after_pred', 'after_loss', 'after_backward',
                           'after_step', 'after_batch', 'begin_validate', 'after_epoch', 'after_fit')
    assert set(EVENTS[11:]) == {'after_cancel_batch', 'after_cancel_epoch', 'after_cancel_train'}


def test_normal_run_event_sequence():
    epoch = ['begin_epoch'] + 3*TRAIN + ['begin_validate'] + VALID + ['after_epoch']
    see = SeeError(); see.error = 'unset'
    assert _events(see) == ['begin_fit'] + 2*epoch + ['after_fit']
    assert see.error is None


def test_every_callback_sees_every_event_in_order():
    log = []
    class Log(Callback):
        def __init__(self, order, tag): self._order, self.tag = order, tag
    for e in EVENTS:  # one method per event, on a subclass
        setattr(Log, e, lambda self, e=e: log.append((e, self.tag)))
    cbs = [Log(1, 'b'), Log(-5, 'a'), Log(1, 'c'), Log(9, 'd')]
    Runner(cbs).fit(1, _learner())
    by_event = {}
    for e, tag in log: by_event.setdefault(e, []).append(tag)
    n_batches = 3 + 1
    for e in ('begin_fit', 'begin_epoch', 'begin_validate', 'after_epoch', 'after_fit'):
        assert by_event[e] == list('abcd'), e  # _order, ties in the order given
    assert by_event['begin_batch'] == list('abcd') * n_batches
    assert by_event['after_step'] == list('abcd') * 3


def test_returning_false_or_none_is_fine_true_is_an_error():
    class Ok(Callback):
        def begin_batch(self): return False
        def after_batch(self): return 0
    Runner(Ok()).fit(1, _learner())
    class Lesson(Callback):
        def after_step(self): return True
    with pytest.raises(TypeError, match='Lesson.after_step returned True.*raise CancelBatch'):
        Runner(Lesson()).fit(1, _learner())


@pytest.mark.parametrize('name, hint', [('begin_bacth', "did you mean 'begin_batch'"), ('after_setp', "did you mean 'after_step'"),
                                        ('before_batch', "'before_batch' is not an event"), ('after_everything', 'is not an event'),
                                        ('beginfit', "did you mean 'begin_fit'")])
def test_misspelt_event_methods_are_reported_when_added(name, hint):
    Typo = type('Typo', (Callback,), {name: lambda self: None})
    with pytest.raises(ValueError, match=hint):
        Runner(Typo())
    run = Runner()
    with pytest.raises(ValueError, match=f'Typo.{name} looks like an event handler'):
        run.add_cbs(Typo())


def test_misspelt_instance_method_is_reported_at_fit():
    c = Settings(1); run = Runner(c)
    c.after_bacth = lambda: None
    with pytest.raises(ValueError, match="did you mean 'after_batch'"):
        run.fit(1, _learner())


def test_non_event_helpers_and_attributes_are_allowed():
    calls = []
    class Fine(Callback):
        def __init__(self): self.on_batch, self.report, self.history = calls.append, calls.append, []
        def reset(self): calls.append('reset')
        def accumulate(self): calls.append('accumulate')
        def after_batch(self): calls.append('after_batch')
    run = Runner(Fine())
    assert run.fine.run is run and run.cbs[-1] is run.fine
    run.fit(1, _learner())
    assert calls == ['after_batch'] * 4  # only the event ran; helpers and attributes are never fired as events


def test_unknown_event_fired_by_name():
    with pytest.raises(ValueError, match="unknown event 'after_bach'; did you mean 'after_batch'"):
        Runner()('after_bach')


def test_bad_callbacks_and_arguments():
    with pytest.raises(TypeError, match='got 3'): Runner(3)
    class ModelCallback(Callback): pass
    with pytest.raises(ValueError, match="name 'model' would hide"): Runner(ModelCallback())
    class Loss(Callback): pass
    with pytest.raises(ValueError, match="name 'loss' would hide"): Runner(Loss())
    for bad in (-1, 1.5, True, '2'):
        with pytest.raises(ValueError, match=f'got {bad!r}'): Runner().fit(bad, _learner())
    with pytest.raises(TypeError, match='lacks'): Runner().fit(1, object())
    for k, what in (('train_dl', r'the training data loader \(train_dl\) is empty: it has no batch to run'),
                    ('valid_dl', r'the validation data loader \(valid_dl\) is empty')):
        learn = _learner()
        empty = torch.utils.data.TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))   # ours refuses an empty Dataset
        setattr(learn.data, k, torch.utils.data.DataLoader(empty, batch_size=4))
        with pytest.raises(ValueError, match=what): Runner().fit(1, learn)
        Runner().fit(0, learn)   # no epoch: nothing to run, nothing refused


def test_cbs_cb_funcs_add_and_remove():
    run = Runner(cbs=Settings(1), cb_funcs=[lambda: Settings(2), lambda: AvgStatsCallback(report=None)])
    assert [type(c) for c in run.cbs] == [TrainEvalCallback, Settings, Settings, AvgStatsCallback]
    assert run.settings.k == 2 and isinstance(run.avg_stats, AvgStatsCallback)
    ticks = []
    p = ProgressCallback(lambda: ticks.append(1))
    run.add_cbs(p); run.fit(1, _learner())
    assert len(ticks) == 3
    run.remove_cbs(p); run.fit(1, _learner())
    assert len(ticks) == 3 and p.run is None and not hasattr(run, 'progress')


def test_a_given_train_eval_callback_is_not_doubled():
    te = TrainEvalCallback()
    assert Runner(te).cbs == [te]


def test_epochs_zero_runs_only_fit_events():
    assert _events(epochs=0) == ['begin_fit', 'after_fit']


def test_no_validation_loader():
    learn = _learner(); learn.data.valid_dl = None
    assert _events(epochs=1, learn=learn) == ['begin_fit', 'begin_epoch'] + 3*TRAIN + ['after_epoch', 'after_fit']


def test_references_are_dropped_after_fit():
    run = Runner(); run.fit(1, _learner())
    assert run.learn is None and run.xb is None and run.loss is None and run.pred is None
    with pytest.raises(AttributeError, match='not fitting'): run.model


# ---------------------------------------------------------------- cancels

EPOCH = ['begin_epoch'] + 3*TRAIN + ['begin_validate'] + VALID + ['after_epoch']

@pytest.mark.parametrize('args, expected', [
    # CancelBatch: after_cancel_batch, after_batch, next batch
    ((CancelBatch, 'begin_batch', 0, True, 0), ['begin_fit', 'begin_epoch', 'begin_batch', 'after_cancel_batch', 'after_batch'] + 2*TRAIN),
    ((CancelBatch, 'after_loss', 0, True, 1), ['begin_fit', 'begin_epoch'] + TRAIN + ['begin_batch', 'after_pred', 'after_loss', 'after_cancel_batch', 'after_batch'] + TRAIN),
    ((CancelBatch, 'after_step', 0, True, 0), ['begin_fit', 'begin_epoch'] + TRAIN[:-1] + ['after_cancel_batch', 'after_batch'] + 2*TRAIN),
    ((CancelBatch, 'after_pred', 0, False, 0), ['begin_fit', 'begin_epoch'] + 3*TRAIN + ['begin_validate', 'begin_batch', 'after_pred', 'after_cancel_batch', 'after_batch', 'after_epoch']),
])
def test_cancel_batch(args, expected):
    if expected[-1] != 'after_epoch': expected = expected + ['begin_validate'] + VALID + ['after_epoch']
    assert _events(Raise(*args)) == expected + EPOCH + ['after_fit']


@pytest.mark.parametrize('args, expected', [
    ((CancelEpoch, 'begin_epoch', 0), ['begin_epoch']),
    ((CancelEpoch, 'after_backward', 0, True, 1), ['begin_epoch'] + TRAIN + ['begin_batch', 'after_pred', 'after_loss', 'after_backward']),
    ((CancelEpoch, 'after_batch', 0, True, 2), ['begin_epoch'] + 3*TRAIN),
    ((CancelEpoch, 'begin_validate', 0, False), ['begin_epoch'] + 3*TRAIN + ['begin_validate']),
    ((CancelEpoch, 'after_loss', 0, False, 0), ['begin_epoch'] + 3*TRAIN + ['begin_validate', 'begin_batch', 'after_pred', 'after_loss']),
])
def test_cancel_epoch_skips_the_rest_of_the_epoch_validation_included(args, expected):
    assert _events(Raise(*args)) == ['begin_fit'] + expected + ['after_cancel_epoch', 'after_epoch'] + EPOCH + ['after_fit']


def test_cancel_epoch_from_the_cancel_batch_handler():
    class Escalate(Callback):
        _order = 2000
        def after_cancel_batch(self): raise CancelEpoch()
    ev = _events(Raise(CancelBatch, 'after_pred', 0, True, 1), Escalate())
    assert ev[:13] == ['begin_fit', 'begin_epoch'] + TRAIN + ['begin_batch', 'after_pred', 'after_cancel_batch', 'after_cancel_epoch', 'after_epoch']


@pytest.mark.parametrize('args, expected', [
    ((CancelTrain, 'begin_fit', 0, False), ['begin_fit']),
    ((CancelTrain, 'begin_epoch', 1), ['begin_fit'] + EPOCH + ['begin_epoch']),
    ((CancelTrain, 'after_pred', 0, True, 1), ['begin_fit', 'begin_epoch'] + TRAIN + ['begin_batch', 'after_pred']),
    ((CancelTrain, 'after_batch', 0, False, 0), ['begin_fit', 'begin_epoch'] + 3*TRAIN + ['begin_validate'] + VALID),
    ((CancelTrain, 'after_epoch', 0, False), ['begin_fit'] + EPOCH),
])
def test_cancel_train_goes_straight_to_after_fit(args, expected):
    assert _events(Raise(*args)) == expected + ['after_cancel_train', 'after_fit']


def test_invariants_callback_can_check_several_fits():
    chk = InvariantsCallback(); run = Runner(chk); learn = _learner()
    run.fit(1, learn); run.fit(2, learn)
    assert chk.events.count('begin_epoch') == 2 and chk.events[0] == 'begin_fit'


def test_stop_after_ten_iterations():
    chk = InvariantsCallback(stop_after=10)
    run = Runner(chk); learn = _learner()
    run.fit(50, learn)
    assert run.n_iter == 10 and chk.events[-2:] == ['after_cancel_train', 'after_fit']
    assert chk.events.count('after_step') == 10 and chk.events.count('begin_epoch') == 4
    assert learn.model.training  # stopped in the middle of training


@pytest.mark.parametrize('args, exc', [((CancelBatch, 'begin_epoch'), CancelBatch), ((CancelBatch, 'after_batch'), CancelBatch),
                                       ((CancelEpoch, 'after_epoch', 0, False), CancelEpoch), ((CancelTrain, 'after_fit', 1, False), CancelTrain)])
def test_cancel_outside_its_level_reaches_the_caller(args, exc):
    chk = InvariantsCallback()
    with pytest.raises(exc):
        Runner([Raise(*args), chk]).fit(2, _learner())
    assert chk.events[-1] == 'after_fit'


def test_cancel_is_a_jump_later_callbacks_miss_that_event():
    seen = []
    class Later(Callback):
        _order = 3000
        def after_pred(self): seen.append('after_pred')
        def after_cancel_batch(self): seen.append('after_cancel_batch')
        def after_batch(self): seen.append('after_batch')
    Runner([Raise(CancelBatch, 'after_pred', 0, True, 0), Later()]).fit(1, _learner())
    assert seen[:2] == ['after_cancel_batch', 'after_batch']


# ---------------------------------------------------------------- errors

class Boom(Callback):
    def __init__(self, event='after_batch', at=2):
        self.at = at
        setattr(self, event, self._boom)
    def _boom(self):
        if self.run.n_iter == self.at: raise RuntimeError('boom')


class SeeError(Callback):
    def after_fit(self): self.error = self.run.error


def test_error_in_after_batch_runs_after_fit_and_keeps_its_traceback():
    chk, see = InvariantsCallback(), SeeError()
    with pytest.raises(RuntimeError, match='^boom$') as info:
        Runner([Boom(), chk, see]).fit(2, _learner())
    assert see.error is info.value  # after_fit can tell a failed run from a finished one
    assert chk.events[-2:] == ['after_step', 'after_fit']  # Boom raised in after_batch before chk (later _order) saw it
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == '_boom' and frames[-1].line == "if self.run.n_iter == self.at: raise RuntimeError('boom')"
    assert info.value.__context__ is None and not getattr(info.value, '__notes__', None)  # nothing else went wrong on the way out


def test_error_in_the_model_runs_after_fit():
    calls = []
    class Bad(nn.Linear):
        def forward(self, x): raise ValueError('bad model')
    class AfterFit(Callback):
        def after_fit(self): calls.append('after_fit')
    learn = _learner(); learn.model = Bad(5, 3)
    with pytest.raises(ValueError, match='bad model'):
        Runner(AfterFit()).fit(1, learn)
    assert calls == ['after_fit']


def test_keyboard_interrupt_runs_after_fit():
    calls = []
    class Stop(Callback):
        def after_step(self): raise KeyboardInterrupt
        def after_fit(self): calls.append(1)
    with pytest.raises(KeyboardInterrupt): Runner(Stop()).fit(1, _learner())
    assert calls == [1]


def test_an_error_in_after_fit_does_not_hide_the_original():
    class Both(Callback):
        def after_batch(self): raise RuntimeError('first')
        def after_fit(self): raise OSError('second')
    with pytest.raises(RuntimeError, match='first') as info:
        Runner(Both()).fit(1, _learner())
    assert info.value.__notes__ == ['after_fit also failed: OSError: second']
    class OnlyAfterFit(Callback):
        def after_fit(self): raise OSError('alone')
    with pytest.raises(OSError, match='alone'): Runner(OnlyAfterFit()).fit(1, _learner())


# ---------------------------------------------------------------- TrainEvalCallback: modes, counters, pos

class Track(Callback):
    _order = 1
    def begin_fit(self): self.pos, self.after, self.modes = [], [], []
    def begin_batch(self):
        if self.in_train: self.pos.append(self.run.pos)
        self.modes.append((self.in_train, self.model.training, torch.is_grad_enabled()))
    def after_batch(self):
        if self.in_train: self.after.append((self.run.n_iter, self.run.n_epochs, self.run.pos))


@pytest.mark.parametrize('epochs, n_train, bs', [(3, 7, 3), (2, 10, 5), (1, 1, 4), (1, 2, 1), (4, 9, 2)])
def test_pos_runs_from_0_to_exactly_1(epochs, n_train, bs):
    t = Track(); run = Runner([t, InvariantsCallback()])
    run.fit(epochs, _learner(n_train=n_train, bs=bs))
    iters = math.ceil(n_train / bs); N = epochs * iters
    assert t.pos == [k / (N - 1) if N > 1 else 0. for k in range(N)]
    assert t.pos[0] == 0. and (N == 1 or t.pos[-1] == 1.0) and all(0 <= p <= 1 for p in t.pos)
    assert t.after[-1] == (N, float(epochs), 1.0)  # exactly the end, with integers behind n_epochs
    assert [a[1] for a in t.after[:iters]] == [(i + 1) / iters for i in range(iters)]
    assert (run.n_iter, run.n_epochs, run.pos) == (N, float(epochs), 1.0)


def test_train_and_eval_modes_and_grad():
    t = Track(); learn = _learner()
    Runner(t).fit(2, learn)
    assert t.modes == 2 * (3 * [(True, True, True)] + [(False, False, False)])
    assert not learn.model.training


def test_invariants_callback_catches_broken_loops():
    class GradInValid(Callback):
        def begin_validate(self): torch.set_grad_enabled(True)
    with pytest.raises(AssertionError, match='grad enabled=True with in_train=False'):
        Runner([GradInValid(), InvariantsCallback()]).fit(1, _learner())
    class BadCounter(Callback):
        _order = 1
        def after_batch(self): self.run.n_iter += 1
    with pytest.raises(AssertionError, match='n_iter'):
        Runner([BadCounter(), InvariantsCallback()]).fit(1, _learner())


# ---------------------------------------------------------------- stats

def test_avg_stats_weighted_equals_full_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(203, 6, generator=g), torch.randint(0, 4, (203,), generator=g)
    model = nn.Linear(6, 4)
    st = AvgStats([accuracy, cross_entropy], in_train=False)
    naive = []
    with torch.no_grad():
        for xb, yb in DataLoader(Dataset(x, y), 16):  # 12 batches of 16 and one of 11
            pred = model(xb); loss = F.cross_entropy(pred, yb)
            st.accumulate(loss, pred, yb); naive.append(loss.item())
        full = model(x)
    want = [F.cross_entropy(full, y).item(), accuracy(full, y).item(), cross_entropy(full, y).item()]
    assert st.count == 203 and st.names == ['valid_loss', 'valid_accuracy', 'valid_cross_entropy']
    assert st.avg_stats == pytest.approx(want, abs=1e-6)
    assert abs(sum(naive) / len(naive) - want[0]) > 1e-4
    st.reset(); assert st.count == 0 and all(math.isnan(v) for v in st.avg_stats)


def test_avg_stats_callback_valid_stats_equal_full_evaluation():
    # 10 valid samples in batches of 4 (4, 4, 2): weighted, they equal one evaluation of all 10
    learn = _learner(n_train=9, n_valid=10, bs=2)
    cb = AvgStatsCallback({'acc': accuracy}, report=None)
    Runner(cb).fit(1, learn)
    xv, yv = learn.data.valid_ds.x, learn.data.valid_ds.y
    with torch.no_grad(): out = learn.model(xv)
    rec = cb.history[-1]
    assert rec['valid_loss'] == pytest.approx(cross_entropy(out, yv).item(), abs=1e-6)
    assert rec['valid_acc'] == pytest.approx(accuracy(out, yv).item(), abs=1e-6)


def test_history_records_are_plain_floats_and_reported_once_per_epoch():
    reported = []
    cb = AvgStatsCallback([accuracy], report=reported.append)
    Runner(cb).fit(3, _learner())
    assert reported == cb.history and len(reported) == 3
    for i, r in enumerate(reported, start=1):   # epochs are numbered from 1, as printed
        assert list(r) == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy'] and r['epoch'] == i
        assert all(type(v) is float for k, v in r.items() if k != 'epoch')


def test_train_metrics_can_be_left_out():
    cb = AvgStatsCallback({'acc': accuracy}, report=None, train_metrics=False)
    Runner(cb).fit(1, _learner())
    assert list(cb.history[0]) == ['epoch', 'train_loss', 'valid_loss', 'valid_acc']


def test_metric_names_from_dict_list_or_partial():
    from functools import partial
    assert AvgStats({'acc': accuracy}, True).names == ['train_loss', 'train_acc']
    assert AvgStats([partial(accuracy)], False).names == ['valid_loss', 'valid_accuracy']
    with pytest.raises(TypeError, match="got 'acc'"): AvgStats(['acc'], True)


def test_print_stats_format(capsys):
    print_stats({'epoch': 1, 'train_loss': 0.5, 'train_acc': 0.25, 'valid_loss': 1/3, 'valid_acc': 0.9})
    assert capsys.readouterr().out == 'epoch 1 | train loss 0.5000 acc 0.2500 | valid loss 0.3333 acc 0.9000\n'
    assert format_stats({'epoch': 0, 'train_loss': 1.0}) == 'epoch 0 | train loss 1.0000'


def test_report_none_is_silent(capsys):
    get_runner(report=None).fit(1, _learner())
    assert capsys.readouterr().out == ''
    get_runner().fit(2, _learner())
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith('epoch 1 | train loss ') and out[1].startswith('epoch 2 | train loss ')


def test_cancelled_validation_gives_nan_not_an_error():
    cb = AvgStatsCallback([accuracy], report=None)
    Runner([cb, Raise(CancelEpoch, 'begin_validate', 0, False)]).fit(1, _learner())
    r = cb.history[0]
    assert math.isnan(r['valid_loss']) and not math.isnan(r['train_loss'])


def test_no_host_sync_per_batch(monkeypatch):
    "Reads of tensor values do not grow with the number of batches: stats are read once per epoch."
    reads = []
    for name in ('item', 'tolist', '__float__', '__bool__', '__int__'):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: (reads.append(_n), _o(self, *a))[1])
    counts = []
    for bs in (2, 8):
        reads.clear()
        learn = _learner(n_train=32, n_valid=32, bs=bs, loss_func=F.cross_entropy)  # torch's loss: no label check
        get_runner(cbs=[ProgressCallback(lambda: None), DeviceCallback('cpu')], report=None).fit(2, learn)
        counts.append(len(reads))
    assert counts[0] == counts[1] == 2 * 2  # per epoch: one tolist per phase


# ---------------------------------------------------------------- parity with 03's fit, torch optimizers

@pytest.mark.parametrize('opt_func', [SGD, Optimizer, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)])
def test_parity_with_plain_fit(opt_func):
    def data(): return _data(n_train=50, n_valid=13, bs=8, shuffle=True, seed=3)
    d1, d2 = data(), data()
    l1 = _learner(d1, opt_func=opt_func, lr=0.3)
    ref_hist = fit(3, l1.model, cross_entropy, l1.opt, d1.train_dl, d1.valid_dl)
    l2 = _learner(d2, opt_func=opt_func, lr=0.3)
    run = get_runner(report=None)
    run.fit(3, l2)
    hist = run.avg_stats.history
    assert [list(h) for h in hist] == [list(r) for r in ref_hist]
    for h, r in zip(hist, ref_hist):
        for k in r: assert h[k] == pytest.approx(r[k], abs=1e-6), k
    for p, q in zip(l1.model.parameters(), l2.model.parameters()): torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_get_model_and_databunch():
    d = _data(n_in=6, c=4)
    model, opt = get_model(d, lr=0.2, nh=7)
    assert model(torch.zeros(2, 6)).shape == (2, 4) and opt.param_groups[0]['lr'] == 0.2
    assert isinstance(opt, SGD) and len(d.train_ds) == 7 and len(d.valid_ds) == 4
    _, opt = get_model(d, opt_func=torch.optim.SGD)
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ValueError, match='c=None'): get_model(DataBunch(d.train_dl, d.valid_dl))
    tdl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.zeros(3)), 2)
    assert DataBunch(tdl, None).train_ds is tdl.dataset


# ---------------------------------------------------------------- devices

def test_as_device():
    assert as_device('cpu') == torch.device('cpu') and as_device(torch.device('cpu')) == torch.device('cpu')
    with pytest.raises(ValueError, match="not a device: 'gpu'"): as_device('gpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' asked for, but CUDA is not available"): as_device('cuda')
        with pytest.raises(ValueError, match='CUDA is not available'): CudaCallback()
    else:
        with pytest.raises(ValueError, match='CUDA device'): as_device(f'cuda:{torch.cuda.device_count()}')


def test_device_callback_on_cpu_moves_batches_first():
    seen = []
    class Where(Callback):
        def begin_batch(self): seen.append((self.xb.device.type, self.yb.device.type))
    run = Runner([Where(), DeviceCallback('cpu'), InvariantsCallback()])
    assert type(run.cbs[0]) is DeviceCallback and run.device.device == torch.device('cpu')
    run.fit(1, _learner())
    assert set(seen) == {('cpu', 'cpu')}


class StopAtStart(Callback):
    _order = 1
    def begin_fit(self): raise CancelTrain()


@pytest.mark.parametrize('opt_func', [lambda ps, lr: torch.optim.Adam(ps, lr=lr),
                                      lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), 
                                      lambda ps, lr: SGD(ps, lr=lr, momentum=0.9)], ids=['adam', 'torch-sgd', 'sgd'])
def test_device_callback_moves_the_optimizer_state(opt_func):
    "Without a GPU: on the 'meta' device (shapes, no data) every state tensor moves, except 0-d step counters."
    learn = _learner(opt_func=opt_func)
    xb, yb = next(iter(learn.data.train_dl))
    cross_entropy(learn.model(xb), yb).backward(); learn.opt.step()
    before = {id(p): dict(s) for p, s in learn.opt.state.items()}
    Runner([DeviceCallback('meta'), StopAtStart()]).fit(1, learn)  # stops right after begin_fit
    assert len(learn.opt.state) == 2 and {id(p) for p in learn.opt.state} == set(before)
    for s in learn.opt.state.values():
        for k, v in s.items():
            assert v.device.type == ('cpu' if v.dim() == 0 else 'meta'), k
    assert next(learn.model.parameters()).device.type == 'meta'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_device_callback_on_cuda():
    dev = torch.device('cuda')
    learn = _learner(opt_func=lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9))
    # momentum buffers built on the CPU must follow the model
    xb, yb = next(iter(learn.data.train_dl))
    cross_entropy(learn.model(xb), yb).backward(); learn.opt.step(); learn.opt.zero_grad()
    cb = AvgStatsCallback([accuracy], report=None)
    Runner([DeviceCallback(dev), cb, InvariantsCallback()]).fit(2, learn)
    assert next(learn.model.parameters()).device.type == 'cuda'
    assert all(s['momentum_buffer'].device.type == 'cuda' for s in learn.opt.state.values())
    assert cb.train_stats.sums[0].device.type == 'cuda' and isinstance(cb.history[-1]['valid_loss'], float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_no_sync_per_batch_on_cuda():
    "With the data on the GPU, a fit syncs only when reading stats at the end of each epoch."
    dev = torch.device('cuda')
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g).to(dev), torch.randint(0, 3, (64,), generator=g).to(dev)
    data = DataBunch(DataLoader(Dataset(x, y), 8, shuffle=True, seed=0), DataLoader(Dataset(x, y), 16), c=3)
    model = nn.Linear(5, 3).to(dev)
    learn = Learner(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, data)
    class Strict(Callback):
        "Any synchronizing CUDA call between begin_batch and after_batch raises."
        def begin_fit(self): self.batches = 0
        def begin_batch(self): torch.cuda.set_sync_debug_mode('error')
        def after_batch(self): torch.cuda.set_sync_debug_mode(0); self.batches += 1
    strict = Strict()
    try:
        run = get_runner(cbs=[strict, DeviceCallback(dev)], report=None)
        run.fit(2, learn)
    finally: torch.cuda.set_sync_debug_mode(0)
    assert strict.batches == 2 * (8 + 4)  # every batch, training and validation, ran inside the strict window
    assert all(type(v) is float for k, v in run.avg_stats.history[-1].items() if k != 'epoch')
    class Reads(Callback):  # the check itself works: one read of the loss per batch is caught
        _order = 1
        def after_loss(self): self.run.loss.item()
    try:
        with pytest.raises(RuntimeError, match='synchroniz'):
            get_runner(cbs=[Strict(), Reads(), DeviceCallback(dev)], report=None).fit(1, learn)
    finally: torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------- gradient accumulation

def _concat_reference(learn, n, epochs, opt_func):
    "Step by hand on the concatenation of each window of `n` batches (windows end with the epoch)."
    ref = copy.deepcopy(learn.model); opt = opt_func(ref.parameters(), lr=0.1)
    for _ in range(epochs):
        batches = list(learn.data.train_dl)
        for i in range(0, len(batches), n):
            w = batches[i:i+n]
            xb, yb = torch.cat([b[0] for b in w]), torch.cat([b[1] for b in w])
            cross_entropy(ref(xb), yb).backward(); opt.step(); opt.zero_grad()
    return ref


@pytest.mark.parametrize('n, n_train, bs', [(3, 10, 3), (2, 11, 2), (4, 12, 3), (5, 7, 3), (1, 7, 3)])
@pytest.mark.parametrize('opt_func', [SGD, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01)])
def test_gradient_accumulation_equals_one_step_on_the_concatenation(n, n_train, bs, opt_func):
    learn = _learner(n_train=n_train, bs=bs, opt_func=opt_func)
    ref = _concat_reference(learn, n, 2, opt_func)
    chk = InvariantsCallback()
    Runner([GradientAccumulation(n), chk]).fit(2, learn)
    for p, q in zip(learn.model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    iters = math.ceil(n_train / bs)
    assert chk.events.count('after_step') == 2 * math.ceil(iters / n)


def test_gradient_accumulation_logs_unscaled_losses():
    learn = _learner(n_train=12, bs=3)
    start = copy.deepcopy(learn.model)
    losses = []
    class Log(Callback):
        def after_batch(self):
            if self.in_train: losses.append(self.loss.item())
    cb = AvgStatsCallback([accuracy], report=None)
    Runner([GradientAccumulation(4), Log(), cb]).fit(1, learn)  # one window: no step until the last batch
    with torch.no_grad(): want = [cross_entropy(start(xb), yb).item() for xb, yb in learn.data.train_dl]
    assert losses == pytest.approx(want, abs=1e-6)
    x, y = learn.data.train_ds.x, learn.data.train_ds.y
    with torch.no_grad(): assert cb.history[0]['train_loss'] == pytest.approx(cross_entropy(start(x), y).item(), abs=1e-6)


class CancelAt(Callback):
    "Cancel training batch `it` of epoch `epoch` at `event` with `exc`."
    _order = 1  # after GradientAccumulation
    def __init__(self, event, it, exc=CancelBatch, epoch=0):
        self.it, self.exc, self.epoch_at = it, exc, epoch
        setattr(self, event, self._cancel)
    def _cancel(self):
        if self.in_train and (self.epoch, self.iter) == (self.epoch_at, self.it): raise self.exc()


@pytest.mark.parametrize('skip', [0, 1])
def test_gradient_accumulation_does_not_count_a_batch_cancelled_before_backward(skip):
    "A batch cancelled at after_loss adds no gradient, so it must not count in the window's divisor either."
    learn = _learner(n_train=12, bs=3, opt_func=SGD)  # 4 batches: with one cancelled, a window of 3
    ref = copy.deepcopy(learn.model)
    kept = [b for i, b in enumerate(learn.data.train_dl) if i != skip][:3]
    chk = InvariantsCallback()
    Runner([GradientAccumulation(3), CancelAt('after_loss', skip), chk]).fit(1, learn)
    cross_entropy(ref(torch.cat([b[0] for b in kept])), torch.cat([b[1] for b in kept])).backward()
    SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(learn.model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert chk.events.count('after_step') == 1  # the window of three filled at batch 3, the epoch's last


def test_gradient_accumulation_starts_each_epoch_from_zero_gradients():
    "A window cut short by CancelEpoch leaves gradients and a sample count behind: the next epoch must drop both."
    learn = _learner(n_train=9, bs=3, opt_func=SGD)
    start = copy.deepcopy(learn.model)
    Runner([GradientAccumulation(3), CancelAt('begin_batch', 2, CancelEpoch)]).fit(2, learn)  # epoch 0: 2 backwards, no step
    ref = copy.deepcopy(start)
    cross_entropy(ref(learn.data.train_ds.x), learn.data.train_ds.y).backward()  # epoch 1: one window of all 9
    SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(learn.model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_gradient_accumulation_bad_n():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f'got {bad!r}'): GradientAccumulation(bad)


# ---------------------------------------------------------------- the lesson's run on the embedded digits

def test_lesson_run_on_embedded_mnist():
    from lesson9.data import get_data
    x_train, y_train, x_valid, y_valid = get_data()
    def one():
        torch.manual_seed(0)
        data = DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), 64, seed=0), c=10)
        learn = Learner(*get_model(data, lr=0.5, nh=50), cross_entropy, data)
        run = get_runner(report=None)
        run.fit(2, learn)
        return run.avg_stats.history
    h1, h2 = one(), one()
    assert h1 == h2 and h1[-1]['valid_acc'] >= 0.90


def test_avg_stats_skips_a_batch_of_no_samples():
    "A rank's empty part of a batch (07) has a mean of NaN over no samples: it must add nothing."
    from lesson9.callbacks import AvgStats
    from lesson9.training import accuracy
    st = AvgStats([accuracy], False)
    pred, yb = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    st.accumulate(torch.nn.functional.cross_entropy(pred, yb), pred, yb)
    before = st.as_dict()
    empty = pred[:0]
    st.accumulate(torch.nn.functional.cross_entropy(empty, yb[:0]), empty, yb[:0])   # nan loss
    assert st.as_dict() == before and st.count == 4


def test_stats_loaded_on_the_cpu_follow_the_batches_to_their_device():
    "A resume loads the running sums on the CPU; the next batch may be on a GPU: the sums go there, values kept."
    from lesson9.callbacks import AvgStats
    st = AvgStats([accuracy], True)
    st.load_state_dict({'count': 5, 'sums': [torch.tensor(2., dtype=torch.float64), torch.tensor(3., dtype=torch.float64)]})
    sums = st.sums_on('meta')   # a device other than the CPU that every machine has
    assert [s.device.type for s in sums] == ['meta', 'meta'] and st.sums is sums
    st.load_state_dict({'count': 5, 'sums': [torch.tensor(2., dtype=torch.float64), torch.tensor(3., dtype=torch.float64)]})
    assert [float(s) for s in st.sums_on('cpu')] == [2., 3.]
