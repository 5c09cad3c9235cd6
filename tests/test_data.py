"""Download and caching of full MNIST, against an HTTP server on 127.0.0.1 that this test starts."""
import functools, gzip, http.server, threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lesson9.data import (DataError, download, get_data, load_embedded, load_mnist, md5sum, read_idx,
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


def test_embedded_split_is_deterministic():
    a, b = load_embedded(), get_data('embedded')
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert [t.shape[0] for t in a] == [8000, 8000, 2000, 2000]
    with pytest.raises(DataError, match='n_valid .* got 0'): load_embedded(0)
