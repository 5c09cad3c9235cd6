"""lesson9.anneal as a package: the LR finder leaves no trace (our SGD, torch's SGD and Adam; fresh or warm state;
even when training fails), ParamScheduler with torch's optimizers and per-group schedules, a Recorder and one-cycle
schedulers that never sync with the device per batch, plots that never touch pyplot, and the per-batch cost."""
import copy, functools, math

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from lesson9.anneal import (LRFinder, LRFindResult, ParamScheduler, Recorder, combine_scheds, cos_1cycle_anneal,
                            lr_find, one_cycle, one_cycle_scheds, plot_scheds, save_figure, sched_cos, sched_exp,
                            sched_lin, sched_no)
from lesson9.callbacks import Callback, DataBunch, Learner, Runner, get_runner
from lesson9.training import SGD, DataLoader, Dataset, Optimizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n_train=96, n_valid=32, bs=8, n_in=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, n_in, generator=g)
    y = (x[:, :c].argmax(1) + (torch.rand(len(x), generator=g) < 0.1).long()) % c  # learnable, with some noise
    train, valid = Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:])
    return DataBunch(DataLoader(train, bs, shuffle=True, seed=seed), DataLoader(valid, 2*bs), c=c)


def _learner(opt_func=functools.partial(SGD, lr=0.1), seed=0, groups=False, bn=False, **kw):
    data = _data(**kw)
    torch.manual_seed(seed)
    n_in = data.train_ds.x.shape[1]
    layers = [nn.Linear(n_in, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, data.c)]
    model = nn.Sequential(*layers)
    params = ([{'params': model[:-1].parameters()}, {'params': model[-1].parameters()}] if groups else model.parameters())
    return Learner(model, opt_func(params), F.cross_entropy, data)


def _bytes(t): return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a, b):
    "Equal structure and values; tensors bit for bit (dtype, shape and bytes)."
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and _bytes(a) == _bytes(b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _warm_up(learn, epochs=1):
    get_runner(report=None).fit(epochs, learn)


def _state(learn):
    m = learn.model
    return dict(params=[p.detach().clone() for p in m.parameters()],
                model=copy.deepcopy(m.state_dict()),
                grads=[None if p.grad is None else p.grad.clone() for p in m.parameters()],
                modes=[x.training for x in m.modules()],
                param_ids=[id(p) for p in m.parameters()],
                opt=copy.deepcopy(learn.opt.state_dict()))


def _check_same_state(learn, before):
    after = _state(learn)
    assert after['param_ids'] == before['param_ids'], "the parameters were replaced, not restored in place"
    for p, q in zip(after['params'], before['params']): assert torch.equal(p, q) and _bytes(p) == _bytes(q)
    assert _same(after['model'], before['model'])  # parameters and buffers (BatchNorm running stats, its counter)
    assert _same(after['grads'], before['grads'])
    assert after['modes'] == before['modes']
    assert _same(after['opt'], before['opt']), (after['opt'], before['opt'])
    # the optimizer still drives the model's own parameters
    opt_params = [p for g in learn.opt.param_groups for p in g['params']]
    assert [id(p) for p in opt_params] == before['param_ids']


OPTS = {'ours SGD momentum': functools.partial(SGD, lr=0.1, momentum=0.9),
        'ours Optimizer': functools.partial(Optimizer, lr=0.1),
        'torch SGD momentum': functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
        'torch Adam': functools.partial(torch.optim.Adam, lr=1e-3)}


@pytest.mark.parametrize('warm', [False, True], ids=['fresh', 'warm'])
@pytest.mark.parametrize('opt', list(OPTS))
def test_lr_finder_restores_model_and_optimizer_exactly(opt, warm):
    learn = _learner(OPTS[opt], groups=True, bn=True)
    if warm: _warm_up(learn)
    learn.model.eval()  # a mode the finder must restore, since training switches it
    before = _state(learn)
    if warm and 'momentum' in opt: assert len(before['opt']['state']) == 6  # a momentum buffer per parameter
    res = lr_find(learn, max_iter=30)
    assert len(res.lrs) >= 5
    _check_same_state(learn, before)


def test_lr_finder_restores_gradients_left_by_the_user():
    learn = _learner(OPTS['torch SGD momentum'])
    _warm_up(learn)
    xb, yb = next(iter(learn.data.train_dl))
    F.cross_entropy(learn.model(xb), yb).backward()  # gradients the user has not stepped with yet
    before = _state(learn)
    assert all(g is not None for g in before['grads'])
    lr_find(learn, max_iter=20)
    _check_same_state(learn, before)


class Boom(Callback):
    "Raises at the `at`-th training batch."
    def __init__(self, at): self.at, self.n = at, 0
    def after_step(self):
        self.n += 1
        if self.n == self.at: raise RuntimeError('boom at batch %d' % self.n)


def test_lr_finder_restores_even_when_training_fails():
    learn = _learner(OPTS['ours SGD momentum'])
    _warm_up(learn)
    before = _state(learn)
    with pytest.raises(RuntimeError, match='boom at batch 5'): lr_find(learn, max_iter=30, cbs=[Boom(5)])
    _check_same_state(learn, before)


class CountBatches(Callback):
    _order = 5
    def begin_fit(self): self.train = self.valid = 0
    def after_loss(self):
        if self.run.in_train: self.train += 1
        else: self.valid += 1


def test_lr_finder_curve_schedule_and_no_validation():
    learn = _learner(OPTS['ours SGD momentum'])  # 12 batches an epoch: 30 need 3 epochs
    count = CountBatches()
    res = lr_find(learn, max_iter=30, min_lr=1e-4, max_lr=1e-2, cbs=[count])
    assert res.stop_reason == 'max_iter' and len(res.lrs) == len(res.losses) == 30
    assert res.lrs == [sched_exp(1e-4, 1e-2)(k/29) for k in range(30)]
    assert res.lrs[0] == 1e-4 and res.lrs[-1] == 1e-2
    assert count.train == 30 and count.valid == 0
    assert all(math.isfinite(v) for v in res.losses)
    assert res.lrs[0] <= res.suggestion <= res.lrs[-1] and res.lrs[0] <= res.lr_min*10 <= res.lrs[-1]


def test_lr_finder_stops_on_divergence():
    learn = _learner(OPTS['ours SGD momentum'])
    res = lr_find(learn, max_iter=200, min_lr=1e-3, max_lr=1e6)
    assert res.stop_reason in ('diverged', 'not finite'), res.stop_reason
    assert len(res.lrs) < 200
    if res.stop_reason == 'diverged': assert res.losses[-1] > 10*min(res.losses[:-1])
    assert all(v <= 10*min(res.losses[:i+1]) for i, v in enumerate(res.losses[:-1]))  # it did not go on after
    assert res.suggestion < res.lrs[-1]


def test_lr_finder_stops_on_a_non_finite_loss():
    def nan_after(n):
        calls = [0]
        def loss(pred, yb):
            calls[0] += 1
            out = F.cross_entropy(pred, yb)
            return out * math.nan if calls[0] > n else out
        return loss
    learn = _learner(OPTS['torch SGD momentum'])
    learn.loss_func = nan_after(7)
    before = _state(learn)
    res = lr_find(learn, max_iter=50)
    assert res.stop_reason == 'not finite' and len(res.lrs) == len(res.losses) == 7
    _check_same_state(learn, before)


def test_lr_finder_out_of_data_and_bad_arguments():
    learn = _learner(OPTS['ours SGD momentum'])
    finder = LRFinder(max_iter=100, max_lr=1e-2)
    Runner([finder]).fit(1, learn)  # one epoch of 12 batches: fewer than max_iter
    assert finder.result.stop_reason == 'out of data' and len(finder.result.lrs) == 12
    for kw, msg in [(dict(max_iter=1), 'max_iter=1'), (dict(min_lr=0), 'min_lr=0'), (dict(min_lr=1., max_lr=0.5), 'min_lr=1.0'),
                    (dict(div_thresh=1), 'div_thresh=1')]:
        with pytest.raises(ValueError, match=msg): LRFinder(**kw)
    empty = LRFindResult([], [], 'not finite')
    with pytest.raises(ValueError, match='no batch'): empty.plot()
    with pytest.raises(ValueError, match='no batch'): empty.suggestion


def test_lr_finder_plot(tmp_path):
    res = lr_find(_learner(OPTS['ours SGD momentum']), max_iter=30)
    n_figs = plt.get_fignums()
    fig = res.plot(path=tmp_path/'lr_find.png')
    assert isinstance(fig, Figure) and plt.get_fignums() == n_figs
    assert (tmp_path/'lr_find.png').read_bytes()[:4] == b'\x89PNG'
    assert [p.name for p in tmp_path.iterdir()] == ['lr_find.png']


# ---------------------------------------------------------------- ParamScheduler


class Seen(Callback):
    "Records every param group's hyper-parameters at after_loss of each training batch."
    _order = 5
    def __init__(self, *keys): self.keys, self.rows = keys, []
    def after_loss(self):
        if self.run.in_train: self.rows.append([tuple(g[k] for k in self.keys) for g in self.run.opt.param_groups])


def test_param_scheduler_per_group_and_positions():
    learn = _learner(OPTS['torch SGD momentum'], groups=True)
    seen = Seen('lr', 'momentum', 'weight_decay')
    scheds = [ParamScheduler('lr', [sched_lin(0.1, 0.2), sched_cos(1., 0.)]), ParamScheduler('momentum', sched_no(0.8, 0)),
              ParamScheduler('weight_decay', combine_scheds([0.5, 0.5], [sched_no(0., 0.), sched_no(1e-3, 0)]))]
    Runner(scheds + [seen]).fit(2, learn)
    n = len(seen.rows)
    assert n == 24
    for k, row in enumerate(seen.rows):
        pos = k/(n - 1)
        assert row[0] == (sched_lin(0.1, 0.2)(pos), 0.8, 0. if pos < 0.5 else 1e-3)
        assert row[1] == (sched_cos(1., 0.)(pos), 0.8, 0. if pos < 0.5 else 1e-3)
    assert seen.rows[0][0][0] == 0.1 and seen.rows[-1][0][0] == 0.2 and seen.rows[-1][1][0] == 0.


def test_param_scheduler_sets_the_start_value_at_begin_fit():
    learn = _learner(OPTS['ours SGD momentum'])
    class Probe(Callback):
        _order = 5
        def begin_fit(self): self.lr = self.run.opt.param_groups[0]['lr']
    probe = Probe()
    Runner([ParamScheduler('lr', sched_lin(0.03, 0.3)), probe]).fit(1, learn)
    assert probe.lr == 0.03


@pytest.mark.parametrize('opt', ['torch Adam', 'torch AdamW'])
def test_momentum_schedules_betas_of_adam(opt):
    make = {'torch Adam': torch.optim.Adam, 'torch AdamW': torch.optim.AdamW}[opt]
    learn = _learner(functools.partial(make, lr=1e-3, betas=(0.9, 0.995)))
    seen = Seen('betas', 'lr')
    Runner(one_cycle(1e-2) + [seen]).fit(1, learn)
    betas = [row[0][0] for row in seen.rows]
    assert betas[0] == (0.95, 0.995) and betas[-1] == (0.95, 0.995)
    assert min(b[0] for b in betas) < 0.86 and all(b[1] == 0.995 for b in betas)
    assert seen.rows[0][0][1] == 1e-2/25 and seen.rows[-1][0][1] == 1e-2/1e4


def test_param_scheduler_errors():
    learn = _learner(functools.partial(Optimizer, lr=0.1), groups=True)
    with pytest.raises(ValueError, match=r"Optimizer has no hyper-parameter 'momentum'.*param groups have: lr"):
        Runner(one_cycle(0.1)).fit(1, learn)
    with pytest.raises(ValueError, match='got 3 schedule functions for 2 param groups'):
        Runner([ParamScheduler('lr', [sched_no(1, 1)]*3)]).fit(1, learn)
    with pytest.raises(TypeError, match='got 0.1'): ParamScheduler('lr', [sched_no(1, 1), 0.1])
    with pytest.raises(ValueError, match='empty list'): ParamScheduler('lr', [])
    learn = _learner(OPTS['torch SGD momentum'])
    with pytest.raises(ValueError, match=r"SGD has no hyper-parameter 'wd'.*weight_decay"):
        Runner([ParamScheduler('wd', sched_no(0, 0))]).fit(1, learn)


def test_two_schedulers_have_their_own_names():
    run = Runner(one_cycle(0.1))
    assert run.lr_scheduler.pname == 'lr' and run.momentum_scheduler.pname == 'momentum'


# ---------------------------------------------------------------- Recorder, and no host sync per batch


def test_recorder_and_schedulers_never_sync_per_batch(monkeypatch):
    learn = _learner(OPTS['torch SGD momentum'], n_train=800, bs=2)  # 400 batches: two loss chunks of 256 and the rest
    rec, truth = Recorder(), []
    class Truth(Callback):
        _order = 9
        def after_loss(self):
            if self.run.in_train: truth.append(float(self.run.loss.detach()))
    run = Runner([rec] + one_cycle(0.1))
    calls = []
    def forbid(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"Tensor.{name} called during fit: a host sync")
        return f
    with monkeypatch.context() as m:
        for name in ('item', 'tolist', '__float__', '__bool__', '__int__', 'numpy', 'cpu'):
            m.setattr(torch.Tensor, name, forbid(name))
        run.fit(1, learn)
    assert not calls
    # the same run again with a callback that reads each loss, for the ground truth
    learn2 = _learner(OPTS['torch SGD momentum'], n_train=800, bs=2)
    rec2 = Recorder()
    Runner([rec2, Truth()] + one_cycle(0.1)).fit(1, learn2)
    assert len(rec.losses) == 400 and rec.losses == rec2.losses == truth
    assert rec.lrs == rec2.lrs and len(rec.lrs[0]) == 400
    sched = one_cycle_scheds(0.1)['lr']
    assert rec.lrs[0] == [sched(k/399) for k in range(400)]


def test_recorder_keeps_every_param_group_and_tensor_lrs():
    learn = _learner(OPTS['ours SGD momentum'], groups=True)
    rec = Recorder()
    Runner([rec, ParamScheduler('lr', [sched_lin(0.1, 0.2), sched_lin(0.01, 0.02)])]).fit(1, learn)
    assert len(rec.lrs) == 2 and rec.lrs[0][0] == 0.1 and rec.lrs[1][-1] == 0.02
    # an lr held as a tensor and changed in place is copied, not aliased
    learn = _learner(functools.partial(torch.optim.SGD, lr=torch.tensor(0.1)))
    class Halve(Callback):
        _order = 9
        def after_step(self): self.run.opt.param_groups[0]['lr'].mul_(0.5)
    rec = Recorder()
    Runner([rec, Halve()]).fit(1, learn)
    assert rec.lrs[0][:3] == [float(torch.tensor(v)) for v in (0.1, 0.05, 0.025)]


def test_recorder_resets_at_each_fit_and_skips_validation():
    learn = _learner()
    rec = Recorder()
    run = Runner([rec])
    run.fit(2, learn)
    assert len(rec.losses) == 24
    run.fit(1, learn)
    assert len(rec.losses) == 12 and len(rec.lrs[0]) == 12


def test_plots_return_figures_and_save_atomically(tmp_path):
    learn = _learner(groups=True)
    rec = Recorder()
    Runner([rec, ParamScheduler('lr', sched_cos(0.01, 0.1))]).fit(1, learn)
    n_figs = plt.get_fignums()
    figs = [rec.plot_lr(path=tmp_path/'lr.png'), rec.plot_lr(0), rec.plot_loss(skip_last=2, path=tmp_path/'loss.png'),
            rec.plot_lr_loss(pgid=1, path=tmp_path/'lr_loss.svg'),
            plot_scheds(one_cycle([0.1, 0.2]), path=tmp_path/'scheds.png'),
            plot_scheds({'lr': cos_1cycle_anneal(1, 2, 0)[0]}, n=11)]
    assert all(isinstance(f, Figure) for f in figs) and plt.get_fignums() == n_figs
    assert sorted(p.name for p in tmp_path.iterdir()) == ['loss.png', 'lr.png', 'lr_loss.svg', 'scheds.png']
    assert (tmp_path/'lr.png').read_bytes()[:4] == b'\x89PNG' and b'<svg' in (tmp_path/'lr_loss.svg').read_bytes()[:500]
    assert len(figs[2].axes[0].lines[0].get_ydata()) == 10  # 12 batches, 2 skipped
    with pytest.raises(ValueError, match='pgid=2'): rec.plot_lr(2)
    with pytest.raises(ValueError, match='skip_last=-1'): rec.plot_loss(-1)
    with pytest.raises(ValueError, match='nothing to plot'): Recorder().plot_lr()
    with pytest.raises(ValueError, match='n=1'): plot_scheds({'lr': sched_no(1, 1)}, n=1)
    # a failed save leaves the old file and no temporary behind
    old = (tmp_path/'lr.png').read_bytes()
    with pytest.raises(ValueError): save_figure(figs[0], tmp_path/'lr.nosuchformat')
    assert (tmp_path/'lr.png').read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ['loss.png', 'lr.png', 'lr_loss.svg', 'scheds.png']


# ---------------------------------------------------------------- schedules


def test_combine_scheds_at_float32_rounded_positions():
    "pos computed in float32 lands within an ulp of each boundary: never an error, never a jump."
    sched = combine_scheds([0.25, 0.25, 0.5], [sched_lin(0, 1), sched_cos(1, 3), sched_exp(3, 0.5)])
    for total in (7, 10, 33, 101, 294, 1000):
        prev = None
        for k in range(total):
            for pos in (k/(total - 1), torch.tensor(k/(total - 1), dtype=torch.float32),
                        torch.tensor(k, dtype=torch.float32)/(total - 1)):
                v = sched(pos)
                assert isinstance(v, float) and 0 <= v <= 3 + 1e-12
            if prev is not None: assert abs(v - prev) <= 1.01*4*math.pi/(total - 1)  # the steepest phase's slope (4 pi), float32 slack: no jump
            prev = v
        assert sched(torch.tensor(1.)) == 0.5


def test_one_cycle_arguments():
    assert [cb.pname for cb in one_cycle(0.1)] == ['lr', 'momentum']
    s = one_cycle_scheds(0.1, pct_start=0.25, div=10, final_div=100, moms=(0.9, 0.8, 0.85))
    assert (s['lr'](0), s['lr'](0.25), s['lr'](1)) == (0.01, 0.1, 0.001)
    assert (s['momentum'](0), s['momentum'](0.25), s['momentum'](1)) == (0.9, 0.8, 0.85)
    assert one_cycle_scheds(1., pct_start=1)['lr'](1) == 1.  # all warm-up
    for kw, msg in [(dict(lr_max=-1), 'lr_max=-1'), (dict(lr_max=[]), r'got \[\]'), (dict(lr_max=0.1, div=0), 'div=0'),
                    (dict(lr_max=0.1, final_div=math.inf), 'final_div=inf'), (dict(lr_max=0.1, moms=(0.9, 0.8, 1.0)), 'moms=')]:
        with pytest.raises(ValueError, match=msg): one_cycle(**kw)




def test_lr_finder_after_an_earlier_callback_failed_at_begin_fit():
    class FailEarly(Callback):
        _order = -5
        def begin_fit(self): raise RuntimeError('no device')
    learn = _learner(OPTS['ours SGD momentum'])
    before = _state(learn)
    finder = LRFinder(max_iter=10)
    with pytest.raises(RuntimeError, match='no device') as e: Runner([FailEarly(), finder]).fit(1, learn)
    assert not getattr(e.value, '__notes__', None)  # the finder's after_fit did not fail too
    assert finder.result is None
    _check_same_state(learn, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_recorder_and_schedulers_do_not_sync_with_cuda():
    "With CUDA's sync debug mode on 'error', any synchronizing call in the per-batch handlers raises."
    learn = _learner(OPTS['torch SGD momentum'])
    learn.model.cuda()
    cbs = [Recorder()] + one_cycle(0.1)
    run = Runner(cbs)
    run.learn, run.epochs, run.in_train = learn, 1, True
    for cb in cbs: cb.begin_fit()
    losses = torch.rand(600, device='cuda')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for k in range(600):
            run.pos, run.loss = k/599, losses[k]
            for h in (cbs[1].begin_batch, cbs[2].begin_batch, cbs[0].after_loss): h()
    finally: torch.cuda.set_sync_debug_mode('default')
    assert cbs[0].losses == losses.tolist()
    run.learn = None


# ---------------------------------------------------------------- edges: argument checks, validation, thresholds

def test_sched_exp_refuses_either_end_not_positive():
    for start, end in ((0., 1.), (1., 0.), (-1., 1.), (1., -2.)):
        with pytest.raises(ValueError, match=f'start={start!r}, end={end!r}'): sched_exp(start, end)(0.5)


def test_param_scheduler_leaves_validation_alone():
    "Only training batches are scheduled: a value set for validation (here at begin_validate) stays."
    learn = _learner(OPTS['ours SGD momentum'])
    class ValidLr(Callback):
        _order = 5
        def begin_fit(self): self.seen = []
        def begin_validate(self): self.run.opt.param_groups[0]['lr'] = 123.
        def after_pred(self):
            if not self.in_train: self.seen.append(self.run.opt.param_groups[0]['lr'])
    probe = ValidLr()
    Runner([ParamScheduler('lr', sched_lin(0.01, 0.1)), probe]).fit(2, learn)
    assert probe.seen == [123.] * 2 * len(learn.data.valid_dl)


def test_lr_finder_diverges_only_above_the_threshold():
    "A loss of exactly div_thresh times the best is not divergence yet; the first loss above it is, and is kept."
    vals = iter([1., 10., 10.5] + [1.] * 20)
    learn = _learner(OPTS['ours SGD momentum'])
    learn.loss_func = lambda pred, yb: pred.sum() * 0 + next(vals)
    res = lr_find(learn, max_iter=20, div_thresh=10.)
    assert res.stop_reason == 'diverged' and res.losses == [1., 10., 10.5]


def test_lr_find_result_suggestions_by_hand():
    r = LRFindResult(lrs=[1e-3, 1e-2, 1e-1, 1.], losses=[2., 1., 3., 9.], stop_reason='diverged')
    sm = r.smoothed()
    assert sm[0] == 2. and min(range(4), key=sm.__getitem__) == 1  # the smoothed minimum at batch 1: too early for a slope
    assert r.lr_min == 1e-2 / 10 and r.lr_steep is None and r.suggestion == r.lr_min
