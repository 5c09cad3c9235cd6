"""What does the divergence check cost loop 4? Measured side by side in one process.

    python bench/divergence.py [--reps 15] [--batches 200] [--device cpu]

Every variant trains the lesson MLP (bs 64, lr 0.5 with loop 4's one-cycle) on the same batches for one
epoch plus validation, alternating over `--reps` rounds in a rotated order:

  loop 1          plain PyTorch (bench/worker.py's loop 1)
  loop 4          lesson9's Runner + Recorder + one-cycle (bench/worker.py's loop 4)
  + check         loop 4 + DivergenceCallback(): losses kept on the device, checked once per epoch
  + check/50      loop 4 + DivergenceCallback(every=50): one check every 50 batches
  + item() check  loop 4 + a callback that reads `loss.item()` at every batch (what the check avoids)

The table shows the median time per epoch and, for each variant, the median over rounds of its epoch time
divided by loop 4's (and loop 1's) in the same round: a busy machine slows both sides of a pair alike.
"""
import argparse, math, statistics, sys, time

import worker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--batches', type=int, default=200)
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    import torch
    worker.set_threads(1)
    sys.path.insert(0, worker.REPO)
    from lesson9.callbacks import Callback
    from lesson9.checkpoint import DivergenceCallback

    class ItemCheck(Callback):
        "The naive check: one host sync per training batch."
        def after_loss(self):
            if self.run.in_train and not math.isfinite(self.run.loss.item()): raise RuntimeError('diverged')

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    spec = worker.MODELS['lesson']
    data = worker.make_data(args.batches * spec['bs'], 0, dev)

    def loop4(extra):
        "worker.py's loop 4 (Runner + Recorder + one-cycle lr), with the callbacks `extra` added."
        import torch.nn.functional as F
        from lesson9 import anneal
        from lesson9.callbacks import DataBunch, Learner, get_runner
        model = worker.make_model(spec['sizes'], 0, dev)
        learn = Learner(model, torch.optim.SGD(model.parameters(), lr=spec['lr']), F.cross_entropy,
                        DataBunch(*worker._lesson9_loaders(data, spec['bs'], 0), c=10))
        cbs = [anneal.Recorder(), *worker.one_cycle_cbs(spec['lr'], anneal), *extra]
        return lambda: get_runner(cbs=cbs, report=None).fit(1, learn)

    variants = {'loop 1': worker.loop1(worker.make_model(spec['sizes'], 0, dev), spec['lr'], data, spec['bs'], 0)}
    for name, extra in (('loop 4', []), ('+ check', [DivergenceCallback()]), ('+ check/50', [DivergenceCallback(every=50)]),
                        ('+ item() check', [ItemCheck()])):
        variants[name] = loop4(extra)
    names = list(variants)
    for f in variants.values(): f(); sync()  # warm-up
    times = {k: [] for k in names}
    for r in range(args.reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter(); variants[k](); sync(); times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = lambda k, base: statistics.median(a / b for a, b in zip(times[k], times[base]))
    rows = [f"| {k} | {1000*med[k]:.1f} | {paired(k, 'loop 4'):.3f} | {paired(k, 'loop 1'):.3f} |" for k in names]
    print(f"Divergence check, {args.batches} training batches of {spec['bs']} per epoch, {args.reps} rounds, device {dev}\n")
    print("| variant | ms/epoch (median) | x loop 4 (paired) | x loop 1 (paired) |\n|---|---|---|---|\n" + '\n'.join(rows))


if __name__ == '__main__': main()
