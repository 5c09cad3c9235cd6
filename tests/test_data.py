"""Download and caching of full MNIST, against an HTTP server on 127.0.0.1 that this test starts."""
import functools, gzip, hashlib, http.server, os, re, socketserver, subprocess, sys, threading, time
from pathlib import Path

import numpy as np
import pytest
import torch

import lesson9
from lesson9.data import (DataError, atomic_write, download, get_data, load_embedded, load_mnist, md5sum, read_idx,
                          write_idx, cache_dir)

N_TRAIN, N_TEST = 40, 12


class _Handler(http.server.SimpleHTTPRequestHandler):
    "Serves files from `directory`; counts requests; can pretend to be truncated."
    truncate = set()  # file names sent with a Content-Length larger than the body

    def log_message(self, *args): pass

    def do_GET(self):
        self.server.hits.append(self.path)
        name = self.path.lstrip('/')
        if name in self.truncate:
            body = (Path(self.directory)/name).read_bytes()
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body)//2])  # the connection closes early
            return
        super().do_GET()


@pytest.fixture
def mirror(tmp_path):
    "A folder of tiny MNIST-format files served on 127.0.0.1; yields (url, md5s, server)."
    served = tmp_path/'served'; served.mkdir()
    rng = np.random.default_rng(1)
    arrays = {'train-images-idx3-ubyte.gz': rng.integers(0, 256, (N_TRAIN, 28, 28)),
              'train-labels-idx1-ubyte.gz': rng.integers(0, 10, N_TRAIN),
              't10k-images-idx3-ubyte.gz': rng.integers(0, 256, (N_TEST, 28, 28)),
              't10k-labels-idx1-ubyte.gz': rng.integers(0, 10, N_TEST)}
    for k, a in arrays.items(): write_idx(served/k, a)
    md5s = {k: md5sum(served/k) for k in arrays}
    handler = type('H', (_Handler,), {'truncate': set()})
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(handler, directory=str(served)))
    srv.hits, srv.handler, srv.arrays, srv.folder = [], handler, arrays, served
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield f'http://127.0.0.1:{srv.server_port}/', md5s, srv
    srv.shutdown(); srv.server_close()


def _dead_url():
    "A URL on 127.0.0.1 where nothing listens."
    srv = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)
    port = srv.server_port; srv.server_close()
    return f'http://127.0.0.1:{port}/'


def test_success_splits_and_values(mirror, tmp_path):
    url, md5s, srv = mirror
    xt, yt, xv, yv, xs, ys = load_mnist(tmp_path/'cache', [url], md5s, n_valid=10, test=True)
    assert (xt.shape, xv.shape, xs.shape) == ((30, 784), (10, 784), (N_TEST, 784))
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    imgs = srv.arrays['train-images-idx3-ubyte.gz'].reshape(N_TRAIN, 784)
    assert torch.equal(torch.cat([xt, xv]), torch.tensor(imgs, dtype=torch.float32)/255)
    assert torch.equal(torch.cat([yt, yv]), torch.tensor(srv.arrays['train-labels-idx1-ubyte.gz']))
    assert sorted(p.name for p in (tmp_path/'cache').iterdir()) == sorted(md5s)


def test_cache_hit_needs_no_network(mirror, tmp_path):
    url, md5s, srv = mirror
    load_mnist(tmp_path, [url], md5s, n_valid=10)
    n = len(srv.hits)
    again = load_mnist(tmp_path, [_dead_url()], md5s, n_valid=10)  # no server at all this time
    assert len(srv.hits) == n and again[0].shape == (30, 784)


def test_corrupt_download_names_file_and_mirrors_and_leaves_nothing(mirror, tmp_path):
    url, md5s, srv = mirror
    bad = dict(md5s, **{'train-labels-idx1-ubyte.gz': '0'*32})
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path, [url, _dead_url()], bad, n_valid=10)
    msg = str(e.value)
    assert 'train-labels-idx1-ubyte.gz' in msg and url in msg and 'md5' in msg
    assert msg.count('http://127.0.0.1') == 2  # both mirrors are named
    assert not (tmp_path/'train-labels-idx1-ubyte.gz').exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no partial files


def test_truncated_download(mirror, tmp_path):
    url, md5s, srv = mirror
    srv.handler.truncate.add('train-images-idx3-ubyte.gz')
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte\.gz.*truncated'):
        download('train-images-idx3-ubyte.gz', md5s['train-images-idx3-ubyte.gz'], tmp_path/'c', [url], timeout=5)
    assert list((tmp_path/'c').iterdir()) == []


def test_server_down(tmp_path):
    dead = _dead_url()
    with pytest.raises(DataError) as e:
        download('t10k-labels-idx1-ubyte.gz', '0'*32, tmp_path, [dead], timeout=5)
    assert 't10k-labels-idx1-ubyte.gz' in str(e.value) and dead in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_file_is_replaced(mirror, tmp_path):
    url, md5s, srv = mirror
    name = 't10k-images-idx3-ubyte.gz'
    (tmp_path/name).write_bytes(b'garbage')
    p = download(name, md5s[name], tmp_path, [url])
    assert md5sum(p) == md5s[name]


def test_read_idx_rejects_wrong_format(tmp_path):
    (tmp_path/'x.gz').write_bytes(b'not gzip')
    with pytest.raises(DataError, match='x.gz is not a readable gzip'): read_idx(tmp_path/'x.gz')
    (tmp_path/'y.gz').write_bytes(gzip.compress(bytes([0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0])))
    with pytest.raises(DataError, match='y.gz is not an idx file of uint8'): read_idx(tmp_path/'y.gz')


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv('LESSON9_DATA', str(tmp_path/'here'))
    assert cache_dir() == tmp_path/'here'
    monkeypatch.delenv('LESSON9_DATA')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert cache_dir() == tmp_path/'lesson9'


def test_a_cache_that_is_a_file_is_named(tmp_path):
    (tmp_path/'cache').write_text('mine')
    for dest in (tmp_path/'cache', tmp_path/'cache'/'sub'):
        with pytest.raises(DataError, match=f"the data cache {dest} is not a folder"):
            download('t10k-labels-idx1-ubyte.gz', '0'*32, dest, ['http://127.0.0.1:9/'])
    assert (tmp_path/'cache').read_text() == 'mine'


def test_embedded_split_is_deterministic():
    a, b = load_embedded(), get_data('embedded')
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert [t.shape[0] for t in a] == [8000, 8000, 2000, 2000]
    with pytest.raises(DataError, match='n_valid .* got 0'): load_embedded(0)


# --- mirrors that misbehave, the deadline, the lock, and atomic_write ---------------------------------

@pytest.fixture
def serve():
    "Start a server on 127.0.0.1 for the test: `serve(handler, server_class)` returns (base URL, server)."
    started = []
    def start(handler, server_class=http.server.ThreadingHTTPServer):
        srv = server_class(('127.0.0.1', 0), handler); srv.daemon_threads = True
        srv.hits = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return f'http://127.0.0.1:{srv.server_address[1]}/', srv
    yield start
    for srv in started: srv.shutdown(); srv.server_close()


class _BrokenChunks(http.server.BaseHTTPRequestHandler):
    "Announces a chunked body, promises a chunk of 1000 bytes, sends 10 and hangs up (http.client: IncompleteRead)."
    protocol_version = 'HTTP/1.1'
    def log_message(self, *args): pass
    def do_GET(self):
        self.server.hits.append(self.path)
        self.send_response(200); self.send_header('Transfer-Encoding', 'chunked'); self.end_headers()
        self.wfile.write(b'3e8\r\n' + b'x'*10); self.close_connection = True


class _NotHTTP(socketserver.StreamRequestHandler):
    "A raw TCP server: reads the request, answers with garbage, hangs up (http.client: BadStatusLine)."
    def handle(self):
        self.server.hits.append('GET')
        while self.rfile.readline().strip(): pass
        self.wfile.write(b'SSH-2.0-definitely not HTTP\r\n\r\n')


class _Trickle(http.server.BaseHTTPRequestHandler):
    "Serves the right file from `directory`, one byte every 0.2 s: the body alone, or the whole reply with `head`."
    directory, head = None, False
    def log_message(self, *args): pass
    def do_GET(self):
        self.server.hits.append(self.path)
        body = (Path(self.directory)/self.path.lstrip('/')).read_bytes()
        reply = f'HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n'.encode() + body
        start = 0 if self.head else reply.index(b'\r\n\r\n') + 4
        try:
            self.wfile.write(reply[:start])
            for i in range(start, len(reply)): self.wfile.write(reply[i:i+1]); time.sleep(0.2)
        except OSError: pass  # the client hung up


NAME = 't10k-labels-idx1-ubyte.gz'


def test_broken_chunked_body_then_good_mirror(mirror, serve, tmp_path):
    url, md5s, good = mirror
    broken, bsrv = serve(_BrokenChunks)
    p = download(NAME, md5s[NAME], tmp_path, [broken, url], timeout=5)
    assert md5sum(p) == md5s[NAME] and bsrv.hits == ['/' + NAME] and good.hits == ['/' + NAME]
    with pytest.raises(DataError, match=f'{broken}{NAME}: IncompleteRead'):
        download(NAME, md5s[NAME], tmp_path/'other', [broken], timeout=5)


def test_not_http_reply_then_good_mirror(mirror, serve, tmp_path):
    url, md5s, good = mirror
    junk, jsrv = serve(_NotHTTP, socketserver.ThreadingTCPServer)
    p = download(NAME, md5s[NAME], tmp_path, [junk, url], timeout=5)
    assert md5sum(p) == md5s[NAME] and len(jsrv.hits) == 1 and good.hits == ['/' + NAME]


@pytest.mark.parametrize('head', [False, True], ids=['trickled body', 'trickled headers'])
def test_trickling_mirror_is_cut_off_at_the_deadline(mirror, serve, tmp_path, head):
    url, md5s, good = mirror
    # the whole file, trickled, would take several seconds and then be right: only the deadline moves on
    slow, ssrv = serve(type('T', (_Trickle,), {'directory': str(good.folder), 'head': head}))
    assert len((good.folder/NAME).read_bytes()) * 0.2 > 5
    p = download(NAME, md5s[NAME], tmp_path, [slow, url], timeout=5, deadline=1)
    assert md5sum(p) == md5s[NAME] and ssrv.hits == ['/' + NAME] and good.hits == ['/' + NAME]
    with pytest.raises(DataError, match=rf'{slow}{NAME}: cut off by the 0\.5s deadline'):
        download(NAME, md5s[NAME], tmp_path/'other', [slow], timeout=5, deadline=0.5)


def test_all_mirrors_bad_names_each_with_its_reason(mirror, serve, tmp_path):
    url, md5s, good = mirror
    broken, _ = serve(_BrokenChunks)
    junk, _ = serve(_NotHTTP, socketserver.ThreadingTCPServer)
    slow, _ = serve(type('T', (_Trickle,), {'directory': str(good.folder)}))
    dead = _dead_url()
    missing = dict(md5s, **{NAME: '0'*32})  # the good mirror serves other bytes than we expect
    with pytest.raises(DataError) as e:
        download(NAME, missing[NAME], tmp_path/'c', [dead, broken, junk, slow, url, url + 'nowhere/'],
                 timeout=5, deadline=0.5)
    msg = str(e.value)
    assert msg.startswith(f'could not download {NAME} into {tmp_path/"c"}: ')
    for part in [f'{dead}{NAME}: ConnectionRefusedError', f'{broken}{NAME}: IncompleteRead',
                 f'{junk}{NAME}: BadStatusLine', f'{slow}{NAME}: cut off by the 0.5s deadline',
                 f'{url}{NAME}: md5 {md5s[NAME]}, expected {"0"*32}', f'{url}nowhere/{NAME}: HTTP 404']:
        assert part in msg, (part, msg)
    assert 'cached copy' not in msg  # there was none
    assert list((tmp_path/'c').iterdir()) == []  # no .part, no lock file


def test_corrupt_cached_file_and_no_mirror_says_so(mirror, tmp_path):
    url, md5s, srv = mirror
    cached = tmp_path/NAME; cached.write_bytes(b'bit rot')
    dead = _dead_url()
    with pytest.raises(DataError) as e:
        download(NAME, md5s[NAME], tmp_path, [dead], timeout=5)
    msg = str(e.value)
    got = hashlib.md5(b'bit rot').hexdigest()
    assert f'cached copy {cached} was corrupt (md5 {got}, expected {md5s[NAME]})' in msg and f'{dead}{NAME}: ' in msg
    assert cached.read_bytes() == b'bit rot'  # nothing better arrived: left as it was
    assert download(NAME, md5s[NAME], tmp_path, [url]) == cached and md5sum(cached) == md5s[NAME]


class _Gated(http.server.SimpleHTTPRequestHandler):
    "Serves files, counts requests, and holds the first reply until `gate` is set."
    gate = None
    def log_message(self, *args): pass
    def do_GET(self):
        self.server.hits.append(self.path)
        if len(self.server.hits) == 1: self.gate.wait(60)
        super().do_GET()


_CHILD = "import sys; from lesson9.data import download; print(download(*sys.argv[1:4], [sys.argv[4]], timeout=60))"


def _waiting_on_flock(pid):
    "Whether process `pid` is blocked waiting for a flock (Linux lists waiters in /proc/locks with '->')."
    return any('->' in line and 'FLOCK' in line and f' {pid} ' in line for line in Path('/proc/locks').read_text().splitlines())


@pytest.mark.skipif(not Path('/proc/locks').exists(), reason='needs /proc/locks to see a waiting process')
def test_two_processes_fetch_the_file_once(mirror, serve, tmp_path):
    url, md5s, files = mirror
    gate = threading.Event()
    gated, srv = serve(functools.partial(type('G', (_Gated,), {'gate': gate}), directory=str(files.folder)))
    cache = tmp_path/'cache'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(lesson9.__file__).parents[1]), os.environ.get('PYTHONPATH', '')]))
    run = lambda: subprocess.Popen([sys.executable, '-c', _CHILD, NAME, md5s[NAME], str(cache), gated],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run()
    try:
        for _ in range(600):  # the first process's request has arrived and is held by the gate
            if srv.hits or first.poll() is not None: break
            time.sleep(0.1)
        assert srv.hits, first.communicate()
        second = run()
        try:
            # the second process either waits for the lock, or (without one) sends its own request
            for _ in range(600):
                if _waiting_on_flock(second.pid) or len(srv.hits) > 1 or second.poll() is not None: break
                time.sleep(0.1)
        finally:
            gate.set()
            out2, err2 = second.communicate(timeout=60)
    finally:
        gate.set()
        out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert out1.strip() == out2.strip() == str(cache/NAME)
    assert srv.hits == ['/' + NAME]  # fetched once
    assert md5sum(cache/NAME) == md5s[NAME] and [p.name for p in cache.iterdir()] == [NAME]


def _flock_waiters(path):
    "How many flock waiters Linux lists in /proc/locks for the file now at `path` (matched by inode)."
    ino = os.stat(path).st_ino
    return sum('->' in line and 'FLOCK' in line and line.split()[6].endswith(f':{ino}')
               for line in Path('/proc/locks').read_text().splitlines())


def _wait_for(cond, what):
    for _ in range(600):
        if cond(): return
        time.sleep(0.05)
    raise AssertionError(f'gave up waiting for {what}')


@pytest.mark.skipif(not Path('/proc/locks').exists(), reason='needs /proc/locks to see a waiting thread')
def test_lock_holds_when_the_holder_deletes_the_file(tmp_path):
    "A waiter that gets the lock on a file its holder deleted must start again, or a newcomer would get in beside it."
    from lesson9.data import _locked
    target, lock = tmp_path/'f', tmp_path/'.f.lock'
    b_in, c_in, b_go = threading.Event(), threading.Event(), threading.Event()
    def b():
        with _locked(target): b_in.set(); b_go.wait(60)
    def c():
        with _locked(target): c_in.set()
    tb, tc = threading.Thread(target=b), threading.Thread(target=c)
    with _locked(target):  # A holds the lock; B opens the same file and waits on it
        tb.start(); _wait_for(lambda: _flock_waiters(lock) == 1, 'B to wait')
    _wait_for(b_in.is_set, 'B to get the lock')  # A deleted the file as it let go
    tc.start()  # C opens whatever file is at the lock's name now: it must wait for B
    _wait_for(lambda: c_in.is_set() or (lock.exists() and _flock_waiters(lock) == 1), 'C to wait or get in')
    assert not c_in.is_set(), 'C got the lock while B held it'
    b_go.set(); tb.join(60); tc.join(60)
    assert c_in.is_set() and list(tmp_path.iterdir()) == []


def test_stale_lock_file_does_not_block(mirror, tmp_path):
    url, md5s, srv = mirror
    cache = tmp_path/'cache'; cache.mkdir()
    (cache/f'.{NAME}.lock').write_bytes(b'')  # left by a process killed while holding the lock
    assert md5sum(download(NAME, md5s[NAME], cache, [url], timeout=5)) == md5s[NAME]
    assert [p.name for p in cache.iterdir()] == [NAME]


@pytest.mark.parametrize('kw, bad', [(dict(deadline=0), '0'), (dict(deadline=-1), '-1'), (dict(deadline=float('nan')), 'nan'),
                                     (dict(timeout=float('inf')), 'inf'), (dict(timeout='30'), "'30'"), (dict(deadline=True), 'True'),
                                     (dict(timeout=None), 'None')])
def test_download_checks_its_seconds(tmp_path, kw, bad):
    name = next(iter(kw))
    with pytest.raises(DataError, match=rf'^{name} must be a positive finite number of seconds, got {re.escape(bad)}$'):
        download(NAME, '0'*32, tmp_path, [_dead_url()], **kw)
    assert list(tmp_path.iterdir()) == []


def test_download_checks_names_md5_and_mirrors(tmp_path):
    with pytest.raises(DataError, match=r"mirrors must be a list of base URLs, got the string 'http://x/'"):
        download(NAME, '0'*32, tmp_path, 'http://x/')
    with pytest.raises(DataError, match=r"mirror 'x' is not a URL"): download(NAME, '0'*32, tmp_path, ['x'])
    with pytest.raises(DataError, match=r"md5 must be 32 hex digits, got 'abc'"): download(NAME, 'abc', tmp_path, [])
    with pytest.raises(DataError, match=r"fname must be a plain file name, got '../x'"): download('../x', '0'*32, tmp_path, [])


@pytest.fixture
def umask():
    "Set the process umask for one test, then restore it."
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_keeps_the_umask(umask, tmp_path, mask, mode):
    umask(mask)
    p = atomic_write(tmp_path/'f', lambda f: f.write(b'x'))
    assert p.stat().st_mode & 0o777 == mode and p.read_bytes() == b'x'


def test_download_keeps_the_umask(umask, mirror, tmp_path):
    url, md5s, srv = mirror
    umask(0o022)
    assert download(NAME, md5s[NAME], tmp_path, [url]).stat().st_mode & 0o777 == 0o644


def test_atomic_write_ctrl_c_leaves_no_trace(tmp_path):
    def ctrl_c(f): f.write(b'half'); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): atomic_write(tmp_path/'new', ctrl_c)
    assert list(tmp_path.iterdir()) == []  # no .part, no final file
    old = atomic_write(tmp_path/'old', lambda f: f.write(b'kept'))
    for stop in (KeyboardInterrupt, SystemExit):
        def write(f, stop=stop): f.write(b'half'); raise stop
        with pytest.raises(stop): atomic_write(old, write)
    assert old.read_bytes() == b'kept' and [p.name for p in tmp_path.iterdir()] == ['old']


def test_atomic_write_syncs_before_the_rename(monkeypatch, tmp_path):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: (events.append(('fsync', os.fstat(fd).st_size)), fsync(fd))[1])
    monkeypatch.setattr(os, 'replace', lambda a, b: (events.append(('replace', Path(b).name)), replace(a, b))[1])
    atomic_write(tmp_path/'f', lambda f: f.write(b'12345'))
    assert events == [('fsync', 5), ('replace', 'f')]  # all five bytes reached the disk before the name moved
