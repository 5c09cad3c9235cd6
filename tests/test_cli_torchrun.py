"""The main job under torchrun, as users launch it: the same outputs as one process, --evaluate agrees with the
run's own validation, a stopped job carries on with the same number of processes, two simulated machines."""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']
def args(epochs=2): return ['-m', 'lesson9', '--epochs', str(epochs), '--schedule', 'constant', '--device', 'cpu']
ARGS = args()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def job(*argv, **kw):
    return subprocess.run(list(argv), capture_output=True, text=True, env=ENV, timeout=600, **kw)


def close(a, b, tol=1e-5):
    "Histories equal to `tol` (sums over ranks are added in another order than in one process)."
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra: assert abs(ra[k] - rb[k]) <= tol, (k, ra[k], rb[k])


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp('one')
    r = job(sys.executable, *ARGS, '--out', str(d))
    assert r.returncode == 0, r.stderr
    return d


def summary(d): return json.loads((Path(d)/'summary.json').read_text())


def test_three_processes_give_the_outputs_of_one(one_process, tmp_path):
    r = job(*TORCHRUN, '--standalone', '--nproc_per_node=3', *ARGS, '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('train_loss') == 1 and r.stdout.count('valid accuracy') == 1   # rank 0 alone prints
    s, ref = summary(tmp_path), summary(one_process)
    assert s['status'] == 'finished' and s['config']['processes'] == 3
    assert sorted(s['files']) == sorted(ref['files'])
    close(s['history'], ref['history'])
    w, wr = (torch.load(Path(d)/'model.pt', weights_only=True) for d in (tmp_path, one_process))
    assert all(torch.allclose(w[k], wr[k], atol=1e-5, rtol=0) for k in w)
    ev = job(sys.executable, '-m', 'lesson9', '--evaluate', '--out', str(tmp_path))
    assert ev.returncode == 0, ev.stderr
    loss = float(ev.stdout.split()[1])
    assert abs(loss - s['final']['valid_loss']) <= 1e-6, (loss, s['final'])


def digits(path, n):
    "The first `n` embedded training digits as an .npz at `path` (the job keeps 20% of them for validation)."
    import numpy as np
    from lesson9.data import get_data
    x, y = get_data()[:2]
    np.savez(path, x=x[:n].numpy(), y=y[:n].numpy())
    return str(path)


def test_a_stopped_job_carries_on_with_as_many_processes(tmp_path):
    # short epochs (800 digits), 20 of them. Process 0 sends torchrun the SIGTERM itself, at the end of epoch 1, and
    # waits for torchrun to pass it on (tests/signal_job.py): sent from here after reading the table, the signal
    # raced the other 19 epochs (about a second), and a loaded machine could finish them first
    run_args = ['--epochs', '20', '--schedule', 'constant', '--device', 'cpu', '--data', digits(tmp_path/'small.npz', 800)]
    out = tmp_path/'out'
    # torchrun kills its processes 30 s after passing a signal on (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): time enough for
    # process 0 to publish the outputs on a loaded machine
    p = subprocess.run([*TORCHRUN, '--standalone', '--nproc_per_node=2', str(ROOT/'tests'/'signal_job.py'), *run_args,
                        '--out', str(out)], capture_output=True, text=True, env=dict(ENV, TORCH_ELASTIC_SHUTDOWN_TIMEOUT='300', PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])),
                       timeout=600)
    s = summary(out)
    assert s['status'] == 'interrupted' and s['stopped_at'] == {'epoch': 1, 'in_train': True, 'iter': 0}, p.stderr[-2000:]
    assert len(s['history']) == 1 and s['message'].startswith('stopped by SIGTERM after epoch 1;'), s['message']
    run_args = ['-m', 'lesson9', *run_args]
    wrong = job(sys.executable, '-m', 'lesson9', '--resume', '--out', str(out))
    assert wrong.returncode == 2 and 'saved by 2 process(es)' in wrong.stderr, wrong.stderr
    r = job(*TORCHRUN, '--standalone', '--nproc_per_node=2', '-m', 'lesson9', '--resume', '--out', str(out))
    assert r.returncode == 0, r.stderr
    ref = job(sys.executable, *run_args, '--out', str(tmp_path/'ref'))
    assert ref.returncode == 0, ref.stderr
    # twenty epochs of sums over two processes, added in another order than one process adds them
    close(summary(out)['history'], summary(tmp_path/'ref')['history'], tol=1e-4)


def test_a_last_batch_smaller_than_the_world(tmp_path):
    # 101 digits: 81 to train in batches of 8, the last of one sample, so process 1's part of it is empty: its own mean
    # loss is NaN, and the divergence check must not read that as a diverged run
    run_args = ['-m', 'lesson9', '--epochs', '2', '--bs', '8', '--device', 'cpu', '--data', digits(tmp_path/'tiny.npz', 101)]
    r = job(*TORCHRUN, '--standalone', '--nproc_per_node=2', *run_args, '--out', str(tmp_path/'two'))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = job(sys.executable, *run_args, '--out', str(tmp_path/'one'))
    assert ref.returncode == 0, ref.stderr
    s = summary(tmp_path/'two')
    assert s['status'] == 'finished' and s['data']['n_train'] == 81 and s['config']['processes'] == 2
    close(s['history'], summary(tmp_path/'one')['history'])


def test_two_machines_simulated_on_this_one(one_process, tmp_path):
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, '--nnodes=2', '--nproc_per_node=1', f'--node_rank={k}', '--master_addr=127.0.0.1',
                               f'--master_port={port}', *ARGS, '--out', str(tmp_path/f'node{k}')],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for k in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert not (tmp_path/'node1'/'summary.json').exists()      # only the global rank 0 writes
    close(summary(tmp_path/'node0')['history'], summary(one_process)['history'])
