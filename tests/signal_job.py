"""`python -m lesson9` with a SIGTERM at a known point, for tests/test_cli_torchrun.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/signal_job.py [lesson9-train options]

At the end of epoch 1, process 0 sends SIGTERM to its parent, torchrun (what `kill <torchrun's pid>` does), and
waits until torchrun has passed the signal on to it, as to every process, before the ranks decide together
whether to stop. So the job stops after epoch 1 however slowly the machine runs; a signal sent from outside
after reading the table would race the remaining epochs.
"""
import os, signal, sys, time

from lesson9.cli import main
from lesson9.distributed import DistributedCheckpoint

_after_epoch = DistributedCheckpoint.after_epoch

def _signalled_after_epoch(self):
    if self.run.epoch == 0 and os.environ.get('RANK') == '0':
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 120
        while self.stop_requested is None and time.monotonic() < deadline: time.sleep(0.01)  # the job's handler records it
    _after_epoch(self)

DistributedCheckpoint.after_epoch = _signalled_after_epoch

if __name__ == '__main__': sys.exit(main())
