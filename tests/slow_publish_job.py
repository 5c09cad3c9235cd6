"""`python -m lesson9` whose process 0 takes `LESSON9_TEST_PUBLISH_DELAY` seconds more to write its outputs, for
tests/test_cli_torchrun.py. Each process notes in `LESSON9_TEST_TIMES/rank<N>` when it left the job, and process 0
when its outputs were in place: the others must leave after that, or torchrun, seeing a process leave with a code
other than 0, stops process 0 (and kills it 30 s later) while it writes.
"""
import os, sys, time
from pathlib import Path

from lesson9.checkpoint import RunFolder
from lesson9.cli import main

_publish = RunFolder.publish
times = Path(os.environ['LESSON9_TEST_TIMES'])

def _slow_publish(self, *args, **kw):
    time.sleep(float(os.environ.get('LESSON9_TEST_PUBLISH_DELAY', '0')))
    try: return _publish(self, *args, **kw)
    finally: (times/'published').write_text(repr(time.time()))

RunFolder.publish = _slow_publish

if __name__ == '__main__':
    code = main()
    (times/f"rank{os.environ['RANK']}").write_text(repr(time.time()))
    sys.exit(code)
