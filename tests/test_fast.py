"""The fast path (lesson9.fast): the protocol, the SGD update in tensors, parity with the eager Runner
(uncompiled, compiled on the CPU, and as CUDA graphs where CUDA exists), fallbacks and their messages."""
import collections, copy, math, re, warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
import torch.nn.functional as F
from torch import nn

from lesson9.anneal import ParamScheduler, Recorder, one_cycle, sched_no
from lesson9.callbacks import (AvgStatsCallback, Callback, CancelEpoch, CancelTrain, DataBunch, DeviceCallback, GradientAccumulation,
                               InvariantsCallback, Learner, ProgressCallback, Runner)
from lesson9.fast import (FAST_PATH_MODES, IN_BATCH, EagerFallbackWarning, FastRunner, fast_path_mode, get_fast_runner,
                          in_batch_events, sgd_coeffs, sgd_update, why_not_fast)
from lesson9.training import SGD, DataLoader, Dataset, accuracy, cross_entropy

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA here')


@pytest.fixture(autouse=True)
def one_thread_and_fresh_compiler():
    "One thread (tiny models), and torch.compile's caches emptied: each test compiles what it uses, within torch's recompile limit."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.compiler.reset()
    yield
    torch.set_num_threads(n)


def tiny_learner(n_train=50, bs=8, seed=0, opt_func=SGD, device='cpu', loss_func=F.cross_entropy, **opt_kw):
    "A 5-7-3 MLP on random data: batches of 8 and a last one of 2; validation in batches of 16."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + 20, 5, generator=g), torch.randint(0, 3, (n_train + 20,), generator=g)
    x, y = x.to(device), y.to(device)
    data = DataBunch(DataLoader(Dataset(x[:n_train], y[:n_train]), bs), DataLoader(Dataset(x[n_train:], y[n_train:]), 2*bs), c=3)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(device)
    return Learner(model, opt_func(model.parameters(), lr=0.1, **opt_kw), loss_func, data)


def fit_pair(make_cbs, epochs=3, mode='func', **kw):
    "The same fit with the eager Runner and with a FastRunner: [(learner, recorder, runner)] x 2."
    out = []
    for make_runner in (Runner, lambda cbs: FastRunner(cbs, mode=mode)):
        learn, rec = tiny_learner(**kw), Recorder()
        run = make_runner([AvgStatsCallback([accuracy], report=None), rec] + make_cbs())
        run.fit(epochs, learn)
        out.append((learn, rec, run))
    return out


def assert_same(pair, eps=1e-5):
    (l0, r0, run0), (l1, r1, run1) = pair
    for p, q in zip(l0.model.parameters(), l1.model.parameters()):
        assert torch.allclose(p.cpu(), q.cpu(), atol=eps, rtol=0), (p - q).abs().max()
    assert len(r0.losses) == len(r1.losses) > 0
    assert max(abs(a - b) for a, b in zip(r0.losses, r1.losses)) <= eps
    assert r0.lrs == r1.lrs
    for h0, h1 in zip(run0.avg_stats.history, run1.avg_stats.history):
        assert h0.keys() == h1.keys() and all(abs(h0[k] - h1[k]) <= eps or math.isnan(h0[k]) == math.isnan(h1[k]) == True for k in h0), (h0, h1)
    for p, q in zip(l0.model.parameters(), l1.model.parameters()):  # gradients left as the eager loop leaves them (None after a step)
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.allclose(p.grad, q.grad, atol=eps, rtol=0))
    s0, s1 = l0.opt.state, l1.opt.state  # the momentum buffers the optimizer keeps, the same too
    for p, q in zip(l0.model.parameters(), l1.model.parameters()):
        a, b = s0.get(p, {}).get('momentum_buffer'), s1.get(q, {}).get('momentum_buffer')
        assert (a is None) == (b is None) and (a is None or torch.allclose(a.cpu(), b.cpu(), atol=eps, rtol=0))


SCHEDULES = {
    'constant': (lambda: [ParamScheduler('lr', sched_no(0.1, 0.1))], {}),
    'one-cycle lr and momentum': (lambda: one_cycle(0.3), dict(momentum=0.9)),
    'one-cycle, nesterov, weight decay': (lambda: one_cycle(0.3), dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    'torch SGD, dampening': (lambda: one_cycle(0.3), dict(opt_func=torch.optim.SGD, momentum=0.9, dampening=0.2)),
    'gradient accumulation': (lambda: [GradientAccumulation(3)], dict(opt_func=torch.optim.SGD, momentum=0.9)),
    'accumulation, dampening': (lambda: [GradientAccumulation(2)], dict(momentum=0.8, dampening=0.3)),  # the first step's buffer is d
}


# ---------------------------------------------------------------- the protocol

class NonFinite(Callback):
    "A divergence check as a 'graph' callback: a flag on the device, set by tensor ops at after_loss."
    fast_path = 'graph'
    def begin_fit(self): self.flag = torch.zeros((), dtype=torch.bool)
    def begin_epoch(self): self.flag.zero_()
    def after_loss(self): self.flag.logical_or_(~torch.isfinite(self.run.loss.detach()))


class LogEvents(Callback):
    "An 'after' callback: logs the in-batch events it sees and the loss at after_loss."
    fast_path = 'after'
    def __init__(self): self.events, self.losses = [], []
    def after_pred(self): self.events.append('after_pred')
    def after_loss(self):
        self.events.append('after_loss')
        if self.run.in_train: self.losses.append(self.run.loss.detach())
    def after_backward(self): self.events.append('after_backward')
    def after_step(self): self.events.append('after_step')


class ReadsLoss(Callback):
    def after_loss(self): self.run.loss.item()


def test_callback_default_is_eager_and_modes_are_the_documented_ones():
    assert Callback.fast_path == 'eager' and FAST_PATH_MODES == ('eager', 'after', 'graph')
    assert IN_BATCH == ('after_pred', 'after_loss', 'after_backward', 'after_step')


def test_fast_path_mode_of_lesson9_callbacks_and_custom_ones():
    assert [fast_path_mode(cb) for cb in (ParamScheduler('lr', sched_no(1, 1)), ProgressCallback(print), DeviceCallback('cpu'))] == ['none'] * 3
    assert [fast_path_mode(cb) for cb in (Recorder(), AvgStatsCallback(), GradientAccumulation(2))] == ['after', 'stats', 'accumulate']
    assert [fast_path_mode(cb) for cb in (NonFinite(), LogEvents(), ReadsLoss())] == ['graph', 'after', 'eager']
    assert in_batch_events(LogEvents()) == list(IN_BATCH) and in_batch_events(ReadsLoss()) == ['after_loss']


def test_bad_fast_path_value_is_named():
    class Bad(Callback):
        fast_path = True
        def after_pred(self): pass
    with pytest.raises(ValueError, match=r"Bad.fast_path must be one of \('eager', 'after', 'graph'\), got True"): fast_path_mode(Bad())


def test_why_not_fast_names_the_blocker():
    learn = tiny_learner()
    assert why_not_fast([Recorder(), AvgStatsCallback(), NonFinite(), GradientAccumulation(2)], learn) is None
    assert why_not_fast([Recorder(), ReadsLoss()], learn) == "ReadsLoss needs Python at after_loss (its fast_path is 'eager')"
    assert why_not_fast([InvariantsCallback()], learn).startswith("InvariantsCallback needs Python at after_pred, after_loss, after_backward, after_step")
    learn.opt = torch.optim.Adam(learn.model.parameters())
    assert why_not_fast([], learn) == "the optimizer is Adam: the fast path knows SGD's update only (lesson9's or torch's)"
    learn.opt = torch.optim.SGD(learn.model.parameters(), lr=0.1, maximize=True)
    assert 'maximize' in why_not_fast([], learn)
    learn.opt = SGD(list(learn.model.parameters())[:2], lr=0.1)
    assert why_not_fast([], learn) == "the optimizer's parameters are not exactly the model's trainable parameters"
    bn = tiny_learner(); bn.model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)); bn.opt = SGD(bn.model.parameters(), lr=0.1)
    assert why_not_fast([], bn) == "the model has buffers (BatchNorm?): the fast path updates parameters only"


# ---------------------------------------------------------------- SGD in tensors

@pytest.mark.parametrize('kw', [{}, dict(weight_decay=0.01), dict(momentum=0.9), dict(momentum=0.9, dampening=0.3),
                                dict(momentum=0.9, nesterov=True, weight_decay=0.1)])
def test_sgd_update_matches_torch_sgd_with_changing_hyper_parameters(kw):
    torch.manual_seed(0)
    ps = [torch.randn(4, 3), torch.randn(3)]
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.SGD(ref, lr=0.1, **kw)
    coeffs, bufs = torch.zeros(6), ([torch.zeros_like(p) for p in ps] if kw.get('momentum') else None)
    for i in range(6):
        grads = [torch.randn_like(p) for p in ps]
        for r, g in zip(ref, grads): r.grad = g.clone()
        opt.param_groups[0]['lr'] = 0.1 * (i + 1)
        if kw.get('momentum'): opt.param_groups[0]['momentum'] = kw['momentum'] - 0.05 * i
        coeffs.copy_(torch.tensor(sgd_coeffs(opt.param_groups[0], 'momentum_buffer' in opt.state[ref[0]])))
        opt.step()
        sgd_update(ps, grads, bufs, coeffs)
        for p, r in zip(ps, ref): assert torch.allclose(p, r.detach(), atol=1e-6, rtol=0)


def test_sgd_coeffs_first_step_and_no_momentum():
    g = dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    assert sgd_coeffs(g, False) == [0.5, 0.01, 0., 1., 0., 1.]      # first step: the buffer is d
    assert sgd_coeffs(g, True) == [0.5, 0.01, 0.9, 0.9, 0., 1.]     # then momentum and 1 - dampening
    assert sgd_coeffs(dict(g, nesterov=True, dampening=0), True) == [0.5, 0.01, 0.9, 1., 1., 0.9]
    assert sgd_coeffs(dict(g, momentum=0), True) == [0.5, 0.01, 1., 0., 1., 0.]  # no momentum: a buffer stays as it is


# ---------------------------------------------------------------- parity, uncompiled (fast to test)

@pytest.mark.parametrize('name', SCHEDULES)
def test_func_mode_matches_the_eager_runner(name):
    make_cbs, kw = SCHEDULES[name]
    pair = fit_pair(make_cbs, **kw)
    assert_same(pair)
    fast = pair[1][2]
    assert fast.why_eager is None and fast.fast.calls == 21  # 3 epochs x 7 training batches (the last of 2), all in the step


def test_gradient_accumulation_follows_the_callback_windows():
    ga, chk = GradientAccumulation(3), LogEvents()
    run = FastRunner([ga, chk], mode='func')
    run.fit(1, tiny_learner())  # 7 batches: windows of 3, 3, 1
    assert chk.events.count('after_step') == 3 and chk.events.count('after_pred') == 7 + 2  # + 2 validation batches
    assert (ga.samples, ga.batches) == (0, 0) and not any(a.abs().sum() for a in run.fast.accs)


def test_after_callbacks_see_every_in_batch_event_in_order_and_the_loss():
    log, rec = LogEvents(), Recorder()
    FastRunner([log, rec], mode='func').fit(1, tiny_learner())
    train = ['after_pred', 'after_loss', 'after_backward', 'after_step']
    assert log.events == 7 * train + 2 * ['after_pred', 'after_loss']
    assert [v.item() for v in log.losses] == rec.losses  # the step's losses, one tensor per batch


def test_graph_callback_flag_without_host_reads():
    for lr, expected in ((0.1, False), (1e30, True)):
        nf = NonFinite()
        run = FastRunner([nf, ParamScheduler('lr', sched_no(lr, lr))], mode='func')
        run.fit(1, tiny_learner())
        assert run.why_eager is None and bool(nf.flag) is expected


def test_no_host_sync_per_batch(monkeypatch):
    "Reads of a tensor's value during a fit: the same count for 5 and for 20 batches per epoch."
    def count(n_batches):
        calls = collections.Counter()
        for name in ('item', 'tolist', '__float__', '__bool__', '__int__', 'cpu', 'numpy'):
            orig = getattr(torch.Tensor, name)
            def counting(t, *a, _orig=orig, _name=name, **k):
                calls[_name] += 1
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counting)
        run = get_fast_runner([Recorder(), *one_cycle(0.3)], report=None, mode='func')
        run.fit(2, tiny_learner(n_train=8 * n_batches, momentum=0.9))
        monkeypatch.undo()
        assert run.fast.calls == 2 * n_batches
        return calls
    assert count(5) == count(20)


def test_eager_fallback_names_the_callback_and_matches_the_runner():
    learn, ref = tiny_learner(), tiny_learner()
    run = FastRunner([AvgStatsCallback(report=None), ReadsLoss()], mode='func')
    with pytest.warns(EagerFallbackWarning, match=r"fast path off for this fit: ReadsLoss needs Python at after_loss \(its fast_path is 'eager'\); the batches run eagerly"):
        run.fit(2, learn)
    assert run.fast is None and run.why_eager.startswith('ReadsLoss')
    Runner([AvgStatsCallback(report=None)]).fit(2, ref)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.equal(p, q)


def test_mode_eager_and_bad_modes():
    run = FastRunner(mode='eager')
    run.fit(1, tiny_learner())
    assert run.fast is None and run.why_eager == "mode='eager'"
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'fast'"): FastRunner(mode='fast')
    with pytest.warns(EagerFallbackWarning, match="mode 'cuda_graph' needs the model on a CUDA device, it is on cpu"):
        FastRunner(mode='cuda_graph').fit(1, tiny_learner())


def test_get_fast_runner_is_get_runner_with_the_fast_path():
    run = get_fast_runner([Recorder()], report=None)
    assert isinstance(run, FastRunner) and run.mode == 'auto'
    assert [type(cb).__name__ for cb in run.cbs] == ['TrainEvalCallback', 'AvgStatsCallback', 'Recorder']
    assert list(run.avg_stats.train_stats.metrics) == ['acc']


def test_cancel_train_from_after_batch_still_works():
    class Stop(Callback):
        def after_batch(self):
            if self.run.n_iter == 4: raise CancelTrain()
    run = FastRunner([Stop(), Recorder()], mode='func')
    run.fit(3, tiny_learner())
    assert run.n_iter == 4 and len(run.recorder.losses) == 4 and run.fast.calls == 4


# ---------------------------------------------------------------- what the step assumed, checked at every batch

def first_layer(model): return next(m for m in model.modules() if isinstance(m, nn.Linear))


class FreezeAt(Callback):
    "Freezes the first layer at begin_epoch of epoch `epoch` (the optimizer keeps it: torch's SGD skips it, having no gradient)."
    def __init__(self, epoch): self.at = epoch
    def begin_epoch(self):
        if self.run.epoch == self.at: first_layer(self.run.model).requires_grad_(False)


class Smoothing:
    "A cross entropy whose label smoothing is a Python value, changed by `ScheduleSmoothing` during the fit."
    def __init__(self): self.eps = 0.
    def __call__(self, out, yb): return F.cross_entropy(out, yb, label_smoothing=self.eps)


class ScheduleSmoothing(Callback):
    "Sets the loss's label smoothing per epoch and, with `per_batch`, per batch too."
    def __init__(self, per_batch=False): self.per_batch = per_batch
    def begin_epoch(self): self.run.loss_func.eps = 0.1 * self.run.epoch
    def begin_batch(self):
        if self.per_batch and self.run.in_train: self.run.loss_func.eps = 0.05 * (self.run.iter % 2)


class WithUnused(nn.Module):
    "The tiny MLP and a layer that forward never uses: it gets no gradient."
    def __init__(self):
        super().__init__()
        self.body, self.unused = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), nn.Linear(3, 3)
    def forward(self, x): return self.body(x)


def unused_learner(**kw):
    learn = tiny_learner(**kw)
    torch.manual_seed(0)
    learn.model = WithUnused()
    learn.opt = SGD(learn.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    return learn


def check_a_layer_frozen_by_a_callback_during_the_fit_stays_put(mode):
    with pytest.warns(EagerFallbackWarning, match=r"parameter '0.weight' was frozen \(requires_grad False\) during the fit"):
        pair = fit_pair(lambda: [FreezeAt(1)], mode=mode, momentum=0.9, weight_decay=0.01)
    assert_same(pair)
    (l0, _, _), (l1, _, run) = pair
    assert run.fast is None and run.why_eager.startswith("parameter '0.weight' was frozen")
    frozen = tiny_learner(momentum=0.9, weight_decay=0.01)  # the weights after epoch 1, when the layer froze
    Runner().fit(1, frozen)
    assert torch.allclose(l1.model[0].weight, frozen.model[0].weight, atol=1e-6, rtol=0)  # and not one step more


def test_a_layer_frozen_by_a_callback_during_the_fit_stays_put(): check_a_layer_frozen_by_a_callback_during_the_fit_stays_put('func')


def check_a_parameter_without_a_gradient_is_not_moved(mode):
    learn, ref = unused_learner(), unused_learner()
    before = learn.model.unused.weight.detach().clone()
    run = FastRunner([Recorder()], mode=mode)
    with pytest.warns(EagerFallbackWarning, match=r"the loss gives no gradient to unused.weight, unused.bias \(unused in forward\?\)"):
        run.fit(2, learn)
    Runner([Recorder()]).fit(2, ref)
    assert torch.equal(learn.model.unused.weight, before) and run.fast is None
    assert run.why_eager == "the loss gives no gradient to unused.weight, unused.bias (unused in forward?)"
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_a_parameter_without_a_gradient_is_not_moved(): check_a_parameter_without_a_gradient_is_not_moved('func')


class Switchable(nn.Module):
    "The tiny MLP and a last layer that forward uses while `use_extra` is True."
    def __init__(self):
        super().__init__()
        self.body, self.extra, self.use_extra = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), nn.Linear(3, 3), True
    def forward(self, x): return self.extra(self.body(x)) if self.use_extra else self.body(x)


class DropExtra(Callback):
    def begin_epoch(self):
        if self.run.epoch == 1: self.run.model.use_extra = False


def check_a_layer_the_forward_stops_using_during_the_fit(mode):
    learns = []
    for make_runner in (Runner, lambda cbs: FastRunner(cbs, mode=mode)):
        learn = tiny_learner(); torch.manual_seed(0)
        learn.model = Switchable(); learn.opt = SGD(learn.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        run = make_runner([Recorder(), DropExtra()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', EagerFallbackWarning); run.fit(3, learn)
        learns.append(learn)
    assert run.why_eager == "the loss gives no gradient to extra.weight, extra.bias (unused in forward?)"
    assert run._step.calls == 7 and sum(w.category is EagerFallbackWarning for w in caught) == 1  # the first epoch in the step
    for p, q in zip(*(l.model.parameters() for l in learns)): assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_a_layer_the_forward_stops_using_during_the_fit(): check_a_layer_the_forward_stops_using_during_the_fit('func')


class StopAt(Callback):
    "Saves the runner, model and optimizer at after_batch of training batch `n` (counted over the fit), then stops."
    _order = 100
    def __init__(self, n): self.n, self.saved = n, None
    def after_batch(self):
        run = self.run
        if run.in_train and run.n_iter == self.n:
            self.saved = (run.state_dict(), copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.opt.state_dict()))
            raise CancelTrain()


def fit_stopped_then_resumed(make_cbs, stop_at, epochs=3, mode='func', **kw):
    "A FastRunner stopped at after_batch of training batch `stop_at`, then carried on by a fresh FastRunner and learner."
    stop = StopAt(stop_at)
    FastRunner([AvgStatsCallback([accuracy], report=None), Recorder(), stop] + make_cbs(), mode=mode).fit(epochs, tiny_learner(**kw))
    state, model_sd, opt_sd = stop.saved
    learn, rec = tiny_learner(**kw), Recorder()
    with torch.no_grad():
        for p in learn.model.parameters(): p.add_(1.)  # not the saved weights until they are loaded
    learn.model.load_state_dict(model_sd); learn.opt.load_state_dict(opt_sd)
    run = FastRunner([AvgStatsCallback([accuracy], report=None), rec] + make_cbs(), mode=mode)
    run.fit(epochs, learn, resume=state)
    return learn, rec, run


def check_resume_stopped_inside_an_accumulation_window(mode):
    make_cbs, kw = SCHEDULES['gradient accumulation']
    eager = fit_pair(make_cbs, **kw)[0]
    for stop_at in ((1, 8) if mode == 'func' else (8,)):  # inside the first window of epochs 1 and 2 (compiled: torch's recompile limit)
        learn, rec, run = fit_stopped_then_resumed(make_cbs, stop_at, mode=mode, **kw)
        assert run.why_eager is None
        for p, q in zip(eager[0].model.parameters(), learn.model.parameters()): assert torch.allclose(p, q, atol=1e-5, rtol=0)
        assert len(rec.losses) == len(eager[1].losses) and max(abs(a - b) for a, b in zip(eager[1].losses, rec.losses)) <= 1e-5
        for h0, h1 in zip(eager[2].avg_stats.history, run.avg_stats.history): assert all(abs(h0[k] - h1[k]) <= 1e-5 for k in h0)


def test_resume_stopped_inside_an_accumulation_window(): check_resume_stopped_inside_an_accumulation_window('func')


def labels_with(bad, at=20, loss_func=cross_entropy):
    learn = tiny_learner(loss_func=loss_func)
    learn.data.train_dl.ds.y[at] = bad  # in the third batch: the step has compiled and run by then
    return learn


class ChangeAt(Callback):
    "At begin_epoch of epoch 1, changes what a compiled step would have assumed at the fit's first batch."
    fast_path = 'after'
    def __init__(self, change): self.change = change
    def after_loss(self): pass  # an in-batch handler, so that its fast_path counts
    def begin_epoch(self):
        if self.run.epoch != 1: return
        run = self.run
        if self.change == 'a callback added': run.add_cbs(ReadsLoss())
        elif self.change == 'fast_path': self.fast_path = 'eager'
        elif self.change == 'the loss replaced': run.learn.loss_func = lambda out, yb: F.cross_entropy(out, yb, label_smoothing=0.2)
        elif self.change == 'maximize': run.opt.param_groups[0]['maximize'] = True


MID_FIT = {'a callback added': "the callbacks changed during the fit",
           'fast_path': "ChangeAt.fast_path changed from 'after' to 'eager' during the fit",
           'the loss replaced': "the learner's model, loss or optimizer was replaced during the fit",
           'maximize': "a param group of the optimizer asks for maximize"}


@pytest.mark.parametrize('change', MID_FIT)
def test_a_change_during_the_fit_turns_the_fast_path_off_for_the_rest_of_it(change):
    with pytest.warns(EagerFallbackWarning, match=re.escape(f"fast path off for this fit: {MID_FIT[change]}; the batches run eagerly")):
        pair = fit_pair(lambda: [ChangeAt(change)], opt_func=torch.optim.SGD, momentum=0.9)
    assert_same(pair)
    run = pair[1][2]
    assert run.why_eager == MID_FIT[change] and run._step.calls == 7  # epoch 0 in the step, then eagerly


class CancelEpochAt(Callback):
    "Cancels epoch 0 after its training batch `it`, inside an accumulation window."
    def __init__(self, it): self.it = it
    def after_batch(self):
        if self.run.in_train and self.run.epoch == 0 and self.run.iter == self.it: raise CancelEpoch()


def test_a_window_cut_short_by_a_cancelled_epoch_is_dropped_as_zero_grad_drops_it():
    pair = fit_pair(lambda: [GradientAccumulation(3), CancelEpochAt(4)], opt_func=torch.optim.SGD, momentum=0.9)
    assert_same(pair)
    assert pair[1][2].why_eager is None


# ---------------------------------------------------------------- parity as a property

OPTS = {'constant': {}, 'momentum': dict(momentum=0.9), 'weight decay': dict(weight_decay=0.05),
        'nesterov': dict(momentum=0.9, nesterov=True, weight_decay=0.01), 'dampening': dict(momentum=0.8, dampening=0.3)}


@st.composite
def fits(draw, mode):
    "A small fit: optimizer settings, a schedule, accumulation, layers frozen at the start or by a callback, an unused layer, a loss setting changed per epoch or batch, and where to stop."
    return dict(mode=mode, opt=draw(st.sampled_from(sorted(OPTS))), torch_sgd=draw(st.booleans()), one_cycle=draw(st.booleans()),
                accumulate=draw(st.sampled_from([None, 2, 3])), frozen=draw(st.sampled_from([None, 'in opt', 'left out'])),
                freeze_at=draw(st.sampled_from([None, 1, 2])), unused=draw(st.booleans()),
                smoothing=draw(st.sampled_from([None, 'epoch', 'batch'])), stop=draw(st.integers(1, 13)))


def cfg_learner(cfg):
    learn = tiny_learner(loss_func=Smoothing() if cfg['smoothing'] else F.cross_entropy)
    torch.manual_seed(0)
    model = learn.model = WithUnused() if cfg['unused'] else nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    if cfg['frozen']: first_layer(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad or cfg['frozen'] == 'in opt']
    learn.opt = (torch.optim.SGD if cfg['torch_sgd'] else SGD)(params, lr=0.1, **OPTS[cfg['opt']])
    return learn


def cfg_cbs(cfg):
    cbs = [AvgStatsCallback([accuracy], report=None), Recorder()]
    if cfg['one_cycle']: cbs += one_cycle(0.3) if 'momentum' in OPTS[cfg['opt']] else [ParamScheduler('lr', sched_no(0.3, 0.1))]
    if cfg['accumulate']: cbs.append(GradientAccumulation(cfg['accumulate']))
    if cfg['freeze_at']: cbs.append(FreezeAt(cfg['freeze_at']))
    if cfg['smoothing']: cbs.append(ScheduleSmoothing(per_batch=cfg['smoothing'] == 'batch'))
    return cbs


def outcome(learn, run):
    return ([p.detach().clone() for p in learn.model.parameters()], list(run.recorder.losses), run.avg_stats.history,
            [learn.opt.state.get(p, {}).get('momentum_buffer') for p in learn.model.parameters()])


def assert_outcomes_close(a, b, eps):
    for p, q in zip(a[0], b[0]): assert torch.allclose(p, q, atol=eps, rtol=0), (p - q).abs().max()
    assert len(a[1]) == len(b[1]) and all(abs(x - y) <= eps for x, y in zip(a[1], b[1]))
    assert len(a[2]) == len(b[2]) and all(abs(h0[k] - h1[k]) <= eps for h0, h1 in zip(a[2], b[2]) for k in h0)
    for x, y in zip(a[3], b[3]): assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, atol=eps, rtol=0))


def check_fit(cfg, epochs=3):
    torch.compiler.reset()  # each example within torch's recompile limit
    learn = cfg_learner(cfg); run = Runner(cfg_cbs(cfg)); run.fit(epochs, learn)
    eager = outcome(learn, run)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', EagerFallbackWarning)
        learn = cfg_learner(cfg); run = FastRunner(cfg_cbs(cfg), mode=cfg['mode']); run.fit(epochs, learn)
        never_fast = run._step is None or run._step.calls == 0
        assert_outcomes_close(eager, outcome(learn, run), 0 if never_fast else 1e-5)  # all eager: the same operations
        # refused exactly when the eager answer needs it: a parameter without a gradient, or one frozen during the fit
        frozen_later = cfg['freeze_at'] is not None and cfg['freeze_at'] < epochs and cfg['frozen'] is None
        assert (run.why_eager is not None) == bool(cfg['unused'] or cfg['frozen'] == 'in opt' or frozen_later
                                                   or run.why_eager and 'recompile' in run.why_eager), run.why_eager
        # stopped after training batch `stop`, then carried on by a fresh runner and learner
        stop = StopAt(cfg['stop'])
        run = FastRunner(cfg_cbs(cfg) + [stop], mode=cfg['mode']); run.fit(epochs, cfg_learner(cfg))
        state, model_sd, opt_sd = stop.saved
        learn = cfg_learner(cfg)
        learn.model.load_state_dict(model_sd); learn.opt.load_state_dict(opt_sd)
        if cfg['freeze_at'] and state['epoch'] >= cfg['freeze_at']: first_layer(learn.model).requires_grad_(False)  # as it was
        run = FastRunner(cfg_cbs(cfg), mode=cfg['mode']); run.fit(epochs, learn, resume=state)
    assert_outcomes_close(eager, outcome(learn, run), 1e-5)


_PROPERTY = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=100, **_PROPERTY)
@given(fits('func'))
def test_fast_runner_and_its_resume_match_the_eager_runner(cfg): check_fit(cfg)


# ---------------------------------------------------------------- compiled on the CPU (each test compiles: seconds)

def test_a_layer_frozen_by_a_callback_during_the_fit_stays_put_compiled(): check_a_layer_frozen_by_a_callback_during_the_fit_stays_put('compile')


def test_a_parameter_without_a_gradient_is_not_moved_compiled(): check_a_parameter_without_a_gradient_is_not_moved('compile')


def test_resume_stopped_inside_an_accumulation_window_compiled(): check_resume_stopped_inside_an_accumulation_window('compile')


def test_a_layer_the_forward_stops_using_during_the_fit_compiled():
    "A graph traced for the new value of use_extra is probed before it runs, mid-fit."
    check_a_layer_the_forward_stops_using_during_the_fit('compile')


@pytest.mark.parametrize('per_batch', [False, True])
def test_compiled_step_sees_python_values_a_callback_changes(per_batch):
    pair = fit_pair(lambda: [ScheduleSmoothing(per_batch)], mode='compile', loss_func=Smoothing(), momentum=0.9)
    assert_same(pair)
    assert pair[1][2].why_eager is None and pair[1][2].fast.n_graphs >= 3  # one graph per value of eps at least


@pytest.mark.parametrize('bad,at', [(-1, 20), (3, 20), (-1, 0)])   # in the third batch, or in the first (before any graph)
def test_compiled_step_refuses_a_bad_label_with_the_eager_message(bad, at):
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\): got label {bad} with n_classes=3"):
        Runner().fit(1, labels_with(bad, at))
    learn = labels_with(bad, at)
    run = FastRunner([Recorder()], mode='compile')
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\): got label {bad} with n_classes=3"):
        run.fit(1, learn)
    assert len(run.recorder.losses) == at // 8  # the batches before the bad one, trained
    ref = labels_with(bad, at)
    with pytest.raises(ValueError): Runner().fit(1, ref)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_compiled_step_refuses_a_bad_label_for_torchs_loss_too():
    "torch's cross entropy refuses -1 eagerly (-100 is its ignore_index); compiled, it would take -1 as the last class."
    with pytest.raises(IndexError, match="Target -1 is out of bounds"): Runner().fit(1, labels_with(-1, loss_func=F.cross_entropy))
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        FastRunner([Recorder()], mode='compile').fit(1, labels_with(-1, loss_func=F.cross_entropy))
    pair = [labels_with(-100, loss_func=F.cross_entropy) for _ in range(2)]
    Runner().fit(1, pair[0]); FastRunner(mode='compile').fit(1, pair[1])  # ignored, in both
    for p, q in zip(*(l.model.parameters() for l in pair)): assert torch.allclose(p, q, atol=1e-6, rtol=0)


@settings(max_examples=5, **_PROPERTY)
@given(fits('compile'))
def test_compiled_fast_runner_and_its_resume_match_the_eager_runner(cfg): check_fit(cfg, epochs=2)



def test_compiled_one_cycle_with_a_partial_batch_matches_and_compiles_two_graphs_once():
    nf = []
    def cbs():
        nf.append(NonFinite())
        return [*one_cycle(0.3), nf[-1]]
    pair = fit_pair(cbs, epochs=3, mode='compile', momentum=0.9)
    assert_same(pair)
    learn, rec, run = pair[1]
    step = run.fast
    assert step.n_graphs == 2 and step.calls == 21 and step.compile_seconds > 0  # batches of 8 and of 2, compiled in epoch 1
    assert bool(nf[-1].flag) is False
    run.fit(2, learn)  # a second fit of the same model and callbacks reuses the step: nothing recompiles
    assert run.fast is step and step.n_graphs == 2 and step.calls == 35


def test_compiled_gradient_accumulation_matches():
    make_cbs, kw = SCHEDULES['gradient accumulation']
    pair = fit_pair(make_cbs, epochs=2, mode='compile', **kw)
    assert_same(pair)
    assert pair[1][2].fast.n_graphs == 3  # accumulate (8), step (8), step (the last batch, 2)


def branchy_loss(out, yb):
    "A loss that reads its labels' values on the host (a branch on the data): torch.compile can make no single graph of it."
    if bool((yb < 0).any()): raise ValueError('negative label')
    return cross_entropy(out, yb)


def test_a_loss_that_cannot_be_compiled_falls_back_to_eager_with_the_same_result():
    learn, ref = tiny_learner(loss_func=branchy_loss, momentum=0.9), tiny_learner(loss_func=branchy_loss, momentum=0.9)
    run = FastRunner([Recorder()], mode='compile')
    with pytest.warns(EagerFallbackWarning, match='the step could not be compiled'):
        run.fit(1, learn)
    assert run.fast is None
    Runner([Recorder()]).fit(1, ref)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.equal(p, q)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()):  # no stray momentum buffer from the failed try
        assert torch.equal(learn.opt.state[p]['momentum_buffer'], ref.opt.state[q]['momentum_buffer'])


def test_a_step_that_torch_compile_runs_uncompiled_goes_eager_without_a_double_step():
    "When torch.compile runs the function as it is (its recompile limit, or a stance), the batch counts once."
    learn, ref = tiny_learner(momentum=0.9), tiny_learner(momentum=0.9)
    run = FastRunner([AvgStatsCallback(report=None), Recorder()], mode='compile')
    with torch.compiler.set_stance('force_eager'), pytest.warns(EagerFallbackWarning, match='without compiling it'):
        run.fit(2, learn)
    assert run.fast is None and len(run.recorder.losses) == 14
    Runner([AvgStatsCallback(report=None)]).fit(2, ref)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.allclose(p, q, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- CUDA (skipped without it)

@CUDA
@pytest.mark.parametrize('name, n_graphs', [('one-cycle lr and momentum', 2), ('gradient accumulation', 3)])
def test_cuda_graph_matches_the_eager_runner(name, n_graphs):
    make_cbs, kw = SCHEDULES[name]
    pair = fit_pair(make_cbs, epochs=4, mode='cuda_graph', device='cuda', **kw)
    assert_same(pair)
    step = pair[1][2].fast
    # one graph per kind of batch (size 8, the last of 2; accumulating or stepping), each captured once, after two
    # eager warm-up steps of that kind: the last batch's graph in epoch 3, replayed in epoch 4
    assert step.mode == 'cuda_graph' and step.n_graphs == n_graphs
    losses = pair[1][1].losses
    assert len(set(losses)) == len(losses)  # the recorded losses are copies, not the graph's output overwritten


@CUDA
def test_cuda_auto_is_cuda_graph_and_compile_works_too():
    run = FastRunner([Recorder()])
    run.fit(1, tiny_learner(device='cuda'))
    assert run.fast.mode == 'cuda_graph'
    pair = fit_pair(lambda: one_cycle(0.3), epochs=2, mode='compile', device='cuda', momentum=0.9)
    assert_same(pair)


def test_lesson9_cross_entropy_compiles_into_the_step():
    "Its label check reads the labels on the CPU; while torch.compile traces, the indexing does the checking instead."
    learn, ref = tiny_learner(loss_func=cross_entropy), tiny_learner(loss_func=cross_entropy)
    run = FastRunner([Recorder()], mode='compile')
    run.fit(1, learn)
    assert run.why_eager is None and run.fast is not None and run.fast.n_graphs >= 1
    Runner([Recorder()]).fit(1, ref)
    for p, q in zip(learn.model.parameters(), ref.model.parameters()): assert torch.allclose(p, q, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- torch's compile cache across CPU kernels

_COMPILE_IN_A_PROCESS = r'''
import json, sys, torch, torch.nn.functional as F
from torch import nn
from lesson9.callbacks import AvgStatsCallback, DataBunch, Learner, Runner
from lesson9.fast import FastRunner
from lesson9.training import SGD, DataLoader, Dataset, accuracy
torch.set_num_threads(1)
def learner():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 5, generator=g), torch.randint(0, 3, (70,), generator=g)
    data = DataBunch(DataLoader(Dataset(x[:50], y[:50]), 8), DataLoader(Dataset(x[50:], y[50:]), 16), c=3)
    torch.manual_seed(0); model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    return Learner(model, SGD(model.parameters(), lr=0.1), F.cross_entropy, data)
res = {}
for name, run in (('eager', Runner([AvgStatsCallback([accuracy], report=None)])),
                  ('fast', FastRunner([AvgStatsCallback([accuracy], report=None)], mode='compile'))):
    learn = learner(); run.fit(2, learn)
    res[name] = torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist()
res['why_eager'] = run.why_eager
print(json.dumps(res))
'''

@pytest.mark.parametrize('capability', ['default', 'avx2'])
def test_compiled_step_is_never_taken_from_a_cache_made_for_other_cpu_kernels(tmp_path, capability):
    "Compiled under this CPU's kernels, then under ATEN_CPU_CAPABILITY=`capability`, sharing torch's cache on disk: both compile and match eager."
    import json, os, subprocess, sys
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    if pick_vec_isa().bit_width() == 0: pytest.skip("this CPU has no vector kernels for inductor: nothing else to cache")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path/'cache'), OMP_NUM_THREADS='1')
    runs = []
    for cap in (None, capability):  # the first fills the cache; the second would find its graphs there
        e = dict(env, **({'ATEN_CPU_CAPABILITY': cap} if cap else {}))
        r = subprocess.run([sys.executable, '-c', _COMPILE_IN_A_PROCESS], env=e, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.splitlines()[-1]))
    for res in runs:
        assert res['why_eager'] is None, res['why_eager']  # it compiled
        assert all(math.isfinite(v) for v in res['fast'])
        assert max(abs(a - b) for a, b in zip(res['fast'], res['eager'])) < 1e-5


def test_a_build_that_fails_in_the_cache_is_compiled_again_in_a_fresh_one(monkeypatch, tmp_path):
    "A first compile that fails where torch's cache is (as with a library cut to 0 bytes by a Ctrl-C) is tried again in a fresh cache."
    import os
    from lesson9.fast import CompileCacheWarning, FastStep
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path/'broken'))
    monkeypatch.setattr(FastRunner, '_fresh_cache', None)
    real = FastStep._backend
    def backend(self, gm, example_inputs):
        if os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path/'broken'):
            raise RuntimeError(f"ImportError: {tmp_path/'broken'/'x.so'}: file too short")
        return real(self, gm, example_inputs)
    monkeypatch.setattr(FastStep, '_backend', backend)
    with pytest.warns(CompileCacheWarning, match=r"compile cache .*broken gave a broken build .*file too short.*compiled again in a fresh cache"):
        pair = fit_pair(lambda: [], mode='compile')
    assert pair[1][2].why_eager is None and pair[1][2].fast.n_graphs == 2   # compiled, in the fresh cache
    assert_same(pair)
    fresh = os.environ['TORCHINDUCTOR_CACHE_DIR']
    assert fresh == FastRunner._fresh_cache and fresh != str(tmp_path/'broken')
    __import__('shutil').rmtree(fresh, ignore_errors=True)


def test_a_build_that_fails_anywhere_runs_eagerly_with_its_whole_reason(monkeypatch, tmp_path):
    import os
    from lesson9.fast import FastStep
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path/'cache'))
    monkeypatch.setattr(FastRunner, '_fresh_cache', None)
    def backend(self, gm, example_inputs): raise RuntimeError("backend raised:\nCppCompileError: no compiler here")
    monkeypatch.setattr(FastStep, '_backend', backend)
    with pytest.warns(EagerFallbackWarning, match='CppCompileError: no compiler here'):
        pair = fit_pair(lambda: [], mode='compile')
    assert 'backend raised: CppCompileError: no compiler here' in pair[1][2].why_eager
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(tmp_path/'cache')   # the user's cache, kept
    assert_same(pair)


def test_the_reason_for_running_eagerly_keeps_its_cause():
    from lesson9.fast import _reason
    e = RuntimeError("backend='_backend' raised:\nImportError: /c/x.so: file too short\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    assert _reason(e) == "RuntimeError: backend='_backend' raised: ImportError: /c/x.so: file too short"

