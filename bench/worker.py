"""One loop in its own process: make the data, warm up, then time one-epoch fits; one JSON line per epoch.

`bench/run.py` starts one such process per loop with `--serve` and asks each in turn for one timed epoch,
so that the loops run interleaved while each keeps its own process. Alone, e.g.

    python bench/worker.py --loop 4 --models lesson,wide --epochs 3
    python bench/worker.py --loop 4 --epochs 1 --profile 30   # cProfile of the timed epoch, top 30 on stderr
    python bench/worker.py --dataloader                        # the DataLoader benchmark

The loops (see bench/README.md):
  1 plain PyTorch, pre-loaded tensors, a shuffled index per epoch, one `index_select` per batch (the baseline)
  2 plain PyTorch, `TensorDataset` + torch `DataLoader(shuffle=True)`
  3 lesson9 03: `lesson9.training.fit` with lesson9 `DataLoader`s
  4 lesson9 04/05: `Runner` with the default callbacks (`get_runner`) + `Recorder` + one-cycle `ParamScheduler`
  5 PyTorch Lightning (no progress bar, logger, checkpoints or model summary)
  6 fastai (no progress bar, logging or checkpoints)
  7 lesson9 08: loop 4 with the fast path (`get_fast_runner`): each training batch one compiled step
  8 lesson9 08a: loop 4 with `MixedPrecision('bf16')`: each batch's forward pass under bf16 autocast

Every loop does the same work: the same synthetic data, the same initial weights, the same batch order
(loops 1-5), a training epoch keeping the sample-weighted mean loss and accuracy on the device, then a
validation pass (loss and accuracy, batch size 2*bs). This file imports only torch at the top, so that it
also runs in the peers' virtual environment, where lesson9 is not installed.
"""
import argparse, copy, json, math, os, resource, sys, time, warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# workload: the lesson's MLP, and a wide one where the matrix products dominate
MODELS = {'lesson': dict(sizes=(784, 50, 10), bs=64, lr=0.5),
          'wide': dict(sizes=(784, 2048, 2048, 10), bs=512, lr=0.1)}
LOOP_NAMES = {1: 'plain PyTorch, index slicing', 2: 'PyTorch TensorDataset+DataLoader', 3: 'lesson9 03 fit',
              4: 'lesson9 Runner+Recorder+ParamScheduler', 5: 'PyTorch Lightning', 6: 'fastai',
              7: 'lesson9 FastRunner (compiled)+Recorder+ParamScheduler', 8: 'lesson9 Runner+Recorder+ParamScheduler, bf16 autocast'}


def set_threads(n):
    "Same thread settings for every loop: `n` intra-op threads, one inter-op thread."
    import torch
    torch.set_num_threads(n)
    try: torch.set_num_interop_threads(1)
    except RuntimeError: pass  # already set (only possible once per process)


def make_data(n_train, seed, device):
    """MNIST-shaped synthetic data: (n, 784) floats in [0,1), mean about 0.10 (MNIST: 0.13), int64 labels 0..9.
    Each class has a sparse random "prototype" image. In a sample, 15% of the pixels show the class's prototype
    (times a uniform value), the rest are sparse noise (17% of them non-zero), so the lesson's MLP at lr 0.5
    learns it in one epoch to roughly MNIST-like accuracy without diverging. One uniform draw per pixel
    decides which and gives the value (cheap: every loop process makes its own copy)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_valid(n_train)
    protos = (torch.rand(10, 784, generator=g) < 0.2).float()
    y = torch.randint(0, 10, (n,), generator=g)
    u = torch.rand(n, 784, generator=g)
    keep = u >= 0.85  # prototype pixels, value (u - 0.85)/0.15 uniform in [0, 1)
    x = torch.where(keep, protos[y] * ((u - 0.85) / 0.15), torch.where(u < 0.145, u / 0.145, 0.))
    return [t.to(device) for t in (x[:n_train], y[:n_train], x[n_train:], y[n_train:])]


def n_valid(n_train):
    "Validation samples: 10,000 for the full 50,000-sample epoch, a fifth of the training samples for shorter ones."
    return min(10_000, max(1, n_train // 5))


def make_model(sizes, seed, device):
    "Linear/ReLU stack with `sizes`, initialised from `seed` (the same weights in every loop)."
    import torch
    from torch import nn
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(device)


class SliceBatches:
    "Batches of pre-loaded tensors: a new shuffled index each epoch, one `index_select` per batch (slices when not shuffled)."
    def __init__(self, x, y, bs, shuffle, seed=0):
        import torch
        self.x, self.y, self.bs, self.shuffle = x, y, bs, shuffle
        self.generator = torch.Generator().manual_seed(seed)  # same draws as lesson9's DataLoader(seed=seed)

    def __len__(self): return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        import torch
        x, y, bs, n = self.x, self.y, self.bs, len(self.x)
        if not self.shuffle:
            for i in range(0, n, bs): yield x[i:i+bs], y[i:i+bs]
            return
        idx = torch.randperm(n, generator=self.generator).to(x.device)
        for i in range(0, n, bs):
            b = idx[i:i+bs]
            yield x.index_select(0, b), y.index_select(0, b)


def plain_epoch(model, opt, train, valid):
    "Loops 1 and 2: one training epoch and one validation pass, written out; stats read once at the end."
    import torch
    import torch.nn.functional as F
    dev = next(model.parameters()).device
    res = {}
    for phase, batches in (('train', train), ('valid', valid)):
        training = phase == 'train'
        model.train(training)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        count = 0
        with torch.set_grad_enabled(training):
            for xb, yb in batches:
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                if training:
                    loss.backward(); opt.step(); opt.zero_grad()
                loss_sum.add_(loss.detach(), alpha=len(yb))
                correct.add_((out.detach().argmax(1) == yb).sum())
                count += len(yb)
        res[f'{phase}_loss'], res[f'{phase}_acc'] = loss_sum.item() / count, correct.item() / count
    return res


# ------------------------------------------------------------------ the loops: each returns fit() -> results

def loop1(model, lr, data, bs, seed):
    import torch
    x, y, xv, yv = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train, valid = SliceBatches(x, y, bs, True, seed), SliceBatches(xv, yv, 2*bs, False)
    return lambda: plain_epoch(model, opt, train, valid)


def loop2(model, lr, data, bs, seed):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    x, y, xv, yv = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    valid = DataLoader(TensorDataset(xv, yv), batch_size=2*bs, shuffle=False)
    return lambda: plain_epoch(model, opt, train, valid)


def _lesson9_loaders(data, bs, seed):
    sys.path.insert(0, REPO)  # the repo's package, installed or not (e.g. on a bare GPU machine)
    from lesson9.training import DataLoader, Dataset, get_dls
    x, y, xv, yv = data
    return get_dls(Dataset(x, y), Dataset(xv, yv), bs, seed=seed)


def loop3(model, lr, data, bs, seed):
    import torch
    import torch.nn.functional as F
    train_dl, valid_dl = _lesson9_loaders(data, bs, seed)
    from lesson9.training import fit
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    def run():
        h = fit(1, model, F.cross_entropy, opt, train_dl, valid_dl)[-1]
        return {k: h[k] for k in ('train_loss', 'train_acc', 'valid_loss', 'valid_acc')}
    return run


def one_cycle_cbs(lr, anneal):
    "05's cosine one-cycle for the lr alone (momentum stays 0, as in every other loop): `ParamScheduler` callbacks."
    if hasattr(anneal, 'one_cycle'): return anneal.one_cycle(lr, moms=None)  # lr/25 -> lr at 30% -> lr/1e4
    return [anneal.ParamScheduler('lr', anneal.combine_scheds([0.3, 0.7], [anneal.sched_cos(lr / 25, lr), anneal.sched_cos(lr, lr / 1e4)]))]


def anneal_available():
    "Whether lesson9.anneal (Recorder, ParamScheduler) can be imported."
    sys.path.insert(0, REPO)
    try: import lesson9.anneal  # noqa: F401
    except ImportError: return False
    return True


def loop4(model, lr, data, bs, seed, schedule='one_cycle', extra=()):
    import torch
    import torch.nn.functional as F
    train_dl, valid_dl = _lesson9_loaders(data, bs, seed)
    from lesson9.callbacks import DataBunch, Learner, get_runner
    try:
        from lesson9 import anneal
    except ImportError:
        anneal = None
        print("loop 4: lesson9.anneal does not exist yet: running without Recorder and ParamScheduler", file=sys.stderr)
    cbs = []
    if anneal is not None:
        scheds = one_cycle_cbs(lr, anneal) if schedule == 'one_cycle' else [anneal.ParamScheduler('lr', anneal.sched_no(lr, lr))]
        cbs = [anneal.Recorder(), *scheds]
    cbs += [make() for make in extra]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    learn = Learner(model, opt, F.cross_entropy, DataBunch(train_dl, valid_dl, c=10))
    def run():
        runner = get_runner(cbs=cbs, report=None)
        runner.fit(1, learn)
        h = runner.avg_stats.history[-1]
        return {'train_loss': h['train_loss'], 'train_acc': h['train_acc'], 'valid_loss': h['valid_loss'], 'valid_acc': h['valid_acc']}
    run.with_anneal = anneal is not None
    return run


def loop8(model, lr, data, bs, seed):
    "Loop 4 with the forward pass of every batch under bf16 autocast (lesson9.extras.MixedPrecision)."
    from lesson9.extras import MixedPrecision
    return loop4(model, lr, data, bs, seed, extra=[lambda: MixedPrecision('bf16')])


_FAST = {}  # loop 7: (sizes, device) -> the model, learner and runner whose compiled step this process keeps


def loop7(model, lr, data, bs, seed):
    """Loop 4 through `get_fast_runner`. A compiled step belongs to one model: the process keeps one model (and
    runner) per shape and copies each epoch's fresh weights into it, so only the warm-up epoch compiles."""
    import torch
    import torch.nn.functional as F
    train_dl, valid_dl = _lesson9_loaders(data, bs, seed)
    from lesson9 import anneal
    from lesson9.callbacks import DataBunch, Learner
    from lesson9.fast import get_fast_runner
    key = (tuple(p.shape for p in model.parameters()), str(next(model.parameters()).device))
    if key not in _FAST:
        kept = copy.deepcopy(model)
        runner = get_fast_runner([anneal.Recorder(), *one_cycle_cbs(lr, anneal)], report=None)
        _FAST[key] = (kept, torch.optim.SGD(kept.parameters(), lr=lr), runner)
    kept, opt, runner = _FAST[key]
    with torch.no_grad():
        for p, q in zip(kept.parameters(), model.parameters()): p.copy_(q)  # this epoch's starting weights, in place
    learn = Learner(kept, opt, F.cross_entropy, DataBunch(train_dl, valid_dl, c=10))
    def run():
        runner.fit(1, learn)
        if runner.fast is None: raise RuntimeError(f"loop 7 ran eagerly: {runner.why_eager}")
        with torch.no_grad():
            for p, q in zip(model.parameters(), kept.parameters()): p.copy_(q)
        h = runner.avg_stats.history[-1]
        return {'train_loss': h['train_loss'], 'train_acc': h['train_acc'], 'valid_loss': h['valid_loss'], 'valid_acc': h['valid_acc']}
    run.runner = runner
    return run


def loop5(model, lr, data, bs, seed):
    import torch
    import torch.nn.functional as F
    import lightning as L
    import logging
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric'): logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings('ignore')
    x, y, xv, yv = data

    class LitMLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
        def forward(self, xb): return self.model(xb)
        def _reset(self):
            dev = x.device
            self.sums = {p: [torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.int64, device=dev), 0]
                         for p in ('train', 'valid')}
        def on_train_epoch_start(self): self._reset()
        def _step(self, batch, phase):
            xb, yb = batch
            out = self.model(xb)
            loss = F.cross_entropy(out, yb)
            s = self.sums[phase]
            s[0].add_(loss.detach(), alpha=len(yb)); s[1].add_((out.detach().argmax(1) == yb).sum()); s[2] += len(yb)
            return loss
        def training_step(self, batch, batch_idx): return self._step(batch, 'train')
        def validation_step(self, batch, batch_idx): self._step(batch, 'valid')
        def configure_optimizers(self): return torch.optim.SGD(self.model.parameters(), lr=lr)

    accel = 'gpu' if x.device.type == 'cuda' else 'cpu'
    train, valid = SliceBatches(x, y, bs, True, seed), SliceBatches(xv, yv, 2*bs, False)
    def run():
        lit = LitMLP()
        trainer = L.Trainer(max_epochs=1, accelerator=accel, devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(lit, train_dataloaders=train, val_dataloaders=valid)
        return {f'{p}_{k}': v for p, (l, c, n) in lit.sums.items() for k, v in (('loss', l.item() / n), ('acc', c.item() / n))}
    return run


def loop6(model, lr, data, bs, seed):
    from fastai.basics import DataLoaders, Learner, SGD, accuracy
    import torch.nn.functional as F
    warnings.filterwarnings('ignore')
    x, y, xv, yv = data
    dls = DataLoaders(SliceBatches(x, y, bs, True, seed), SliceBatches(xv, yv, 2*bs, False), device=x.device)
    learn = Learner(dls, model, loss_func=F.cross_entropy, opt_func=SGD, lr=lr, metrics=accuracy)
    learn.recorder.train_metrics = True  # train accuracy too, as in the other loops
    assert not any("Progress" in type(cb).__name__ for cb in learn.cbs), learn.cbs
    def run():
        with learn.no_logging(): learn.fit(1, lr)  # fastai.basics adds no progress bar (fastai.callback.progress does)
        names = list(learn.recorder.metric_names[1:-1])  # drop 'epoch' and 'time'
        vals = dict(zip(names, learn.recorder.values[-1]))
        # fastai's train_loss is a moving average, not the epoch mean: keep it but name it so
        return {'train_loss_smoothed': vals.get('train_loss'), 'train_acc': vals.get('train_accuracy'),
                'valid_loss': vals.get('valid_loss'), 'valid_acc': vals.get('valid_accuracy')}
    return run


LOOPS = {1: loop1, 2: loop2, 3: loop3, 4: loop4, 5: loop5, 6: loop6, 7: loop7, 8: loop8}


# ------------------------------------------------------------------ memory

def _proc_status(key):
    "A field of /proc/self/status in bytes (Linux), or None."
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'): return int(line.split()[1]) * 1024
    except OSError: return None


def reset_peak_rss():
    "Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; True if this works here (Linux >= 4.0)."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return _proc_status('VmHWM') is not None
    except OSError: return False


class Memory:
    """Peak memory over a block: on CUDA `torch.cuda.max_memory_allocated` after a reset; on the CPU the
    process's peak resident set size (VmHWM, reset just before the block), i.e. everything the process holds
    (interpreter, libraries, data, model) at its highest point during the block."""
    def __init__(self, device): self.device = device

    def __enter__(self):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.hwm = reset_peak_rss()
            self.start = _proc_status('VmRSS')
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            self.peak, self.kind = torch.cuda.max_memory_allocated(), 'cuda max_memory_allocated'
        elif self.hwm:
            self.peak, self.kind = _proc_status('VmHWM'), 'peak RSS (VmHWM reset before the epoch)'
        else:  # no resettable mark: the process's lifetime peak
            self.peak, self.kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'lifetime peak RSS (ru_maxrss)'


# ------------------------------------------------------------------ main

def warmup_data(data, bs):
    "The first tenth (at least 2 batches) of the training and validation data: enough to warm every code path up."
    x, y, xv, yv = data
    n, nv = max(2 * bs, len(x) // 10), max(4 * bs, len(xv) // 10)
    return [x[:n], y[:n], xv[:nv], yv[:nv]]


class Bench:
    "One loop on one model in this process: data made and the loop warmed up once; then `epoch()` times one fit."
    def __init__(self, loop, model_name, samples, device, seed=0):
        import torch
        self.loop, self.model_name, self.samples, self.device, self.seed = loop, model_name, samples, device, seed
        self.spec = spec = MODELS[model_name]
        self.data = make_data(samples, seed, device)
        self.sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            # warm-up on a throw-away model and a tenth of the data: lazy imports, allocator pools, kernels, caches.
            # Loop 7 warms up on a whole epoch of the real data: it compiles a graph per batch size it sees.
            t0 = time.perf_counter()
            run = LOOPS[loop](make_model(spec['sizes'], seed, device), spec['lr'],
                              self.data if loop == 7 else warmup_data(self.data, spec['bs']), spec['bs'], seed)
            run()
            self.sync()
            self.warmup = dict(seconds=time.perf_counter() - t0)
            if loop == 7:
                step = run.runner.fast
                self.warmup.update(compile_s=step.compile_seconds, n_graphs=step.n_graphs, mode=step.mode)

    def epoch(self, profiler=None)->dict:
        "Time a one-epoch fit from the same fresh weights and batch order as every other loop; the result as a dict."
        import gc, torch
        spec, dev = self.spec, self.device
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = make_model(spec['sizes'], self.seed, dev)  # the same initial weights as every other loop
            run = LOOPS[self.loop](model, spec['lr'], self.data, spec['bs'], self.seed)
            gc.collect()
            with Memory(dev) as mem:
                self.sync()
                if profiler: profiler.enable()
                t0, c0 = time.perf_counter(), time.process_time()
                stats = run()
                self.sync()
                t1, c1 = time.perf_counter(), time.process_time()
                if profiler: profiler.disable()
        steps = math.ceil(self.samples / spec['bs'])
        res = dict(loop=self.loop, name=LOOP_NAMES[self.loop], model=self.model_name, device=str(dev),
                   threads=torch.get_num_threads(), samples=self.samples, bs=spec['bs'], train_steps=steps,
                   ms_per_epoch=(t1 - t0) * 1e3, cpu_ms_per_epoch=(c1 - c0) * 1e3, us_per_step=(t1 - t0) * 1e6 / steps,
                   peak_mem=mem.peak, mem_at_start=mem.start, mem_kind=mem.kind, stats=stats)
        if self.loop == 4: res['with_anneal'] = getattr(run, 'with_anneal', False)
        if self.loop == 7: res['n_graphs'] = run.runner.fast.n_graphs  # still those of the warm-up: nothing recompiled
        return res


def serve(args, models):
    """Keep one `Bench` per model; answer each line on stdin naming a model with one timed epoch as a JSON line.
    Anything the loops print goes to stderr, so stdout carries only the protocol."""
    import torch
    out, sys.stdout = sys.stdout, sys.stderr
    device = torch.device(args.device)
    benches = {m: Bench(args.loop, m, args.wide_samples if m == 'wide' else args.samples, device, args.seed) for m in models}
    def send(obj): out.write(json.dumps(obj) + '\n'); out.flush()
    send({'ready': True, 'loop': args.loop, 'warmup': {m: b.warmup for m, b in benches.items()}})
    for line in sys.stdin:
        cmd = line.strip()
        if not cmd or cmd == 'quit': break
        send(benches[cmd].epoch())


def dataloader_bench(args):
    "Iterate one shuffled epoch of batches (no model) with each loader, `args.reps` times interleaved; epoch times in ms."
    import torch
    from torch.utils.data import BatchSampler, DataLoader as TorchDL, RandomSampler, TensorDataset
    sys.path.insert(0, REPO)
    from lesson9.training import DataLoader, Dataset
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    bs, n = 64, args.samples
    g = torch.Generator().manual_seed(args.seed)
    x, y = torch.rand(n, 784, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)

    def raw_indexing():
        idx = torch.randperm(n).to(device)
        for i in range(0, n, bs):
            b = idx[i:i+bs]
            yield x[b], y[b]
    def raw_index_select():
        idx = torch.randperm(n).to(device)
        for i in range(0, n, bs):
            b = idx[i:i+bs]
            yield x.index_select(0, b), y.index_select(0, b)
    tds = TensorDataset(x, y)
    loaders = {
        'raw: x[idx[i:i+bs]]': raw_indexing,
        'raw: x.index_select(0, idx[i:i+bs])': raw_index_select,
        'lesson9 DataLoader(Dataset, shuffle=True)': DataLoader(Dataset(x, y), bs, shuffle=True).__iter__,
        'torch DataLoader(TensorDataset, shuffle=True)': TorchDL(tds, batch_size=bs, shuffle=True).__iter__,
        'torch DataLoader(TensorDataset, sampler=BatchSampler(RandomSampler), batch_size=None)':
            TorchDL(tds, sampler=BatchSampler(RandomSampler(tds), bs, False), batch_size=None).__iter__,
    }
    times = {k: [] for k in loaders}
    batches = {}
    def epoch(make_iter):
        sync(); t0 = time.perf_counter(); k = 0
        for xb, yb in make_iter(): k += 1
        sync()
        return (time.perf_counter() - t0) * 1e3, k
    for k, f in loaders.items(): batches[k] = epoch(f)[1]  # warm-up
    names = list(loaders)
    for rep in range(args.reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order each repetition
            times[k].append(epoch(loaders[k])[0])
    return dict(kind='dataloader', device=args.device, threads=torch.get_num_threads(), samples=n, bs=bs,
                batches=batches, ms_per_epoch=times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--loop', type=int, choices=sorted(LOOPS))
    p.add_argument('--dataloader', action='store_true', help='run the DataLoader benchmark instead of a loop')
    p.add_argument('--serve', action='store_true', help='for run.py: time one epoch of the model named on each stdin line')
    p.add_argument('--models', default='lesson', help='comma-separated: lesson, wide')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--samples', type=int, default=50_000, help='training samples per epoch (lesson MLP; DataLoader benchmark)')
    p.add_argument('--wide-samples', type=int, default=50_000, help='training samples per epoch for the wide MLP')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=3, help='timed epochs per model, each from the same fresh weights')
    p.add_argument('--reps', type=int, default=5, help='repetitions (DataLoader benchmark)')
    p.add_argument('--profile', type=int, default=0, metavar='N', help='profile the timed epochs; print the top N functions')
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.dataloader: print(json.dumps(dataloader_bench(args))); return
    if args.loop is None: p.error('give --loop or --dataloader')
    models = args.models.split(',')
    if args.serve: return serve(args, models)
    import torch
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    for m in models:
        b = Bench(args.loop, m, args.wide_samples if m == 'wide' else args.samples, torch.device(args.device), args.seed)
        for _ in range(args.epochs): print(json.dumps(b.epoch(prof)), flush=True)
    if prof:
        import pstats
        pstats.Stats(prof, stream=sys.stderr).sort_stats('tottime').print_stats(args.profile)


if __name__ == '__main__':
    main()
