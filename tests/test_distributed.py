"""Training under torchrun gives what one process gives: weights, every rank's history, exact validation metrics.

Each job is tests/dist_worker.py under `python -m torch.distributed.run` on 127.0.0.1 with gloo, CPU only. Besides
the main training it trains on a few small sets cut unevenly across the ranks (`dist_worker.EDGES`) and checks
`DistributedCheckpoint`.
Starting torch in a process takes seconds on a small machine, so all jobs start together once per module
(`jobs`), and each test checks the files one job left: 3 processes on one machine, 2 processes, 2 processes
of which one fails, and two simulated machines (two torchrun agents, `--nnodes=2`) of one process each.
The one-process reference is the same training run here, without the distributed callback.
"""
import json, multiprocessing, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

import dist_worker as W
from lesson9.callbacks import format_stats, get_runner
from lesson9.distributed import DistributedCallback, distributed
from lesson9.training import accuracy

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent/'dist_worker.py'
HANG_GUARD = 300  # seconds: a job still running by then is hung (a failure, not a speed limit)


def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _dirs(tmp, name):
    "Fresh `results` and `out` folders for one job."
    results, out = tmp/name/'results', tmp/name/'out'
    results.mkdir(parents=True); out.mkdir()
    return results, out


def _torchrun(torchrun_args, results, out, worker_args=()):
    "Start `torchrun <torchrun_args> dist_worker.py results out <worker_args>` (one agent) in the background."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', *torchrun_args, str(WORKER), str(results), str(out), *worker_args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out)


class Job:
    "A torchrun job (one agent per simulated machine) started at once; waited for when a test first needs it."
    def __init__(self, tmp, name, agents, worker_args=()):
        self.results, self.out = _dirs(tmp, name)
        self.procs = [_torchrun(a, self.results, self.out, worker_args) for a in agents]
        self._done = None

    def wait(self)->list:
        "`(returncode, stdout, stderr)` of each agent."
        if self._done is None:
            outs = []
            for p in self.procs:
                try: stdout, stderr = p.communicate(timeout=HANG_GUARD)
                except subprocess.TimeoutExpired:
                    for q in self.procs: q.kill()
                    pytest.fail(f"a torchrun job was still running after {HANG_GUARD} s: hung")
                outs.append((p.returncode, stdout, stderr))
            self._done = outs
        return self._done

    def ranks(self)->list:
        "Each rank's results in rank order, after checking that every agent succeeded."
        for rc, stdout, stderr in self.wait(): assert rc == 0, f"torchrun exited {rc}:\n{stdout}\n{stderr}"
        return [torch.load(self.results/f'rank{r}.pt') for r in range(len(list(self.results.glob('rank*.pt'))))]


@pytest.fixture(scope='module')
def jobs(tmp_path_factory):
    "All jobs, started together: 3 and 2 processes, 2 with a failing rank 1, and 2 machines of 1 process."
    tmp, port = tmp_path_factory.mktemp('dist'), _free_port()
    nodes = [['--nnodes=2', '--nproc_per_node=1', f'--node_rank={i}', '--master_addr=127.0.0.1', f'--master_port={port}'] for i in (0, 1)]
    js = {3: Job(tmp, 'three', [['--standalone', '--nproc_per_node=3']]),
          2: Job(tmp, 'two', [['--standalone', '--nproc_per_node=2']]),
          'nodes': Job(tmp, 'nodes', nodes),
          'fail': Job(tmp, 'fail', [['--standalone', '--nproc_per_node=2']], ['--fail-rank', '1'])}
    yield js
    for j in js.values():
        for p in j.procs:
            if p.poll() is None: p.kill()


@pytest.fixture(scope='module')
def one_process():
    "The same training in this process, without the distributed callback: `(weights, history)`."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    learn = W.make_learner()
    run = get_runner(metrics={'acc': accuracy}, report=None)
    run.fit(W.EPOCHS, learn)
    torch.set_num_threads(n)
    return learn.model.state_dict(), run.avg_stats.history


@pytest.fixture(scope='module')
def one_process_edges():
    "Each of `dist_worker.EDGES` trained in this process, without the distributed callback."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: return [W.fit_edge(e) for e in W.EDGES]
    finally: torch.set_num_threads(n)


def _max_diff(a:dict, b:dict)->float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _evaluate(weights:dict)->dict:
    "A one-process evaluation of `weights` on the whole validation set: mean loss and accuracy."
    learn = W.make_learner(); learn.model.load_state_dict(weights)
    x, y = learn.data.valid_ds.x, learn.data.valid_ds.y
    with torch.no_grad(): pred = learn.model(x)
    return {'valid_loss': learn.loss_func(pred, y).item(), 'valid_acc': accuracy(pred, y).item()}


@pytest.mark.parametrize('job', [2, 3, 'nodes'])
def test_weights_equal_one_process(jobs, one_process, job):
    ranks = jobs[job].ranks()
    assert [r['rank'] for r in ranks] == list(range(len(ranks))) and ranks[0]['world_size'] == len(ranks) == (3 if job == 3 else 2)
    for r in ranks[1:]: assert _max_diff(r['weights'], ranks[0]['weights']) == 0, f"rank {r['rank']} ended with other weights than rank 0"
    assert _max_diff(ranks[0]['weights'], one_process[0]) < 1e-5


@pytest.mark.parametrize('job', [2, 3])
def test_every_rank_holds_the_global_history(jobs, one_process, job):
    ranks = jobs[job].ranks()
    for r in ranks:
        assert r['history'] == ranks[0]['history'], f"rank {r['rank']}'s history differs from rank 0's"
        assert (r['train_count'], r['valid_count']) == (W.N_TRAIN, W.N_VALID)  # every sample once: none missed, none padded
    hist, ref = ranks[0]['history'], one_process[1]
    assert [h.keys() for h in hist] == [h.keys() for h in ref] and len(hist) == W.EPOCHS
    for h, g in zip(hist, ref):
        for k in h: assert h[k] == pytest.approx(g[k], abs=1e-5), (k, h[k], g[k])


@pytest.mark.parametrize('job', [2, 3])
def test_validation_equals_one_process_evaluation(jobs, job):
    rank0 = jobs[job].ranks()[0]
    last, ref = rank0['history'][-1], _evaluate(rank0['weights'])
    assert last['valid_loss'] == pytest.approx(ref['valid_loss'], abs=1e-6)
    assert last['valid_acc'] == pytest.approx(ref['valid_acc'], abs=1e-6)


@pytest.mark.parametrize('job', [2, 3, 'nodes'])
def test_uneven_parts_give_what_one_process_gives(jobs, one_process_edges, job):
    # parts of no samples, batches smaller than the world, sizes no world size divides, shuffled or not
    ranks = jobs[job].ranks()
    for edge, ref, *got in zip(W.EDGES, one_process_edges, *(r['edges'] for r in ranks)):
        for r, g in enumerate(got):
            assert _max_diff(g['weights'], got[0]['weights']) == 0 and torch.equal(g['losses'], got[0]['losses']), (edge, r)
            assert g['history'] == got[0]['history'] and g['counts'] == edge[:2], (edge, r)  # every sample once, each epoch
        g = got[0]
        assert _max_diff(g['weights'], ref['weights']) < 1e-5, edge
        # every batch's loss is the global batch's: no NaN for an empty part, what the divergence check and a plot read
        assert g['losses'].shape == ref['losses'].shape and torch.allclose(g['losses'], ref['losses'], atol=1e-6, rtol=0), edge
        for h, hr in zip(g['history'], ref['history']):
            assert h.keys() == hr.keys() and all(h[k] == pytest.approx(hr[k], abs=1e-6) for k in h), (edge, h, hr)


@pytest.mark.parametrize('edge', W.EDGES)
def test_uneven_parts_in_a_world_of_one(monkeypatch, one_process_edges, edge):
    # torchrun --nproc_per_node=1 sets these: no process group, and the callback changes nothing, to the bit
    monkeypatch.setenv('RANK', '0'); monkeypatch.setenv('LOCAL_RANK', '0'); monkeypatch.setenv('WORLD_SIZE', '1')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: got = W.fit_edge(edge, [DistributedCallback()])
    finally: torch.set_num_threads(n)
    ref = one_process_edges[W.EDGES.index(edge)]
    assert _max_diff(got['weights'], ref['weights']) == 0 and torch.equal(got['losses'], ref['losses'])
    assert got['history'] == ref['history'] and got['counts'] == ref['counts'] == edge[:2]


@pytest.mark.parametrize('job', [2, 3])
def test_a_stop_asked_on_one_rank_stops_every_rank_after_the_epoch(jobs, job):
    # DistributedCheckpoint: the highest rank alone asks during epoch 1; rank 0 alone writes, slowly, and every rank
    # finds the file whole when its fit returns
    ranks = jobs[job].ranks()
    for r in ranks:
        assert r['ck_stopped_at'] == {'epoch': 1, 'in_train': True, 'iter': 0}, r['rank']
        assert r['ck_writes'] == (['dist_checkpoint.pt'] if r['rank'] == 0 else []), r['rank']
        assert r['ck_epoch'] == 1, f"rank {r['rank']} went on before rank 0 had written the checkpoint"


def test_only_rank_0_reports_and_writes(jobs):
    job = jobs[3]
    ranks = job.ranks()
    (rc, stdout, stderr), = job.wait()
    assert sorted(p.name for p in job.out.iterdir()) == ['checkpoint.pt', 'dist_checkpoint.pt', 'history.json']
    saved = json.loads((job.out/'history.json').read_text())
    assert saved['written_by'] == 0 and saved['history'] == ranks[0]['history']
    # one report per epoch (rank 0's), not one per rank
    assert [l for l in stdout.splitlines() if l.startswith('epoch ')] == [format_stats(h) for h in ranks[0]['history']]


def test_every_rank_resumes_from_rank_0s_checkpoint(jobs):
    for r in jobs[3].ranks():  # one epoch, rank 0's checkpoint, loaded by every rank, one more epoch: as two epochs straight
        assert _max_diff(r['resumed_weights'], r['weights']) < 1e-6, f"rank {r['rank']}"


def test_a_failing_rank_ends_the_job(jobs):
    job = jobs['fail']
    (rc, stdout, stderr), = job.wait()
    assert rc != 0
    assert 'rank 1 of 2 failed: RuntimeError: deliberate failure on rank 1' in stderr, stderr
    assert 'deliberate failure on rank 1' in stderr.split('Root Cause')[-1], stderr  # torchrun's summary has the traceback
    assert not list(job.results.iterdir()) and not list(job.out.iterdir())  # no rank got to the end


def _rank_main(rank, port, seeds, results, layer=None):
    "One of two ranks started by hand (torchrun's variables set here): fit one epoch with its loader seeded by `seeds[rank]`."
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        with distributed(timeout=W.TIMEOUT):
            get_runner([DistributedCallback(timeout=W.TIMEOUT)], report=None).fit(1, W.make_learner(seeds[rank], layer=layer))
        outcome = 'ok'
    except Exception as e: outcome = f"{type(e).__name__}: {e}"
    (results/f'rank{rank}.txt').write_text(outcome)


@pytest.mark.parametrize('seeds,error', [((2, 3), "ValueError: ranks [1] would not draw the same batches as rank 0"),
                                         ((None, None), "ValueError: the training loader shuffles with torch's global generator (seed=None)")])
def test_ranks_that_would_draw_different_batches_stop_at_once(tmp_path, seeds, error):
    _two_ranks(tmp_path, error, seeds)


@pytest.mark.parametrize('layer,error', [
    (torch.nn.BatchNorm1d(5), "ValueError: DistributedCallback cannot give one process's result with layer '1' (BatchNorm1d): "
                              "in training it normalises with the statistics of the batch"),
    (torch.nn.Dropout(0.5), "ValueError: DistributedCallback cannot give one process's result with layer '1' (Dropout): "
                            "in training it draws random masks")])
def test_layers_that_see_the_whole_batch_are_refused_at_once(tmp_path, layer, error):
    _two_ranks(tmp_path, error, (2, 2), layer)


def _two_ranks(tmp_path, error, seeds, layer=None):
    "Fit on two ranks forked from this process; both must stop with `error`, and none hang."
    # two processes forked from this one (torch is already imported: they start at once), without torchrun
    ctx, port = multiprocessing.get_context('fork'), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, seeds, tmp_path, layer)) for r in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(HANG_GUARD)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive(): p.kill()
    assert not hung, "a rank was still running: hung"
    outcomes = [(tmp_path/f'rank{r}.txt').read_text() for r in range(2)]
    assert all(o.startswith(error) for o in outcomes), outcomes  # the same clear error on both ranks, no hang


def _hanging_rank_main(rank, port, release, results):
    "Rank 1 joins the group, then hangs (alive, in no collective) until `release` is set; rank 0 trains."
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        with distributed(timeout=3):
            if rank == 1: release.wait(HANG_GUARD)
            else: get_runner([DistributedCallback(timeout=3)], report=None).fit(1, W.make_learner())
        outcome = 'ok'
    except Exception as e: outcome = f"{type(e).__name__}: {e}"
    (results/f'rank{rank}.txt').write_text(outcome)


def test_a_hanging_rank_is_ended_by_the_timeout(tmp_path):
    ctx, port = multiprocessing.get_context('fork'), _free_port()
    release = ctx.Event()
    procs = [ctx.Process(target=_hanging_rank_main, args=(r, port, release, tmp_path)) for r in range(2)]
    for p in procs: p.start()
    procs[0].join(HANG_GUARD)  # rank 0 waits for rank 1 in its first collective, at most the timeout
    still_waiting = procs[0].is_alive()
    release.set()
    for p in procs: p.join(HANG_GUARD)
    for p in procs:
        if p.is_alive(): p.kill()
    assert not still_waiting, "rank 0 was still waiting for the hanging rank: no timeout"
    outcome = (tmp_path/'rank0.txt').read_text()
    assert outcome.startswith('RuntimeError') and 'timed out' in outcome.lower(), outcome
