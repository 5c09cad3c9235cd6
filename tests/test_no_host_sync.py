"""No host sync per batch: the training loops read values from the device only per epoch.

A host sync (`t.item()`, `float(t)`, `t.tolist()`, `t.cpu()`, `if t:` ...) makes the CPU wait for the GPU to
finish everything queued so far; once per batch, it stops the CPU from queueing the next batch while the GPU
works, which is what keeps a small model's GPU busy. These tests are not timings: they count the Python-level
calls that read a tensor's value during a whole `fit`, for N=5 and N=20 batches per epoch (training and
validation alike), and require the same count for both. Reads once per epoch are fine; the count must not grow
with the number of batches.

On the CPU every such call is counted (on a GPU the same call would be a sync), with torch's own
`F.cross_entropy` as the loss: lesson9's `cross_entropy` checks its labels per batch on purpose, but only
for CPU tensors, where that costs no sync. With CUDA, the same tests also run on the GPU, lesson9's loss
included, counting only reads of GPU tensors: the syncs themselves.
"""
import collections, os, traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesson9.callbacks import DataBunch, Learner, get_model, get_runner
from lesson9.training import SGD, Dataset, cross_entropy, fit, get_dls

try:
    from lesson9 import anneal
except ImportError:  # 05_anneal not exported yet: the Runner tests run without Recorder and ParamScheduler
    anneal = None

# Tensor methods that copy a value to the host (each one is a sync point on an accelerator)
SYNC_METHODS = ('item', 'tolist', 'cpu', 'numpy', '__float__', '__int__', '__bool__', '__index__', '__complex__')
_TORCH_DIR = os.path.dirname(torch.__file__)
BS, N_IN, C = 4, 12, 3
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA here'))]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _caller():
    "file:line of the nearest frame outside torch: who asked for the value."
    for fr in reversed(traceback.extract_stack()[:-2]):  # less this function and the counting wrapper
        if not fr.filename.startswith(_TORCH_DIR): return f"{os.path.basename(fr.filename)}:{fr.lineno}"
    return '?'


class SyncCounter:
    "Counts calls to `SYNC_METHODS`, by method and caller, on all tensors or (`device_only`) on non-CPU tensors only."
    def __init__(self, device_only=False): self.calls, self.device_only = collections.Counter(), device_only

    def install(self, monkeypatch):
        for name in SYNC_METHODS:
            orig = getattr(torch.Tensor, name)
            def counting(self_t, *args, _orig=orig, _name=name, **kwargs):
                if not (self.device_only and self_t.device.type == 'cpu'): self.calls[(_name, _caller())] += 1
                return _orig(self_t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counting)
        return self

    @property
    def total(self): return sum(self.calls.values())


def _data(n_batches, device='cpu', seed=0):
    "`n_batches` training batches of `BS` and `n_batches` validation batches of `2*BS` (get_dls' sizes), on `device`."
    g = torch.Generator().manual_seed(seed)
    n_train, n_valid = n_batches * BS, n_batches * 2 * BS
    x = torch.randn(n_train + n_valid, N_IN, generator=g).to(device)
    y = torch.randint(0, C, (n_train + n_valid,), generator=g).to(device)
    return Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:])


def _count(run_fit, n_batches, monkeypatch, device):
    "Sync calls made by `run_fit(train_ds, valid_ds)`; the patch is removed afterwards."
    train_ds, valid_ds = _data(n_batches, device)
    with monkeypatch.context() as m:
        counter = SyncCounter(device_only=device != 'cpu').install(m)
        run_fit(train_ds, valid_ds)
    return counter


def _assert_no_per_batch_sync(run_fit, monkeypatch, device='cpu'):
    few, many = _count(run_fit, 5, monkeypatch, device), _count(run_fit, 20, monkeypatch, device)
    grew = {k: (few.calls.get(k, 0), v) for k, v in many.calls.items() if v != few.calls.get(k, 0)}
    assert not grew, ("host syncs that grow with the number of batches, (method, caller): (count with 5 batches, "
                      f"with 20 batches): {grew}")
    return few


def _runner_cbs(with_anneal):
    if not with_anneal: return []
    # the lesson's full kit: a recorder and the one-cycle schedules (lr and momentum)
    return [anneal.Recorder(), *anneal.one_cycle(0.5)]


LOSSES = {'F.cross_entropy': F.cross_entropy, 'lesson9 cross_entropy': cross_entropy}
CASES = [('cpu', 'F.cross_entropy'), *[pytest.param('cuda', loss, marks=DEVICES[1].marks) for loss in LOSSES]]


@pytest.mark.parametrize('device,loss', CASES)
@pytest.mark.parametrize('with_anneal', [False, True], ids=['default cbs', 'default cbs+Recorder+one_cycle'])
def test_runner_no_per_batch_sync(device, loss, with_anneal, monkeypatch, capsys):
    "`get_runner()` (TrainEvalCallback, AvgStatsCallback printing each epoch), optionally with Recorder and one_cycle."
    if with_anneal and anneal is None: pytest.skip("lesson9.anneal does not exist yet")
    def run_fit(train_ds, valid_ds):
        data = DataBunch(*get_dls(train_ds, valid_ds, BS, seed=0), c=C)
        torch.manual_seed(0)
        model, opt = get_model(data, lr=0.1, nh=8)
        learn = Learner(model.to(device), opt, LOSSES[loss], data)
        run = get_runner(_runner_cbs(with_anneal))
        run.fit(2, learn)
        if with_anneal:  # reading what the recorder kept is one sync, after training
            assert len(run.recorder.losses) == 2 * len(data.train_dl)
    few = _assert_no_per_batch_sync(run_fit, monkeypatch, device)
    assert 'epoch 1' in capsys.readouterr().out  # the default report ran (and its per-epoch reads are allowed)
    assert few.total <= 10, f"more host syncs per fit than a per-epoch report needs: {dict(few.calls)}"


@pytest.mark.parametrize('device,loss', CASES)
def test_fit_03_no_per_batch_sync(device, loss, monkeypatch):
    "03's `fit`: stats stay on the device and are read once per epoch and phase."
    def run_fit(train_ds, valid_ds):
        train_dl, valid_dl = get_dls(train_ds, valid_ds, BS, seed=0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(N_IN, 8), nn.ReLU(), nn.Linear(8, C)).to(device)
        history = fit(2, model, LOSSES[loss], SGD(model.parameters(), lr=0.1), train_dl, valid_dl)
        assert len(history) == 2
    few = _assert_no_per_batch_sync(run_fit, monkeypatch, device)
    assert few.total <= 8, f"more host syncs than 2 per phase and epoch: {dict(few.calls)}"


def test_counter_sees_a_per_batch_sync(monkeypatch):
    "The check itself works: a callback that reads the loss every batch is caught, and named, with its line."
    from lesson9.callbacks import Callback
    class LossPrinter(Callback):
        def after_loss(self): self.last = self.run.loss.item()
    def run_fit(train_ds, valid_ds):
        data = DataBunch(*get_dls(train_ds, valid_ds, BS, seed=0), c=C)
        get_runner([LossPrinter()], report=None).fit(1, Learner(*get_model(data, nh=8), F.cross_entropy, data))
    with pytest.raises(AssertionError, match=r"\('item', 'test_no_host_sync.py:\d+'\): \(10, 40\)"):
        _assert_no_per_batch_sync(run_fit, monkeypatch)


def _strict_window():
    "Two callbacks: any synchronizing CUDA call from the first begin_batch handler to the last after_batch one raises."
    from lesson9.callbacks import Callback
    class StrictOpen(Callback):
        _order = -100  # opens before every other callback's begin_batch
        def begin_batch(self): torch.cuda.set_sync_debug_mode('error')
    class StrictClose(Callback):
        _order = 10_000  # closes after every other callback's after_batch
        def begin_fit(self): self.batches = 0
        def after_batch(self): torch.cuda.set_sync_debug_mode(0); self.batches += 1
    return StrictOpen(), StrictClose()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA here')
@pytest.mark.parametrize('loss', LOSSES)
@pytest.mark.parametrize('with_anneal', [False, True], ids=['default cbs', 'default cbs+Recorder+one_cycle'])
def test_cuda_batches_never_sync(loss, with_anneal):
    "CUDA's own sync detector, not a count of Python calls: any sync inside a batch (a C++ one too) raises."
    if with_anneal and anneal is None: pytest.skip("lesson9.anneal does not exist yet")
    from lesson9.callbacks import Callback
    def run_fit(*extra):
        data = DataBunch(*get_dls(*_data(5, 'cuda'), BS, seed=0), c=C)
        torch.manual_seed(0)
        model, opt = get_model(data, lr=0.1, nh=8)
        opened, closed = _strict_window()
        run = get_runner([opened, closed, *extra, *_runner_cbs(with_anneal)], report=None)
        try: run.fit(2, Learner(model.to('cuda'), opt, LOSSES[loss], data))
        finally: torch.cuda.set_sync_debug_mode(0)
        return run, closed
    run, closed = run_fit()
    assert closed.batches == 2 * (5 + 5)  # every training and validation batch ran inside the window
    assert all(type(v) is float for k, v in run.avg_stats.history[-1].items() if k != 'epoch')
    class Reads(Callback):  # the detector works: one read of the loss per batch raises
        def after_loss(self): self.run.loss.item()
    with pytest.raises(RuntimeError, match='synchroniz'): run_fit(Reads())
