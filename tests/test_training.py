"""lesson9.training against PyTorch: losses, modules, optimizers (every SGD option), data loading and fit."""
import copy, gc, itertools, math, re, threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from lesson9.training import (DataLoader, Dataset, DummyModule, Optimizer, SGD, Sampler, accuracy, collate,
                              cross_entropy, fit, get_dls, get_mlp, log_softmax, log_softmax_naive, logsumexp, nll)


# ---------------------------------------------------------------- losses

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 12), scale=st.sampled_from([1e-3, 1., 30., 1e4, 1e30]),
       seed=st.integers(0, 2**16))
def test_logsumexp_and_log_softmax_match_torch(rows, cols, scale, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    torch.testing.assert_close(logsumexp(x), x.logsumexp(-1))
    torch.testing.assert_close(log_softmax(x), F.log_softmax(x, -1))


def test_logsumexp_infinities_like_torch():
    inf = float('inf')
    x = torch.tensor([[-inf, -inf], [inf, 0.], [-inf, 3.], [inf, inf]])
    torch.testing.assert_close(logsumexp(x), x.logsumexp(-1))


def test_naive_overflows_ours_does_not():
    x = torch.tensor([[1e4, -1e4, 0.], [-1e4, -1e4, -1e4]])
    y = torch.tensor([1, 2])
    assert not log_softmax_naive(x).isfinite().all()
    assert torch.isfinite(cross_entropy(x, y))
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y))


@pytest.mark.parametrize('dtype', [torch.int64, torch.int32])
def test_nll_and_cross_entropy_match_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 7, generator=g) * 5, torch.randint(0, 7, (50,), generator=g).to(dtype)
    torch.testing.assert_close(nll(F.log_softmax(x, -1), y), F.nll_loss(F.log_softmax(x, -1), y.long()))
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y.long()))


INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize('dtype', INT_DTYPES, ids=str)
@pytest.mark.parametrize('labels', [[1, 4, 2, 1, 3], [0, 4, 1, 1, 3], [2, 0, 0, 0, 0]])
def test_every_integer_label_dtype_gives_torchs_answer(dtype, labels):
    "uint8 labels once indexed as a boolean mask: with no zero label they picked the diagonal, silently."
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.tensor(labels)
    want = F.cross_entropy(x, y)
    torch.testing.assert_close(cross_entropy(x, y.to(dtype)), want)
    torch.testing.assert_close(nll(F.log_softmax(x, -1), y.to(dtype)), F.nll_loss(F.log_softmax(x, -1), y))
    if dtype in (torch.uint8, torch.int64): torch.testing.assert_close(F.cross_entropy(x, y.to(dtype)), want)  # torch's own
    with pytest.raises(ValueError, match='got label 7 with n_classes=5'): cross_entropy(x, torch.tensor([0, 7, 1, 1, 1], dtype=dtype))


def test_cross_entropy_gradient_matches_torch():
    x = torch.randn(8, 5, requires_grad=True); y = torch.randint(0, 5, (8,))
    x2 = x.detach().clone().requires_grad_()
    cross_entropy(x, y).backward(); F.cross_entropy(x2, y).backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize('target, match', [
    (torch.tensor([0, 3, 2]), 'got label 3 with n_classes=3'),
    (torch.tensor([0, -1, 2]), 'got label -1 with n_classes=3'),
    (torch.tensor([0, 1]), r'expected shape \(3,\), got \(2,\)'),
    (torch.tensor([[0, 1, 2]]), r'expected shape \(3,\), got \(1, 3\)'),
])
def test_bad_targets_are_named(target, match):
    with pytest.raises(ValueError, match=match): cross_entropy(torch.zeros(3, 3), target)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r'logits must be 2-D \(n, n_classes\), got shape \(10,\)'):
        cross_entropy(torch.zeros(10), torch.tensor([1]))
    with pytest.raises(ValueError, match=r'log_probs must be 2-D'): nll(torch.zeros(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match='torch.float32'): cross_entropy(torch.zeros(2, 3), torch.tensor([0., 1.]))
    with pytest.raises(TypeError, match='list'): cross_entropy(torch.zeros(2, 3), [0, 1])
    with pytest.raises(TypeError, match='torch.bool'): cross_entropy(torch.zeros(2, 2), torch.tensor([True, False]))  # not labels 1, 0
    with pytest.raises(ValueError, match=r'out must be 2-D'): accuracy(torch.zeros(3), torch.tensor([0, 1, 2]))


def test_accuracy():
    out = torch.tensor([[1., 0.], [0., 1.], [2., 3.]])
    assert accuracy(out, torch.tensor([0, 1, 0])).item() == pytest.approx(2/3)
    assert accuracy(out, torch.tensor([0, 1, 0])).dtype == torch.float32


def test_untrained_loss_is_about_ln10():
    torch.manual_seed(0)
    x = torch.rand(500, 784)
    assert cross_entropy(get_mlp()(x), torch.randint(0, 10, (500,))).item() == pytest.approx(math.log(10), abs=0.1)


# ---------------------------------------------------------------- modules

def test_dummy_module_registers_modules_and_parameters():
    class M(DummyModule):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)
            self.p = nn.Parameter(torch.zeros(4))
            self.inner = DummyModule(); self.inner.b = nn.Linear(3, 1)
            self._hidden = nn.Linear(5, 5)
            self.t = torch.ones(2)
        def forward(self, x): return self.inner.b(self.a(x))
    mod = M()
    expected = [mod.p, mod.a.weight, mod.a.bias, mod.inner.b.weight, mod.inner.b.bias]
    got = list(mod.parameters())
    assert len(got) == len(expected) and all(g is e for g, e in zip(got, expected))
    assert mod(torch.zeros(1, 2)).shape == (1, 1)
    mod.a = 'not a module any more'
    assert len(list(mod.parameters())) == 3


def test_dummy_module_needs_init():
    class Bad(DummyModule):
        def __init__(self): self.a = nn.Linear(1, 1)
    with pytest.raises(AttributeError, match='super'): Bad()


def test_get_mlp():
    mod = get_mlp(5, 4, 3)
    assert isinstance(mod, nn.Sequential)
    assert [type(l) for l in mod] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [tuple(p.shape) for p in mod.parameters()] == [(4, 5), (4,), (3, 4), (3,)]
    with pytest.raises(ValueError, match='n_out=0'): get_mlp(n_out=0)


# ---------------------------------------------------------------- optimizers

def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def _batches(k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(k)]


def _train(model, opt, batches, before_step=None):
    for i, (xb, yb) in enumerate(batches):
        F.cross_entropy(model(xb), yb).backward()
        if before_step: before_step(i, opt)
        opt.step(); opt.zero_grad()


def _groups(model, g0, g1):
    "Three groups: first layer with `g0`, second with `g1`, third with the defaults."
    return [{'params': model[0].parameters(), **g0}, {'params': model[2].parameters(), **g1},
            {'params': model[4].parameters()}]


def _assert_same(m1, m2):
    for p, q in zip(m1.parameters(), m2.parameters()): assert torch.equal(p, q)


OPTIONS = [dict(momentum=mo, dampening=d, weight_decay=wd, nesterov=n)
           for mo, d, wd, n in itertools.product([0., 0.9], [0., 0.3], [0., 1e-2], [False, True])]


def _valid(o): return not o['nesterov'] or (o['momentum'] > 0 and o['dampening'] == 0)


@pytest.mark.parametrize('opts', OPTIONS, ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()))
def test_sgd_matches_torch_step_for_step(opts):
    if not _valid(opts):
        with pytest.raises(ValueError, match='nesterov'): SGD(_model().parameters(), lr=0.1, **opts)
        with pytest.raises(ValueError): torch.optim.SGD(_model().parameters(), lr=0.1, **opts)
        return
    ours, theirs = _model(), _model()
    o, t = SGD(ours.parameters(), lr=0.1, **opts), torch.optim.SGD(theirs.parameters(), lr=0.1, **opts)
    for xb, yb in _batches():
        for mod, opt in (ours, o), (theirs, t):
            F.cross_entropy(mod(xb), yb).backward(); opt.step(); opt.zero_grad()
        _assert_same(ours, theirs)


@pytest.mark.parametrize('g0, g1', [
    (dict(momentum=0.9, nesterov=True), dict(weight_decay=0.1)),
    (dict(lr=0.3, momentum=0.5, dampening=0.5), dict(lr=0.01, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (dict(weight_decay=1e-2), dict(momentum=0.8, dampening=0.1, weight_decay=1e-2)),
])
@pytest.mark.parametrize('defaults', [dict(), dict(momentum=0.7, weight_decay=1e-3)])
def test_sgd_param_groups_match_torch(g0, g1, defaults):
    ours, theirs = _model(), _model()
    o = SGD(_groups(ours, g0, g1), lr=0.05, **defaults)
    t = torch.optim.SGD(_groups(theirs, g0, g1), lr=0.05, **defaults)
    for xb, yb in _batches():
        for mod, opt in (ours, o), (theirs, t):
            F.cross_entropy(mod(xb), yb).backward(); opt.step(); opt.zero_grad()
    _assert_same(ours, theirs)
    keys = ['lr', 'momentum', 'dampening', 'weight_decay', 'nesterov']
    assert [{k: g[k] for k in keys} for g in o.param_groups] == [{k: g[k] for k in keys} for g in t.param_groups]
    tstate = t.state_dict()['state']
    ostate = o.state_dict()['state']
    assert sorted(ostate) == sorted(tstate)
    for i in tstate: assert torch.equal(ostate[i]['momentum_buffer'], tstate[i]['momentum_buffer'])


def test_lr_changed_through_param_groups_like_a_scheduler():
    ours, theirs = _model(), _model()
    o = SGD(_groups(ours, {}, dict(lr=0.2)), lr=0.1, momentum=0.9)
    t = torch.optim.SGD(_groups(theirs, {}, dict(lr=0.2)), lr=0.1, momentum=0.9)
    def sched(i, opt):
        for j, g in enumerate(opt.param_groups): g['lr'] = 0.1 * (j + 1) / (i + 1)
    _train(ours, o, _batches(), sched); _train(theirs, t, _batches(), sched)
    _assert_same(ours, theirs)


def test_plain_optimizer_matches_torch_sgd():
    ours, theirs = _model(), _model()
    _train(ours, Optimizer(_groups(ours, dict(lr=0.3), {}), lr=0.1), _batches())
    _train(theirs, torch.optim.SGD(_groups(theirs, dict(lr=0.3), {}), lr=0.1), _batches())
    _assert_same(ours, theirs)


def test_parameters_without_gradient_are_left_alone():
    w, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = SGD([w, unused], lr=0.1, momentum=0.9)
    for _ in range(2): (w * 2).sum().backward(); opt.step(); opt.zero_grad()
    assert torch.equal(unused, torch.ones(2)) and unused not in opt.state
    assert torch.equal(w, torch.ones(3) - 0.1 * 2 - 0.1 * (0.9 * 2 + 2))


@pytest.mark.parametrize('make', [lambda ps: ps, lambda ps: iter(ps), lambda ps: [{'params': iter(ps)}]])
def test_params_as_iterable_or_groups(make):
    ps = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = SGD(make(ps), lr=0.5, momentum=0.1)
    assert len(opt.param_groups) == 1 and all(p is q for p, q in zip(opt.param_groups[0]['params'], ps))
    assert opt.param_groups[0] == {'params': opt.param_groups[0]['params'], 'lr': 0.5, 'momentum': 0.1,
                                   'dampening': 0., 'weight_decay': 0., 'nesterov': False}
    single = Optimizer(ps[0], lr=1.)
    assert single.param_groups[0]['params'][0] is ps[0]


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(lr=-0.1), ValueError, 'lr=-0.1'),
    (dict(lr=0.1, momentum=-0.9), ValueError, 'momentum=-0.9'),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, 'weight_decay=-1.0'),
    (dict(lr=0.1, nesterov=True), ValueError, 'momentum=0.0'),
    (dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True), ValueError, 'dampening=0.5'),
])
def test_sgd_rejects_bad_hyper_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match): SGD([torch.zeros(1, requires_grad=True)], **kwargs)


def test_bad_group_hyper_parameters_are_rejected_too():
    p = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match='lr=-1'): SGD([{'params': [p], 'lr': -1}], lr=0.1)
    with pytest.raises(ValueError, match='nesterov'): SGD([{'params': [p], 'nesterov': True}], lr=0.1)


def test_bad_params_are_rejected():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match='empty'): SGD([], lr=0.1)
    with pytest.raises(TypeError, match='int'): SGD([p, 3], lr=0.1)
    with pytest.raises(ValueError, match='non-leaf'): SGD([p * 2], lr=0.1)
    with pytest.raises(ValueError, match='more than once'): SGD([{'params': [p]}, {'params': [p]}], lr=0.1)
    with pytest.raises(TypeError, match="'params'"): SGD([{'params': [p]}, {'lr': 1}], lr=0.1)


@pytest.mark.parametrize('cls', [Optimizer, SGD])
def test_zero_grad_to_none_or_zero(cls):
    p = torch.ones(2, requires_grad=True)
    opt = cls([p], lr=0.1)
    (p * 3).sum().backward(); opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(2))
    opt.zero_grad()
    assert p.grad is None


def _nested_equal(a, b):
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) == type(b) and len(a) == len(b) and all(map(_nested_equal, a, b))
    return type(a) == type(b) and a == b


def test_state_dict_round_trips_exactly():
    model = _model()
    opt = SGD(_groups(model, dict(momentum=0.9, nesterov=True), dict(lr=0.01)), lr=0.1, momentum=0.5, weight_decay=1e-3)
    _train(model, opt, _batches(3))
    sd = opt.state_dict()
    copy_model = copy.deepcopy(model)
    other = SGD(_groups(copy_model, {}, {}), lr=9.)
    other.load_state_dict(sd)
    assert _nested_equal(other.state_dict(), sd)
    assert [g['lr'] for g in other.param_groups] == [0.1, 0.01, 0.1]
    # resuming continues exactly as the original run does
    _train(model, opt, _batches(3, seed=5)); _train(copy_model, other, _batches(3, seed=5))
    _assert_same(model, copy_model)


def test_state_dict_is_a_deep_copy_both_ways():
    model = _model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    saved = copy.deepcopy(sd)
    _train(model, opt, _batches(2, seed=3))   # training on must not change the saved dict
    assert _nested_equal(sd, saved)
    fresh = SGD(copy.deepcopy(model).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(sd)
    sd['state'][0]['momentum_buffer'].add_(1.); sd['param_groups'][0]['lr'] = 5.
    assert fresh.param_groups[0]['lr'] == 0.1
    assert _nested_equal(fresh.state_dict()['state'], saved['state'])


def test_state_dict_format_is_torchs():
    ours, theirs = _model(), _model()
    o, t = SGD(_groups(ours, {}, {}), lr=0.1, momentum=0.9), torch.optim.SGD(_groups(theirs, {}, {}), lr=0.1, momentum=0.9)
    _train(ours, o, _batches(2)); _train(theirs, t, _batches(2))
    osd, tsd = o.state_dict(), t.state_dict()
    assert [g['params'] for g in osd['param_groups']] == [g['params'] for g in tsd['param_groups']]
    assert osd['state'].keys() == tsd['state'].keys()
    for i in tsd['state']: assert torch.equal(osd['state'][i]['momentum_buffer'], tsd['state'][i]['momentum_buffer'])


def test_load_state_dict_checks_shape_and_leaves_optimizer_alone_on_error():
    model = _model()
    opt = SGD(_groups(model, {}, {}), lr=0.1, momentum=0.9)
    _train(model, opt, _batches(1))
    sd = opt.state_dict()
    before = opt.state_dict()
    two = SGD([{'params': model[0].parameters()}, {'params': model[2].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match='state_dict has 3 param groups but this optimizer has 2'): two.load_state_dict(sd)
    bad = copy.deepcopy(sd); bad['param_groups'][1]['params'] = bad['param_groups'][1]['params'][:1]
    with pytest.raises(ValueError, match='param group 1 has 1 params in the state_dict but 2 here'): opt.load_state_dict(bad)
    bad = copy.deepcopy(sd); bad['param_groups'][0]['lr'] = -1.
    with pytest.raises(ValueError, match='lr=-1.0'): opt.load_state_dict(bad)
    assert _nested_equal(opt.state_dict(), before)


@pytest.mark.parametrize('cls, torch_cls', [(SGD, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1e-2)),
                                             (Optimizer, torch.optim.SGD)])
def test_step_with_a_closure_like_torch(cls, torch_cls):
    ours, theirs = _model(), _model()
    o = cls(ours.parameters(), lr=0.1) if cls is Optimizer else SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    t = torch_cls(theirs.parameters(), lr=0.1)
    for xb, yb in _batches(3):
        losses, modes = [], []
        for mod, opt in (ours, o), (theirs, t):
            def closure():
                modes.append(torch.is_grad_enabled())
                opt.zero_grad(); loss = F.cross_entropy(mod(xb), yb); loss.backward(); return loss
            with torch.no_grad(): losses.append(opt.step(closure))  # the closure still gets gradients
        assert modes == [True, True] and torch.equal(losses[0], losses[1]) and losses[0].requires_grad
        _assert_same(ours, theirs)
    assert o.step() is None


def test_unsupported_switches_are_refused_not_ignored():
    p = torch.zeros(2, requires_grad=True)
    for k, v in (('maximize', True), ('differentiable', True), ('betas', (0.9, 0.99)), ('momentum', 0.9)):
        cls = Optimizer if k == 'momentum' else SGD  # the plain optimizer has no momentum
        with pytest.raises(ValueError, match=re.escape(f"param group sets {k}={v!r}, which {cls.__name__} does not support")):
            cls([{'params': [p], k: v}], lr=0.1)
    # torch's switches at values that change nothing are accepted, and dropped
    opt = SGD([{'params': [p], 'maximize': False, 'foreach': None, 'differentiable': False, 'fused': None}], lr=0.1)
    assert set(opt.param_groups[0]) == {'params', 'lr', 'momentum', 'dampening', 'weight_decay', 'nesterov'}


def test_torch_state_dict_loads_and_continues_like_torch():
    ours, theirs = _model(), _model()
    t = torch.optim.SGD(_groups(theirs, dict(momentum=0.9, nesterov=True), dict(lr=0.01)), lr=0.1, momentum=0.5)
    _train(theirs, t, _batches(3))
    ours.load_state_dict(theirs.state_dict())
    o = SGD(_groups(ours, {}, {}), lr=9.)
    o.load_state_dict(t.state_dict())
    assert [g['lr'] for g in o.param_groups] == [0.1, 0.01, 0.1] and 'maximize' not in o.param_groups[0]
    _train(ours, o, _batches(3, seed=5)); _train(theirs, t, _batches(3, seed=5))
    _assert_same(ours, theirs)
    # and ours loads into torch's
    t2 = torch.optim.SGD(_groups(theirs, {}, {}), lr=9.); t2.load_state_dict(o.state_dict())
    _train(ours, o, _batches(2, seed=6)); _train(theirs, t2, _batches(2, seed=6))
    _assert_same(ours, theirs)


@pytest.mark.parametrize('key, value, match', [
    ('maximize', True, 'param group 0 of the state_dict sets maximize=True, which SGD does not support'),
    ('differentiable', True, 'sets differentiable=True'),
    ('betas', (0.9, 0.999), 'sets betas='),
    ('momentum', None, 'param group 0 of the state_dict lacks momentum'),
])
def test_load_state_dict_refuses_what_it_would_ignore(key, value, match):
    model = _model()
    t = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=key == 'maximize')
    _train(model, t, _batches(1))
    sd = t.state_dict()
    if value is None: del sd['param_groups'][0][key]
    else: sd['param_groups'][0][key] = value
    o = SGD(model.parameters(), lr=0.5)
    before = o.state_dict()
    with pytest.raises(ValueError, match=re.escape(match)): o.load_state_dict(sd)
    assert _nested_equal(o.state_dict(), before)


# ---------------------------------------------------------------- data

def test_dataset():
    x, y = torch.arange(20.).view(10, 2), torch.arange(10)
    ds = Dataset(x, y)
    assert len(ds) == 10 and torch.equal(ds[3][0], x[3]) and ds[3][1] == 3
    xb, yb = ds[torch.tensor([4, 1])]
    assert torch.equal(xb, x[[4, 1]]) and torch.equal(yb, y[[4, 1]])
    xb, yb = ds[torch.tensor([True] * 3 + [False] * 7)]   # a mask still indexes like a tensor
    assert len(xb) == 3
    assert Dataset([1, 2], [3, 4])[1] == (2, 4) and not Dataset([1, 2], [3, 4]).batch_indexable
    with pytest.raises(ValueError, match=r'len\(x\)=10 and len\(y\)=9'): Dataset(x, y[:9])
    with pytest.raises(ValueError, match='at least one'): Dataset(x[:0], y[:0])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 50), bs=st.integers(1, 20), shuffle=st.booleans(), drop_last=st.booleans(), seed=st.integers(0, 99))
def test_sampler_covers_every_index_once(n, bs, shuffle, drop_last, seed):
    s = Sampler(n, bs, shuffle, drop_last, seed=seed)
    batches = [b.tolist() for b in s]
    assert len(batches) == len(s)
    assert all(len(b) == bs for b in batches[:-1]) and all(0 < len(b) <= bs for b in batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last: assert len(flat) == n // bs * bs and all(len(b) == bs for b in batches)
    else: assert sorted(flat) == list(range(n))
    if not shuffle: assert flat == list(range(len(flat)))


def test_sampler_examples_and_errors():
    assert [b.tolist() for b in Sampler(10, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [b.tolist() for b in Sampler(list(range(10)), 5)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert next(iter(Sampler(10, 3))).dtype == torch.int64
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f'bs={bad!r}'): Sampler(10, bad)
    with pytest.raises(ValueError, match='seed'): Sampler(10, 3, shuffle=True, seed=-1)


def test_sampler_randomness():
    epochs = lambda s, k=3: [torch.cat(list(s)).tolist() for _ in range(k)]
    a = epochs(Sampler(30, 4, shuffle=True, seed=7))
    assert a == epochs(Sampler(30, 4, shuffle=True, seed=7))           # reproducible
    assert len({tuple(e) for e in a}) == 3                              # each epoch differs
    assert a != epochs(Sampler(30, 4, shuffle=True, seed=8))
    assert a == epochs(Sampler(30, 4, shuffle=True, seed=torch.Generator().manual_seed(7)))
    torch.manual_seed(3); g1 = epochs(Sampler(30, 4, shuffle=True))      # None: the global generator
    torch.manual_seed(3); g2 = epochs(Sampler(30, 4, shuffle=True))
    assert g1 == g2


def test_collate():
    xb, yb = collate([(torch.ones(2), torch.tensor(1)), (torch.zeros(2), torch.tensor(0))])
    assert torch.equal(xb, torch.tensor([[1., 1.], [0., 0.]])) and torch.equal(yb, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match='empty'): collate([])


def _data(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randint(0, 10, (n,), generator=g)


class PerSample:
    "A dataset that only knows single samples (no batch indexing)."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


def _same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert len(ba) == len(bb) and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(ba, bb))


@pytest.mark.parametrize('bs, shuffle, drop_last', [(1, False, False), (16, True, False), (16, True, True),
                                                     (64, False, True), (500, True, False)])
@pytest.mark.parametrize('make_ds', [Dataset, torch.utils.data.TensorDataset, PerSample], ids=['ours', 'tensords', 'persample'])
def test_dataloader_matches_torch_for_the_same_order(bs, shuffle, drop_last, make_ds):
    x, y = _data()
    ours = DataLoader(make_ds(x, y), bs, shuffle, drop_last, seed=11)
    order = list(Sampler(len(x), bs, shuffle, drop_last, seed=11))
    theirs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=order)
    assert len(ours) == len(order)
    _same_batches(ours, theirs)


def test_dataloader_paths():
    x, y = _data()
    assert DataLoader(Dataset(x, y), 8).fast and DataLoader(torch.utils.data.TensorDataset(x, y), 8).fast
    assert not DataLoader(PerSample(x, y), 8).fast
    assert not DataLoader(Dataset(x, y), 8, collate_fn=lambda b: collate(b)).fast
    assert not DataLoader(Dataset(list(x), list(y)), 8).fast
    _same_batches(DataLoader(Dataset(list(x), list(y)), 8), DataLoader(Dataset(x, y), 8))


class Centred(Dataset):
    "A per-sample transform: each input minus its own mean (on a whole batch, `x[i].mean()` would be the batch's mean)."
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x - x.mean(), y


class CentredTensors(torch.utils.data.TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x - x.mean(), y


class CentredDeclared(Centred):
    "Declares that indexing with a batch equals stacking the samples: true here, as the mean is over the last dim."
    batch_indexable = True
    def __getitem__(self, i):
        x, y = Dataset.__getitem__(self, i)
        return x - x.mean(-1, keepdim=True), y


@pytest.mark.parametrize('cls', [Centred, CentredTensors])
def test_an_overridden_getitem_goes_sample_by_sample(cls):
    x, y = _data()
    dl = DataLoader(cls(x, y), 16, shuffle=True, seed=3)
    order = list(Sampler(len(x), 16, True, seed=3))
    want = [collate([cls(x, y)[i] for i in idxs.tolist()]) for idxs in order]
    _same_batches(dl, want)
    assert not dl.fast
    assert not torch.equal(next(iter(dl))[0], cls(x, y)[order[0]][0])  # one call on the batch would differ


def test_a_dataset_can_declare_batch_indexing():
    x, y = _data()
    dl = DataLoader(CentredDeclared(x, y), 16)
    assert dl.fast
    _same_batches(dl, DataLoader(CentredDeclared(x, y), 16, collate_fn=lambda b: collate(b)))
    class Says(PerSample): batch_indexable = True
    class SaysNo(Dataset): batch_indexable = False
    assert DataLoader(Says(x, y), 4).fast and not DataLoader(SaysNo(x, y), 4).fast
    ds = PerSample(x, y); ds.batch_indexable = True
    assert DataLoader(ds, 4).fast


def test_dataloader_epochs_are_reproducible_and_differ():
    x, y = _data()
    run = lambda: [[yb.tolist() for _, yb in dl] for dl in [DataLoader(Dataset(x, y), 32, shuffle=True, seed=4)] for _ in range(3)]
    a = run()
    assert a == run() and len({str(e) for e in a}) == 3


@pytest.mark.parametrize('num_workers', [1, 2, 4])
@pytest.mark.parametrize('make_ds', [Dataset, PerSample])
def test_workers_keep_the_order(num_workers, make_ds):
    x, y = _data()
    _same_batches(DataLoader(make_ds(x, y), 10, True, seed=2, num_workers=num_workers),
                  DataLoader(make_ds(x, y), 10, True, seed=2))


def _loader_threads(): return [t for t in threading.enumerate() if t.name.startswith('lesson9-loader')]


def test_abandoned_loops_leave_no_threads():
    x, y = _data()
    for i, _ in enumerate(DataLoader(Dataset(x, y), 4, num_workers=3)):
        if i == 1: break
    assert _loader_threads() == []
    it = iter(DataLoader(PerSample(x, y), 4, num_workers=2)); next(it)
    assert _loader_threads()
    it.close()
    assert _loader_threads() == []
    it = iter(DataLoader(PerSample(x, y), 4, num_workers=2)); next(it)
    del it; gc.collect()
    assert _loader_threads() == []


def test_worker_errors_reach_the_loop_and_threads_stop():
    class Broken(PerSample):
        def __getitem__(self, i):
            if i == 50: raise KeyError('sample 50 is broken')
            return super().__getitem__(i)
    with pytest.raises(KeyError, match='sample 50'):
        for _ in DataLoader(Broken(*_data()), 8, num_workers=2): pass
    assert _loader_threads() == []


def test_dataloader_bad_arguments():
    x, y = _data()
    with pytest.raises(ValueError, match='num_workers=-1'): DataLoader(Dataset(x, y), 4, num_workers=-1)
    with pytest.raises(ValueError, match='bs=0'): DataLoader(Dataset(x, y), 0)


def test_get_dls():
    x, y = _data()
    tdl, vdl = get_dls(Dataset(x, y), Dataset(x[:50], y[:50]), 16, drop_last=True, seed=0, num_workers=1)
    assert (tdl.sampler.bs, tdl.sampler.shuffle, tdl.sampler.drop_last, tdl.num_workers) == (16, True, True, 1)
    assert (vdl.sampler.bs, vdl.sampler.shuffle, vdl.sampler.drop_last, vdl.num_workers) == (32, False, False, 1)
    assert [len(yb) for _, yb in vdl] == [32, 18]


# ---------------------------------------------------------------- fit

def _tiny(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_fit_averages_weighted_by_batch_size():
    x, y = _tiny()
    torch.manual_seed(0); model = nn.Linear(4, 3)
    dl = DataLoader(Dataset(x, y), 10)                  # batches of 10, 10, 10, 7
    h = fit(2, model, cross_entropy, SGD(model.parameters(), lr=0.), dl, dl)
    with torch.no_grad(): out = model(x)
    for s in h:
        for split in 'train', 'valid':
            assert s[f'{split}_loss'] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-6)
            assert s[f'{split}_acc'] == pytest.approx(accuracy(out, y).item(), abs=1e-6)


def test_fit_history_and_callbacks():
    x, y = _tiny()
    torch.manual_seed(0); model = get_mlp(4, 8, 3)
    tdl, vdl = get_dls(Dataset(x, y), Dataset(x, y), 8, seed=0)
    ticks, seen = [], []
    h = fit(3, model, cross_entropy, SGD(model.parameters(), lr=0.1), tdl, vdl,
            on_batch=lambda *a: ticks.append(a), on_epoch=seen.append)
    assert ticks == [()] * (3 * len(tdl))
    assert seen == h and [s['epoch'] for s in h] == [1, 2, 3]
    assert all(list(s) == ['epoch', 'train_loss', 'train_acc', 'valid_loss', 'valid_acc'] for s in h)
    assert all(type(v) is float for s in h for k, v in s.items() if k != 'epoch')


def test_fit_switches_modes_and_validates_without_grad():
    class Spy(nn.Linear):
        log = []
        def forward(self, x):
            self.log.append((self.training, torch.is_grad_enabled())); return super().forward(x)
    x, y = _tiny(12)
    model = Spy(4, 3)
    fit(1, model, cross_entropy, Optimizer(model.parameters(), lr=0.1), DataLoader(Dataset(x, y), 6), DataLoader(Dataset(x, y), 12))
    assert Spy.log == [(True, True), (True, True), (False, False)]


def test_fit_reads_the_device_once_per_epoch(monkeypatch):
    "No .item() or float() per batch: the number of reads does not grow with the number of batches."
    reads = []
    for name in ('item', '__float__', '__bool__'):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: (reads.append(_n), _o(self, *a))[1])
    x, y = _tiny(64)
    counts = []
    for bs in (4, 16):
        reads.clear()
        model = nn.Linear(4, 3)
        fit(2, model, F.cross_entropy, SGD(model.parameters(), lr=0.1), DataLoader(Dataset(x, y), bs), DataLoader(Dataset(x, y), bs))
        counts.append(len(reads))
    assert counts[0] == counts[1] == 2 * 4


@pytest.mark.parametrize('epochs', [0, -1, 1.5, True, '2'])
def test_fit_rejects_bad_epochs(epochs):
    model = nn.Linear(4, 3)
    dl = DataLoader(Dataset(*_tiny()), 8)
    with pytest.raises(ValueError, match=f'epochs={epochs!r}'):
        fit(epochs, model, cross_entropy, SGD(model.parameters(), lr=0.1), dl, dl)


def test_fit_rejects_an_empty_loader():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match='no batches'):
        fit(1, model, cross_entropy, SGD(model.parameters(), lr=0.1), DataLoader(Dataset(*_tiny(5)), 8, drop_last=True),
            DataLoader(Dataset(*_tiny(5)), 8))


def test_seeded_fit_is_deterministic():
    x, y = _tiny(100)
    def run():
        torch.manual_seed(1)
        model = get_mlp(4, 16, 3)
        tdl, vdl = get_dls(Dataset(x, y), Dataset(x, y), 8)   # seed=None: the global generator, seeded above
        return fit(3, model, cross_entropy, SGD(model.parameters(), lr=0.2, momentum=0.9), tdl, vdl)
    assert run() == run()


def test_fit_lowers_the_loss():
    "Training moves the model: each epoch's training loss is below the last, and validation improves on the start."
    x, y = _tiny(200, seed=2)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()          # a learnable rule, three classes
    torch.manual_seed(0); model = get_mlp(4, 16, 3)
    tdl, vdl = get_dls(Dataset(x[:150], y[:150]), Dataset(x[150:], y[150:]), 16, seed=0)
    with torch.no_grad(): start = cross_entropy(model(x[150:]), y[150:]).item()
    h = fit(4, model, cross_entropy, SGD(model.parameters(), lr=0.1), tdl, vdl)
    train = [s['train_loss'] for s in h]
    assert all(b < a for a, b in zip(train, train[1:])), train
    assert h[-1]['valid_loss'] < 0.75 * start and h[-1]['valid_acc'] > h[0]['train_acc']
    with torch.no_grad(): assert cross_entropy(model(x[150:]), y[150:]).item() == pytest.approx(h[-1]['valid_loss'], abs=1e-6)
