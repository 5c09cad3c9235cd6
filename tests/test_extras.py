"""lesson9.extras (08a): early stopping and the best model, mixed precision, the live loss plot.

- `EarlyStopping` stops at the right epoch on constructed metric sequences, `min` and `max`;
  `BestModel` holds the weights of the best epoch, bit for bit;
- bf16 ends as good as fp32 over seeds (a stated tolerance); fp16 is refused on the CPU, and runs
  with its scaler on CUDA (skipped without a GPU);
- a fit stopped mid-epoch and resumed from its checkpoint ends bit-identical to one that never
  stopped, with each feature on;
- two processes (gloo, CPU) stop at the same epoch, as one process does;
- `ProgressCallback(plot=True)` draws an image in a Jupyter kernel, and nothing in a pipe.
"""
import json, math, multiprocessing, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
import lesson9.callbacks as callbacks
from lesson9.callbacks import (AvgStatsCallback, Callback, DataBunch, DeviceCallback, InvariantsCallback, Learner,
                               get_model, get_runner)
from lesson9.checkpoint import Checkpoint, load_checkpoint
from lesson9.data import get_data
from lesson9.distributed import DistributedCallback, distributed
from lesson9.extras import BestModel, EarlyStopping, MixedPrecision, ProgressCallback, TrackBest, improves
from lesson9.fast import FastRunner
from lesson9.training import Dataset, cross_entropy, get_dls

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
X, Y, XV, YV = get_data()


def learner(seed=0, n=512, lr=0.5, device='cpu'):
    torch.manual_seed(seed)
    data = DataBunch(*get_dls(Dataset(X[:n].to(device), Y[:n].to(device)), Dataset(XV[:500].to(device), YV[:500].to(device)), 64, seed=seed), c=10)
    return Learner(*get_model(data, lr=lr), cross_entropy, data)


class Scripted(Callback):
    "Replaces `key` in each epoch's record by the next value of `values`."
    _order = 1
    def __init__(self, values, key='valid_loss'): self.values, self.key = values, key
    def after_epoch(self): self.run.avg_stats.history[-1][self.key] = self.values[self.run.epoch]


# ---------------------------------------------------------------- early stopping, best model

@pytest.mark.parametrize('values,key,mode,patience,min_delta,epochs,best_epoch', [
    ([5., 4., 4.5, 4.2, 3., 3.5, 3.2, 3.1], 'valid_loss', 'min', 2, 0., 4, 2),     # 4.5 and 4.2 do not beat 4
    ([5., 4., 4.5, 3., 3.5, 3.2, 3.1, 2.], 'valid_loss', 'min', 3, 0., 7, 4),      # three stalls after epoch 4
    ([.5, .6, .55, .7, .69, .71, .7, .7], 'valid_acc', 'max', 2, 0., 8, 6),        # higher is better; the last epoch ends the fit anyway
    ([.5, .6, .55, .7, .69, .71, .7, .7], 'valid_acc', 'max', 2, .05, 6, 4),       # .71 is within min_delta of .7
    ([1., math.nan, math.nan, .5, .4, .3, .2, .1], 'valid_loss', 'min', 2, 0., 3, 1),  # NaN never improves
    ([math.nan]*8, 'valid_loss', 'min', 1, 0., 1, None),
])
def test_stops_at_the_right_epoch(one_thread, values, key, mode, patience, min_delta, epochs, best_epoch):
    es, inv = EarlyStopping(key, mode, patience, min_delta), InvariantsCallback()
    run = get_runner([Scripted(values, key), es, inv], report=None)
    run.fit(8, learner(n=128))
    assert len(run.avg_stats.history) == epochs
    assert es.best_epoch == best_epoch
    assert (es.stopped is None) == (epochs == 8 and es.wait < patience)
    if es.stopped is not None: assert es.stopped['epoch'] == epochs and es.wait == patience
    assert inv.events[-1] == 'after_fit'


def test_improves():
    assert improves(.9, 1.) and not improves(1., 1.) and not improves(.95, 1., min_delta=.05) and improves(.94, 1., min_delta=.05)
    assert improves(1.1, 1., 'max') and not improves(1., 1., 'max') and improves(0., None) and not improves(math.nan, None)


def test_bad_settings_are_refused():
    for make, msg in ((lambda: EarlyStopping(patience=0), "patience must be an int >= 1, got 0"),
                      (lambda: EarlyStopping(mode='up'), "mode must be 'min' or 'max', got 'up'"),
                      (lambda: BestModel(min_delta=-1), "min_delta must be a number >= 0, got -1")):
        with pytest.raises(ValueError, match=msg): make()
    with pytest.raises(KeyError, match="no 'valid_accuracy' in the epoch's record"):
        get_runner([EarlyStopping('valid_accuracy')], report=None).fit(1, learner(n=128))


class EveryEpoch(Callback):
    def begin_fit(self): self.saved = []
    def after_epoch(self): self.saved.append({k: v.clone() for k, v in self.run.model.state_dict().items()})


@pytest.mark.parametrize('monitor,mode', [('valid_loss', 'min'), ('valid_acc', 'max')])
def test_best_model_holds_the_weights_of_the_best_epoch(one_thread, monitor, mode):
    bm, ee = BestModel(monitor, mode), EveryEpoch()
    run = get_runner([bm, ee], report=None)
    run.fit(6, learner(n=1024, lr=1.5))  # a high lr: the metric goes up and down
    values = [r[monitor] for r in run.avg_stats.history]
    pick = min if mode == 'min' else max
    best = values.index(pick(values))  # the first of equal values: a later equal one is no improvement
    assert bm.best_epoch == best + 1 and bm.best == values[best]
    assert bm.weights.keys() == ee.saved[best].keys()
    assert all(torch.equal(bm.weights[k], ee.saved[best][k]) for k in bm.weights)


# ---------------------------------------------------------------- mixed precision

BF16_SEEDS, BF16_ACC_TOL, BF16_LOSS_TOL = range(5), 0.01, 0.01  # measured gaps over 6 seeds: <= 0.0025 and <= 0.001

def _final(seed, precision, device='cpu'):
    run = get_runner(([MixedPrecision(precision)] if precision != 'fp32' else []) + [DeviceCallback(device)], report=None)
    run.fit(2, learner(seed, n=4000, lr=0.2))
    return run.avg_stats.history[-1]


def test_bf16_trains_as_well_as_fp32(one_thread):
    for seed in BF16_SEEDS:
        a, b = _final(seed, 'fp32'), _final(seed, 'bf16')
        assert abs(a['valid_acc'] - b['valid_acc']) <= BF16_ACC_TOL, (seed, a, b)
        assert abs(a['valid_loss'] - b['valid_loss']) <= BF16_LOSS_TOL, (seed, a, b)
        assert a['valid_loss'] != b['valid_loss']  # bf16 did round differently: it was on


def test_bf16_runs_the_forward_in_bf16_and_the_rest_in_fp32(one_thread):
    seen = {}
    class Peek(Callback):
        _order = 3
        def after_loss(self): seen.setdefault('pred', self.run.pred.dtype); seen.setdefault('loss', self.run.loss.dtype)
    learn = learner(n=128)
    learn.model[0].register_forward_hook(lambda m, i, o: seen.setdefault('linear', o.dtype) and None)
    get_runner([MixedPrecision('bf16'), Peek()], report=None).fit(1, learn)
    assert seen == dict(linear=torch.bfloat16, pred=torch.float32, loss=torch.float32)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert not torch.is_autocast_enabled('cpu')


def test_fp16_is_refused_on_the_cpu_before_any_batch(one_thread):
    learn = learner(n=128)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        get_runner([MixedPrecision('fp16')], report=None).fit(1, learn)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_a_resume_in_another_precision_is_refused():
    with pytest.raises(ValueError, match="the saved run trained in fp16, this MixedPrecision is bf16"):
        MixedPrecision('bf16').load_state_dict({'precision': 'fp16', 'scaler': None})


def test_a_cancelled_batch_leaves_autocast(one_thread):
    from lesson9.callbacks import CancelBatch
    class CancelAfterPred(Callback):
        _order = 3
        def after_pred(self):
            assert not torch.is_autocast_enabled('cpu')
            if self.run.in_train and self.run.iter == 1: raise CancelBatch()
        def after_batch(self): assert not torch.is_autocast_enabled('cpu')
    class CancelAtBegin(Callback):
        _order = 3
        def begin_batch(self):
            if self.run.in_train and self.run.iter == 2: raise CancelBatch()
    get_runner([MixedPrecision('bf16'), CancelAfterPred(), CancelAtBegin()], report=None).fit(1, learner(n=256))
    assert not torch.is_autocast_enabled('cpu')


def test_the_fast_path_names_mixed_precision_and_runs_eagerly(one_thread):
    a, b = learner(n=256), learner(n=256)
    get_runner([MixedPrecision()], report=None).fit(1, a)
    fast = FastRunner([AvgStatsCallback(report=None), MixedPrecision()])
    with pytest.warns(UserWarning, match="MixedPrecision needs Python at after_pred"): fast.fit(1, b)
    assert fast.why_eager.startswith('MixedPrecision')
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@cuda
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_on_cuda(precision):
    if precision == 'bf16' and not torch.cuda.is_bf16_supported(): pytest.skip("this GPU has no bfloat16")
    a, b = _final(0, 'fp32', 'cuda'), _final(0, precision, 'cuda')
    assert abs(a['valid_acc'] - b['valid_acc']) <= 0.02 and abs(a['valid_loss'] - b['valid_loss']) <= 0.02, (a, b)


@cuda
def test_fp16_scaler_skips_an_overflowed_step_and_is_saved():
    learn = learner(device='cuda')
    mp = MixedPrecision('fp16')
    class Overflow(Callback):  # the first batch's loss overflows fp16 gradients
        _order = 4
        def after_loss(self):
            if self.run.n_iter == 0 and self.run.in_train: self.run.loss_grad = self.run.loss_grad * 1e30
    before = [p.detach().clone() for p in learn.model.parameters()]
    class Check(Callback):
        _order = 200
        def after_batch(self):
            if self.run.n_iter == 1:
                assert all(torch.equal(p, q) for p, q in zip(before, self.run.model.parameters()))  # the step was skipped
                assert mp.scaler.get_scale() < 65536.  # and the scale lowered
    get_runner([DeviceCallback('cuda'), mp, Overflow(), Check()], report=None).fit(1, learn)
    sd = mp.state_dict()
    assert sd['precision'] == 'fp16' and sd['scaler']['scale'] > 0


def test_no_host_sync_per_batch_with_early_stopping_and_bf16(one_thread, monkeypatch):
    "EarlyStopping, BestModel and bf16 autocast read nothing from the device per batch (tests/test_no_host_sync.py's count)."
    import torch.nn.functional as F
    from test_no_host_sync import BS, C, _assert_no_per_batch_sync
    def run_fit(train_ds, valid_ds):
        data = DataBunch(*get_dls(train_ds, valid_ds, BS, seed=0), c=C)
        torch.manual_seed(0)
        model, opt = get_model(data, lr=0.1, nh=8)
        cbs = [EarlyStopping(patience=5), BestModel(), MixedPrecision('bf16'), ProgressCallback(plot=True, enabled=True)]
        get_runner(cbs, report=None).fit(3, Learner(model, opt, F.cross_entropy, data))
        assert cbs[-1].n_drawn > 0   # the plot's per-batch path ran
    monkeypatch.setattr(callbacks, 'in_notebook', lambda: True)   # as in a notebook: the plot draws
    few = _assert_no_per_batch_sync(run_fit, monkeypatch)
    assert few.total <= 12 + 3*5, dict(few.calls)   # the stats once an epoch; the plot once a redraw (4 + 1 an epoch), whatever the batches


# ---------------------------------------------------------------- resume, bit for bit

class StopAt(Callback):
    "Asks the checkpoint to save and stop after training batch `n` of the fit."
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.run.in_train and self.run.n_iter == self.n: self.run.checkpoint.request_stop('test')


FEATURES = {
    'early_stop': lambda: [Scripted([3., 2., 2.5, 2.2, 1., 1.5, 1.6, 1.7]), EarlyStopping(patience=2), BestModel()],
    'bf16': lambda: [MixedPrecision('bf16')],
    'plot': lambda: [ProgressCallback(plot=True, enabled=True)],   # drawn: the test says it is in a notebook
    'all': lambda: [Scripted([3., 2., 2.5, 2.2, 1., 1.5, 1.6, 1.7]), EarlyStopping(patience=2), BestModel(),
                    MixedPrecision('bf16'), ProgressCallback(plot=True, enabled=True)],
}
if torch.cuda.is_available(): FEATURES['fp16'] = lambda: [MixedPrecision('fp16')]


@pytest.mark.parametrize('feature', list(FEATURES))
@pytest.mark.parametrize('stop_at', [8 + 5, 2*8 + 8, 3*8 + 4])   # 8 batches per epoch: in epoch 2; before epoch 3's validation; in epoch 4, one stalled epoch behind
def test_resume_is_bit_identical(one_thread, tmp_path, monkeypatch, feature, stop_at):
    monkeypatch.setattr(callbacks, 'in_notebook', lambda: True)   # the plot draws, as in a notebook
    device = 'cuda' if feature == 'fp16' else 'cpu'
    def fit(learn, path, resume=None, stop=None):
        run = get_runner([DeviceCallback(device), *FEATURES[feature](), Checkpoint(path)] + ([StopAt(stop)] if stop else []), report=None)
        run.fit(6, learn, resume=resume)
        return run
    ref_learn = learner(n=512)
    ref = fit(ref_learn, tmp_path/'ref.pt')
    if feature in ('plot', 'all'): assert ref.progress.n_drawn > 0
    stopped = fit(learner(n=512), tmp_path/'ck.pt', stop=stop_at)
    assert stopped.checkpoint.stopped_at == {'epoch': stop_at // 8 - (stop_at % 8 == 0), 'in_train': True, 'iter': stop_at % 8 or 8}
    learn = learner(seed=1, n=512)
    resumed = fit(learn, tmp_path/'ck.pt', resume=load_checkpoint(tmp_path/'ck.pt', learn)[0])
    assert resumed.avg_stats.history == ref.avg_stats.history
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), ref_learn.model.parameters()))
    for name in ('early_stopping', 'best_model', 'mixed_precision'):
        if name in ref.__dict__:
            a, b = getattr(resumed, name).state_dict(), getattr(ref, name).state_dict()
            if name == 'best_model':
                wa, wb = a.pop('weights'), b.pop('weights')
                assert all(torch.equal(wa[k], wb[k]) for k in wb)
            assert a == b, name


def test_a_run_resumed_after_its_early_stop_trains_no_more(one_thread, tmp_path):
    def fit(learn, resume=None):
        run = get_runner([Scripted([3., 2., 2.5, 2.2, 1., 1.5]), EarlyStopping(patience=2), Checkpoint(tmp_path/'ck.pt')], report=None)
        run.fit(6, learn, resume=resume)
        return run
    ref_learn = learner(n=256); ref = fit(ref_learn)
    assert ref.early_stopping.stopped['epoch'] == 4
    learn = learner(seed=1, n=256)
    again = fit(learn, resume=load_checkpoint(tmp_path/'ck.pt', learn)[0])
    assert again.avg_stats.history == ref.avg_stats.history and again.early_stopping.stopped == ref.early_stopping.stopped
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), ref_learn.model.parameters()))


# ---------------------------------------------------------------- two processes stop together

def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _fit_and_record(learn, results, name):
    "Fit 8 epochs with early stopping (patience 1) and the best model on the job's real validation loss; save what came out."
    es, bm = EarlyStopping(patience=1), BestModel()
    cbs = [es, bm] + ([DistributedCallback(timeout=W.TIMEOUT)] if name.startswith('rank') else [])
    run = get_runner(cbs, report=None)
    run.fit(8, learn)
    torch.save(dict(history=run.avg_stats.history, stopped=es.stopped, best_epoch=bm.best_epoch, best=bm.best,
                    weights=bm.weights, epochs_run=len(run.avg_stats.history)), results/f'{name}.pt')


def _rank_main(rank, port, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        with distributed(timeout=W.TIMEOUT): _fit_and_record(W.make_learner(), results, f'rank{rank}')
    except Exception as e: (results/f'rank{rank}.err').write_text(f"{type(e).__name__}: {e}")


def test_two_processes_stop_at_the_same_epoch_as_one(one_thread, tmp_path):
    # each rank validates a different part of the data (8 and 8 samples, then 1 and 0); the record it reads is the global one
    ctx, port = multiprocessing.get_context('fork'), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(300)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive(): p.kill()
    assert not hung, "a rank was still running: hung"
    errors = [f.read_text() for f in tmp_path.glob('*.err')]
    assert not errors, errors
    _fit_and_record(W.make_learner(), tmp_path, 'one')
    r0, r1, one = (torch.load(tmp_path/f'{n}.pt', weights_only=True) for n in ('rank0', 'rank1', 'one'))
    assert one['stopped'] is not None and one['epochs_run'] < 8, one['history']  # the job does stop early
    assert r0['stopped'] == r1['stopped'] and r0['history'] == r1['history'] and r0['best_epoch'] == r1['best_epoch']
    assert all(torch.equal(r0['weights'][k], r1['weights'][k]) for k in r0['weights'])
    assert r0['stopped'] is not None and r0['stopped']['epoch'] == one['stopped']['epoch'] and r0['best_epoch'] == one['best_epoch']
    assert r0['weights'].keys() == one['weights'].keys()  # the model inside DDP: plain keys
    assert all(torch.allclose(r0['weights'][k], one['weights'][k], atol=1e-5) for k in one['weights'])


# ---------------------------------------------------------------- the live plot

PLOT_NB = [
    "import torch\n"
    "from lesson9.callbacks import DataBunch, Learner, get_model, get_runner\n"
    "from lesson9.data import get_data\n"
    "from lesson9.extras import ProgressCallback\n"
    "from lesson9.training import Dataset, cross_entropy, get_dls\n"
    "x, y, xv, yv = get_data()\n"
    "def learner():\n"
    "    torch.manual_seed(0)\n"
    "    data = DataBunch(*get_dls(Dataset(x[:1024], y[:1024]), Dataset(xv[:256], yv[:256]), 64, seed=0), c=10)\n"
    "    return Learner(*get_model(data, lr=0.5, nh=50), cross_entropy, data)",
    "pc = ProgressCallback(plot=True)\nget_runner([pc]).fit(2, learner())\nprint('drawn', pc.n_drawn)",
    "pc = ProgressCallback()\nget_runner([pc]).fit(1, learner())\nprint('drawn', pc.n_drawn)",
]


def test_the_plot_draws_itself_in_a_notebook():
    import nbformat
    from test_notebooks import execute
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in PLOT_NB],
                                  metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    r = execute(nbformat.writes(nb), 'plot')
    assert r['error'] is None, r['error']
    on, off = json.loads(r['nb'])['cells'][1:3]
    images = [o for o in on['outputs'] if 'image/png' in o.get('data', {})]
    assert len(images) == 1, on['outputs']  # the last plot, under the last bar; the earlier one was emptied
    text = ''.join(''.join(o.get('text', '')) for o in on['outputs'] if o['output_type'] == 'stream')
    assert 'drawn 12' in text, text  # 2 epochs x (1 new + 4 during + 1 at the end)
    assert [l.split(' |')[0] for l in text.splitlines() if l.startswith('epoch')] == ['epoch 1', 'epoch 2']
    assert not any('image/png' in o.get('data', {}) for o in off['outputs']) and 'drawn 0' in ''.join(''.join(o.get('text', '')) for o in off['outputs'])


PIPE_SCRIPT = """
import sys, torch
from lesson9.callbacks import DataBunch, Learner, get_model, get_runner
from lesson9.data import get_data
from lesson9.extras import ProgressCallback
from lesson9.training import Dataset, cross_entropy, get_dls
torch.set_num_threads(1)
x, y, xv, yv = get_data()
torch.manual_seed(0)
data = DataBunch(*get_dls(Dataset(x[:512], y[:512]), Dataset(xv[:128], yv[:128]), 64, seed=0), c=10)
pc = ProgressCallback(plot=True)
get_runner([pc]).fit(2, Learner(*get_model(data, lr=0.5, nh=50), cross_entropy, data))
assert pc.n_drawn == 0
assert 'matplotlib' not in sys.modules, "plot=True in a pipe loaded matplotlib"
"""


def test_the_plot_draws_nothing_in_a_pipe():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    r = subprocess.run([sys.executable, '-c', PIPE_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [l.split(' |')[0] for l in r.stdout.splitlines()] == ['epoch 1', 'epoch 2'], r.stdout  # the rows only
