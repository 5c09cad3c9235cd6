"""Where does loop 4's extra time per batch go? Build the plain loop up to lesson9's Runner one piece at a time.

    python bench/overhead.py [--reps 15] [--batches 200] [--device cpu]

All variants train the lesson MLP on the same batches, in one process, alternating over `--reps` rounds;
the table shows the fastest round's process CPU time per training batch (the minimum is the least disturbed
by other processes on a busy machine) and the step from the previous line. Each step adds one thing:

  a  plain loop, no stats                       e  Runner(): TrainEvalCallback only
  b  + loop 1's stats (loss and correct count)  f  + AvgStatsCallback with no metric (the loss only)
  c  b with lesson9's `accuracy` per batch      g  + accuracy: get_runner()'s defaults
  d  03's fit                                   h  + Recorder + ParamScheduler (loop 4)
"""
import argparse, statistics, sys, time

import worker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--batches', type=int, default=200)
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    worker.set_threads(1)
    sys.path.insert(0, worker.REPO)
    from lesson9 import anneal
    from lesson9.callbacks import AvgStatsCallback, DataBunch, Learner, Runner, get_runner
    from lesson9.training import accuracy, fit

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    spec = worker.MODELS['lesson']
    data = worker.make_data(args.batches * spec['bs'], 0, dev)
    train_dl, valid_dl = worker._lesson9_loaders(data, spec['bs'], 0)
    model = worker.make_model(spec['sizes'], 0, dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    learn = Learner(model, opt, F.cross_entropy, DataBunch(train_dl, valid_dl, c=10))

    def plain(stats):
        def run():
            for dl, training in ((train_dl, True), (valid_dl, False)):
                model.train(training)
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                correct = torch.zeros((), dtype=torch.float64 if stats == 'lesson9' else torch.int64, device=dev)
                with torch.set_grad_enabled(training):
                    for xb, yb in dl:
                        out = model(xb)
                        loss = F.cross_entropy(out, yb)
                        if training: loss.backward(); opt.step(); opt.zero_grad()
                        if stats == 'loop1':
                            loss_sum.add_(loss.detach(), alpha=len(yb)); correct.add_((out.detach().argmax(1) == yb).sum())
                        elif stats == 'lesson9':
                            loss_sum.add_(loss.detach(), alpha=len(yb)); correct.add_(accuracy(out.detach(), yb), alpha=len(yb))
                loss_sum.item(); correct.item()
        return run

    sched = anneal.sched_cos(0.1, 0.01)
    variants = {
        'a plain, no stats': plain(None),
        'b + loop 1 stats (loop 1)': plain('loop1'),
        'c b with lesson9 accuracy': plain('lesson9'),
        'd 03 fit (loop 3)': lambda: fit(1, model, F.cross_entropy, opt, train_dl, valid_dl),
        'e Runner(), TrainEvalCallback': lambda: Runner().fit(1, learn),
        'f + AvgStatsCallback, loss only': lambda: Runner([AvgStatsCallback([], report=None)]).fit(1, learn),
        'g + accuracy: get_runner()': lambda: get_runner(report=None).fit(1, learn),
        'h + Recorder + ParamScheduler (loop 4)': lambda: get_runner([anneal.Recorder(), anneal.ParamScheduler('lr', sched)],
                                                                     report=None).fit(1, learn),
    }
    times = {k: [] for k in variants}
    for f in variants.values(): f()  # warm-up
    for rep in range(args.reps):
        for k, f in variants.items():
            sync(); t = time.process_time(); f(); sync()
            times[k].append(time.process_time() - t)
    n = len(train_dl)
    print(f"per training batch, fastest of {args.reps} rounds ({n} training + {len(valid_dl)} validation batches per round)")
    prev = base = None
    for k, ts in times.items():
        us = min(ts) / n * 1e6
        if k.startswith('b'): base = us
        step = '' if prev is None else f"{us - prev:+6.1f}"
        vs = '' if base is None else f"{us / base:.3f} x b"
        print(f"{k:40s} {us:7.1f} us  {step:>7s}  {vs}   (median {statistics.median(ts) / n * 1e6:.1f})")
        prev = us


if __name__ == '__main__':
    main()
