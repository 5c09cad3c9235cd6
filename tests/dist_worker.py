"""A small training job for tests/test_distributed.py, run by torchrun (one copy per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/dist_worker.py RESULTS OUT [--fail-rank R]

It trains for EPOCHS epochs; every rank writes what it ended with to RESULTS/rank<r>.pt, for the tests to
compare with one process. Then it checks the checkpoint recipe: a second training stops after one epoch,
rank 0 alone writes OUT/checkpoint.pt and OUT/history.json, as a main program would (each file is created
with mode 'x', so a second writer fails the job), and every rank resumes from the checkpoint for the
remaining epoch; RESULTS/rank<r>.pt also holds the weights that gives.
With --fail-rank R, rank R raises during its second training batch.
"""
import argparse, json, sys
from pathlib import Path

import torch
from torch import nn

from lesson9.callbacks import Callback, DataBunch, Learner, get_runner
from lesson9.distributed import DistributedCallback, barrier, distributed, is_main_process
from lesson9.training import SGD, Dataset, accuracy, cross_entropy, get_dls

# 26 = 3 batches of 8 and one of 2: with 3 ranks the last batch's parts hold 1, 1 and 0 samples.
# 17 = one validation batch of 16 and one of 1: parts 6, 5, 5 then 1, 0, 0 (3 ranks), or 8, 8 then 1, 0 (2 ranks).
N_TRAIN, N_VALID, BS, EPOCHS, TIMEOUT = 26, 17, 8, 2, 60.


def make_learner(seed:int=2)->Learner:
    "The same data, weights and optimizer in every process: a 6-5-3 MLP, SGD with momentum, loaders shuffled by `seed`."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VALID, 6, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_VALID,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    train_dl, valid_dl = get_dls(Dataset(x[:N_TRAIN], y[:N_TRAIN]), Dataset(x[N_TRAIN:], y[N_TRAIN:]), BS, seed=seed)
    return Learner(model, SGD(model.parameters(), lr=0.3, momentum=0.9), cross_entropy, DataBunch(train_dl, valid_dl, 3))


class FailOnRank(Callback):
    "Raises during the second training batch on rank `rank`."
    def __init__(self, rank): self.rank = rank
    def begin_batch(self):
        if self.run.in_train and self.run.n_iter == 1 and self.distributed.world.rank == self.rank:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")


def _write_new(path, write):
    "Create `path` (mode 'x': it must not exist yet) and fill it with `write(f)`."
    with open(path, 'xb') as f: write(f)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('results'); p.add_argument('out'); p.add_argument('--fail-rank', type=int)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with distributed(timeout=TIMEOUT) as world:
        learn = make_learner()
        cbs = [DistributedCallback(timeout=TIMEOUT)] + ([FailOnRank(args.fail_rank)] if args.fail_rank is not None else [])
        run = get_runner(cbs, metrics={'acc': accuracy})
        run.fit(EPOCHS, learn)
        results = {'rank': world.rank, 'world_size': world.world_size, 'weights': learn.model.state_dict(),
                   'history': run.avg_stats.history, 'train_count': run.avg_stats.train_stats.count,
                   'valid_count': run.avg_stats.valid_stats.count}

        # the checkpoint recipe: rank 0 saves after one epoch, every rank loads and trains the other epoch
        first = make_learner()
        get_runner([DistributedCallback(timeout=TIMEOUT)], report=None).fit(1, first)
        out = Path(args.out)
        if is_main_process():
            ckpt = {'model': first.model.state_dict(), 'opt': first.opt.state_dict(),
                    'train_generator': first.data.train_dl.sampler.generator.get_state()}
            _write_new(out/'checkpoint.pt', lambda f: torch.save(ckpt, f))
            _write_new(out/'history.json', lambda f: f.write(json.dumps({'written_by': world.rank, 'history': run.avg_stats.history}).encode()))
        barrier()  # the checkpoint is complete before any rank reads it
        ckpt = torch.load(out/'checkpoint.pt', map_location=world.device)
        resumed = make_learner()
        resumed.model.load_state_dict(ckpt['model']); resumed.opt.load_state_dict(ckpt['opt'])
        resumed.data.train_dl.sampler.generator.set_state(ckpt['train_generator'])
        get_runner([DistributedCallback(timeout=TIMEOUT)], report=None).fit(EPOCHS - 1, resumed)
        torch.save({**results, 'resumed_weights': resumed.model.state_dict()}, Path(args.results)/f'rank{world.rank}.pt')


if __name__ == '__main__': main()
