"""bf16 against fp32: speed and final accuracy of the same training, side by side in one process.

    python bench/precision.py [--seeds 5] [--epochs 3] [--device cpu] [--threads 1]

For each seed, the lesson MLP (784-50-10, SGD lr 0.2, bs 64, constant lr) is trained on the embedded digits
(8,000 training, 2,000 validation) for `--epochs` epochs twice from the same weights and batch order: once in
fp32, once with `lesson9.extras.MixedPrecision('bf16')` (and, with `--device cuda`, once more in fp16).
The order of the two alternates from seed to seed. Each fit is timed whole (training and validation).

The table shows, per precision, the median over seeds of the fit time and of the final validation accuracy
and loss, and the medians over seeds of the paired ratios to fp32 (time, accuracy) and the largest
|difference| in accuracy and loss: each ratio compares two fits run seconds apart, from the same start.
"""
import argparse, statistics, sys, time

import worker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    import torch
    worker.set_threads(args.threads)
    sys.path.insert(0, worker.REPO)
    from lesson9.callbacks import DataBunch, DeviceCallback, Learner, get_model, get_runner
    from lesson9.data import get_data
    from lesson9.extras import MixedPrecision
    from lesson9.training import Dataset, cross_entropy, get_dls

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    x, y, xv, yv = (t.to(dev) for t in get_data())
    precisions = ['fp32', 'bf16'] + (['fp16'] if dev.type == 'cuda' else [])

    def fit(seed, precision):
        torch.manual_seed(seed)
        data = DataBunch(*get_dls(Dataset(x, y), Dataset(xv, yv), 64, seed=seed), c=10)
        learn = Learner(*get_model(data, lr=0.2), cross_entropy, data)
        run = get_runner([DeviceCallback(dev)] + ([MixedPrecision(precision)] if precision != 'fp32' else []), report=None)
        sync(); t = time.perf_counter()
        run.fit(args.epochs, learn)
        sync()
        return dict(seconds=time.perf_counter() - t, **run.avg_stats.history[-1])

    fit(0, 'bf16'); fit(0, 'fp32')  # warm-up: imports, allocator, autocast's first casts
    res = {k: [] for k in precisions}
    for seed in range(args.seeds):
        order = precisions[seed % len(precisions):] + precisions[:seed % len(precisions)]
        for k in order: res[k].append(fit(seed, k))
    med = lambda k, f: statistics.median(f(r) for r in res[k])
    paired = lambda k, f: statistics.median(f(a, b) for a, b in zip(res[k], res['fp32']))
    worst = lambda k, key: max(abs(a[key] - b[key]) for a, b in zip(res[k], res['fp32']))
    print(f"fp32 and mixed precision, lesson MLP on the embedded digits, {args.epochs} epochs, {args.seeds} seeds, "
          f"device {dev}, {args.threads} thread(s)\n")
    print("| precision | s/fit (median) | x fp32 time (paired) | valid acc (median) | x fp32 acc (paired) | max abs acc diff | max abs loss diff |\n"
          "|---|---|---|---|---|---|---|")
    for k in precisions:
        print(f"| {k} | {med(k, lambda r: r['seconds']):.2f} | {paired(k, lambda a, b: a['seconds'] / b['seconds']):.3f} | "
              f"{med(k, lambda r: r['valid_acc']):.4f} | {paired(k, lambda a, b: a['valid_acc'] / b['valid_acc']):.4f} | "
              f"{worst(k, 'valid_acc'):.4f} | {worst(k, 'valid_loss'):.4f} |")


if __name__ == '__main__': main()
