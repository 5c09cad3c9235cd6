"""Where does loop 4's extra time per batch go? Build the plain loop up to lesson9's Runner one piece at a time.

    python bench/overhead.py [--reps 15] [--batches 200] [--device cpu]

All variants train the lesson MLP on the same batches, in one process, alternating over `--reps` rounds;
the table shows the fastest round's process CPU time per training batch (the minimum is the least disturbed
by other processes on a busy machine), the step from the previous line, and two ratios to b (loop 1):
fastest over fastest, and the median over rounds of the paired ratio. Each step adds one thing:

  a  plain loop, no stats                       e  Runner(): TrainEvalCallback only
  b  + loop 1's stats (loss and correct count)  f  + AvgStatsCallback with no metric (the loss only)
  c  b with lesson9's `accuracy` per batch      g  + accuracy: get_runner()'s defaults
  d  03's fit                                   h  + Recorder + ParamScheduler (loop 4)

and two more:

  i  h with accuracy as a batch mean weighted back by the batch size (how AvgStats added it before it knew
     that accuracy's batch sum is the number correct, `n_correct`)
  j  h through the fast path: `FastRunner`, each training batch one compiled step (compiled in the warm-up)
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
    from lesson9.fast import FastRunner
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

    def mean_stats_runner():
        "h, with accuracy wrapped so that AvgStats does not recognise it: a batch mean, weighted back by the batch size."
        return get_runner([anneal.Recorder(), anneal.ParamScheduler('lr', sched)], metrics={'acc': lambda o, y: accuracy(o, y)},
                          report=None)

    sched = anneal.sched_cos(0.1, 0.01)
    # one runner for all rounds: its compiled step is kept (the warm-up below compiles it)
    fast_runner = FastRunner([AvgStatsCallback({'acc': accuracy}, report=None), anneal.Recorder(), anneal.ParamScheduler('lr', sched)])
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
        'i h, accuracy as a weighted mean': lambda: mean_stats_runner().fit(1, learn),
        'j h through the fast path (compiled)': lambda: fast_runner.fit(1, learn),
    }
    times = {k: [] for k in variants}
    t = time.perf_counter()
    for f in variants.values(): f()  # warm-up (j compiles its step here)
    print(f"warm-up {time.perf_counter() - t:.1f} s, of which compiling the fast step {fast_runner.fast.compile_seconds:.1f} s")
    for rep in range(args.reps):
        for k, f in variants.items():
            sync(); t = time.process_time(); f(); sync()
            times[k].append(time.process_time() - t)
    n = len(train_dl)
    print(f"per training batch ({n} training + {len(valid_dl)} validation batches per round, {args.reps} rounds): "
          "fastest round, step from the line above, fastest / fastest of b, median over rounds of (variant / b)")
    prev, base = None, times['b + loop 1 stats (loop 1)']
    for k, ts in times.items():
        us = min(ts) / n * 1e6
        step = '' if prev is None else f"{us - prev:+6.1f}"
        paired = statistics.median([t / b for t, b in zip(ts, base)])
        print(f"{k:40s} {us:7.1f} us  {step:>7s}  {min(ts) / min(base):.3f}  {paired:.3f}")
        prev = us

if __name__ == '__main__':
    main()
