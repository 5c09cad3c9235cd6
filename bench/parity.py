"""Parity check: loops 1, 3 and 4 of bench/worker.py, one epoch each from the same weights and batch order,
must end with the same losses and weights (to 1e-5). Loop 4 runs here with a constant-lr `ParamScheduler`
(`sched_no(lr, lr)`), so that the whole Runner + Recorder + ParamScheduler path is exercised and must do
exactly the arithmetic of the plain loop. Prints one JSON line."""
import argparse, json

import worker

TOL = 1e-5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--samples', type=int, default=50_000)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    import torch
    worker.set_threads(args.threads)
    device = torch.device(args.device)
    spec = worker.MODELS['lesson']
    data = worker.make_data(args.samples, args.seed, device)
    builders = {1: worker.loop1, 3: worker.loop3, 4: lambda *a: worker.loop4(*a, schedule='constant')}
    stats, weights = {}, {}
    for loop, build in builders.items():
        model = worker.make_model(spec['sizes'], args.seed, device)
        stats[loop] = build(model, spec['lr'], data, spec['bs'], args.seed)()
        weights[loop] = torch.cat([q.detach().flatten() for q in model.parameters()]).cpu()
    diffs = {}
    for loop in (3, 4):
        for k in ('train_loss', 'train_acc', 'valid_loss', 'valid_acc'):
            diffs[f'loop {loop} {k}'] = abs(stats[loop][k] - stats[1][k])
        diffs[f'loop {loop} weights'] = (weights[loop] - weights[1]).abs().max().item()
    max_diff = max(diffs.values())
    print(json.dumps(dict(ok=max_diff <= TOL, max_diff=max_diff, tol=TOL, diffs=diffs, loops=stats,
                          loop4_with_anneal=worker.anneal_available())))


if __name__ == '__main__':
    main()
