"""A small training job for tests/test_distributed.py, run by torchrun (one copy per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/dist_worker.py RESULTS OUT [--fail-rank R]

It trains for EPOCHS epochs; every rank writes what it ended with to RESULTS/rank<r>.pt, for the tests to
compare with one process. It trains the same way on each of EDGES, small sets cut unevenly (parts of no
samples, batches smaller than the world), with the divergence check on and every batch's loss recorded.
Then it checks the checkpoint recipe: a second training stops after one epoch,
rank 0 alone writes OUT/checkpoint.pt and OUT/history.json, as a main program would (each file is created
with mode 'x', so a second writer fails the job), and every rank resumes from the checkpoint for the
remaining epoch; RESULTS/rank<r>.pt also holds the weights that gives. Last, `DistributedCheckpoint`: the
highest rank alone asks to stop during epoch 1, and every rank records where it stopped, how many times
it wrote OUT/dist_checkpoint.pt, and whether the file was whole when its fit returned (rank 0 writes slowly).
With --fail-rank R, rank R raises during its second training batch.
"""
import argparse, json, time
from pathlib import Path

import torch
from torch import nn

import lesson9.distributed as D
from lesson9.callbacks import Callback, DataBunch, Learner, get_runner
from lesson9.checkpoint import DivergenceCallback
from lesson9.distributed import DistributedCallback, DistributedCheckpoint, barrier, distributed, is_main_process
from lesson9.training import SGD, DataLoader, Dataset, accuracy, cross_entropy

# 26 = 3 batches of 8 and one of 2: with 3 ranks the last batch's parts hold 1, 1 and 0 samples.
# 17 = one validation batch of 16 and one of 1: parts 6, 5, 5 then 1, 0, 0 (3 ranks), or 8, 8 then 1, 0 (2 ranks).
N_TRAIN, N_VALID, BS, EPOCHS, TIMEOUT = 26, 17, 8, 2, 60.
# (n_train, n_valid, bs, shuffle): sizes that neither 2 nor 3 divides. (7, 5, 2): batches of 2 < 3 ranks, a last of 1;
# (5, 4, 1): one sample per batch, so every rank but 0 has nothing; (11, 7, 4): parts 2, 1, 1 and a last batch of 3.
EDGES = [(7, 5, 2, False), (5, 4, 1, True), (11, 7, 4, True)]


def make_learner(seed:int=2, n_train:int=N_TRAIN, n_valid:int=N_VALID, bs:int=BS, shuffle:bool=True, layer:nn.Module=None)->Learner:
    "The same data, weights and optimizer in every process: a 6-5-3 MLP (with `layer` after the first linear), SGD with momentum, training batches shuffled by `seed`."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 6, generator=g)
    y = torch.randint(0, 3, (n_train + n_valid,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), *([layer] if layer is not None else []), nn.ReLU(), nn.Linear(5, 3))
    train_dl = DataLoader(Dataset(x[:n_train], y[:n_train]), bs, shuffle=shuffle, seed=seed)
    valid_dl = DataLoader(Dataset(x[n_train:], y[n_train:]), 2*bs, seed=seed)
    return Learner(model, SGD(model.parameters(), lr=0.3, momentum=0.9), cross_entropy, DataBunch(train_dl, valid_dl, 3))


class LossLog(Callback):
    "Every training batch's loss as the callbacks after the distributed one read it (`losses`, one tensor)."
    _order = 10
    def begin_fit(self): self._losses = []
    def after_loss(self):
        if self.run.in_train: self._losses.append(self.run.loss.detach())
    @property
    def losses(self)->torch.Tensor: return torch.stack(self._losses)


def fit_edge(edge, cbs=())->dict:
    "Train on `edge` for EPOCHS epochs with the divergence check on: the weights, history, counts and batch losses."
    n_train, n_valid, bs, shuffle = edge
    learn, log = make_learner(3, n_train, n_valid, bs, shuffle), LossLog()
    run = get_runner([*cbs, DivergenceCallback(every=1), log], metrics={'acc': accuracy}, report=None)
    run.fit(EPOCHS, learn)
    return {'weights': learn.model.state_dict(), 'history': run.avg_stats.history, 'losses': log.losses,
            'counts': (run.avg_stats.train_stats.count, run.avg_stats.valid_stats.count)}


class FailOnRank(Callback):
    "Raises during the second training batch on rank `rank`."
    def __init__(self, rank): self.rank = rank
    def begin_batch(self):
        if self.run.in_train and self.run.n_iter == 1 and self.distributed.world.rank == self.rank:
            raise RuntimeError(f"deliberate failure on rank {self.rank}")


class StopOnRank(Callback):
    "Asks `ckpt` to stop after the second training batch, on rank `rank` only (as a signal that reaches one process)."
    _order = 20
    def __init__(self, ckpt, rank): self.ckpt, self.rank = ckpt, rank
    def after_batch(self):
        if self.run.in_train and self.run.n_iter == 1 and self.distributed.world.rank == self.rank: self.ckpt.request_stop('test')


def _write_new(path, write):
    "Create `path` (mode 'x': it must not exist yet) and fill it with `write(f)`."
    with open(path, 'xb') as f: write(f)


def check_distributed_checkpoint(world, out:Path)->dict:
    "Fit with `DistributedCheckpoint`, the highest rank alone asking to stop: where each rank stopped, its writes, and the file it saw."
    writes, write = [], D.atomic_write
    def slow_write(path, fn):  # rank 0 takes a second to write: a rank that does not wait for it finds no file
        writes.append(Path(path).name); time.sleep(1.); write(path, fn)
    D.atomic_write = slow_write
    try:
        ckpt = DistributedCheckpoint(out/'dist_checkpoint.pt', every=100)
        run = get_runner([DistributedCallback(timeout=TIMEOUT), StopOnRank(ckpt, world.world_size - 1), ckpt], report=None)
        run.fit(EPOCHS, make_learner())
        saved = torch.load(ckpt.path, weights_only=False) if ckpt.path.exists() else None
    finally: D.atomic_write = write
    return {'ck_stopped_at': ckpt.stopped_at, 'ck_writes': writes, 'ck_epoch': None if saved is None else saved['runner']['epoch']}


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
                   'valid_count': run.avg_stats.valid_stats.count,
                   'edges': [fit_edge(e, [DistributedCallback(timeout=TIMEOUT)]) for e in EDGES]}

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
        results.update(check_distributed_checkpoint(world, out))
        torch.save({**results, 'resumed_weights': resumed.model.state_dict()}, Path(args.results)/f'rank{world.rank}.pt')


if __name__ == '__main__': main()
