"""lesson9.initialization and lesson9.depth: fans, gain and kaiming against torch.nn.init, the layer-statistics
hooks on models the notebooks never use (and their removal on error), LSUV, and the depth experiments."""
import math, warnings

import matplotlib
matplotlib.use('Agg')
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from lesson9.depth import first_nonfinite, matmul_chain, plot_std_by_depth, product_stats
from lesson9.initialization import (InitCall, LayerStatsTable, fans, gain, init_layers, kaiming_, kaiming_std,
                                    layer_stats, lsuv_, plot_layer_stats, receptive_field, record_init_calls, stats)


def hooks_left(model):
    "Every module-level hook still registered on `model` or globally."
    from torch.nn.modules import module as M
    left = [h for m in model.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks) for h in d]
    return left + [h for d in (M._global_forward_hooks, M._global_forward_pre_hooks, M._global_backward_hooks,
                               M._global_backward_pre_hooks) for h in d]


# ---------------------------------------------------------------- fans, gain, kaiming

@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=2, max_size=5))
def test_fans_match_torch(shape):
    w = torch.empty(shape)
    assert fans(w) == nn.init._calculate_fan_in_and_fan_out(w)
    assert fans(tuple(shape)) == fans(w) == fans(torch.Size(shape))
    assert receptive_field(w) == w[0, 0].numel()


@pytest.mark.parametrize('w', [torch.ones(10), torch.tensor(3.), (5,), ()])
def test_fans_refuse_fewer_than_two_dims(w):
    with pytest.raises(ValueError, match=r'at least 2 dimensions.*got shape'):
        fans(w)


@settings(max_examples=50, deadline=None)
@given(a=st.floats(-100, 100, allow_nan=False))
def test_gain_matches_torch(a):
    assert math.isclose(gain(a), nn.init.calculate_gain('leaky_relu', a), rel_tol=1e-12)


@pytest.mark.parametrize('a', ['relu', None, math.nan, math.inf, True])
def test_gain_refuses_non_numbers(a):
    with pytest.raises(TypeError, match='slope a'):
        gain(a)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4), a=st.sampled_from([0., 0.01, 0.2, 1., math.sqrt(5)]),
       mode=st.sampled_from(['fan_in', 'fan_out']), uniform=st.booleans(), seed=st.integers(0, 2**16))
def test_kaiming_same_draw_as_torch(shape, a, mode, uniform, seed):
    ours = kaiming_(torch.empty(shape), a, mode, uniform, torch.Generator().manual_seed(seed))
    theirs = (nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_)(
        torch.empty(shape), a=a, mode=mode, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('uniform', [False, True])
@pytest.mark.parametrize('mode', ['fan_in', 'fan_out'])
def test_kaiming_statistics(uniform, mode):
    w = kaiming_(torch.empty(256, 32, 5, 5), a=0., mode=mode, uniform=uniform, generator=torch.Generator().manual_seed(0))
    std = math.sqrt(2/(32*25 if mode == 'fan_in' else 256*25))
    assert math.isclose(kaiming_std(w, 0., mode), std)
    assert math.isclose(w.std().item(), std, rel_tol=0.01)
    assert abs(w.mean().item()) < 0.01*std
    if uniform: assert w.abs().max() <= math.sqrt(3)*std


def test_kaiming_is_global_seeded_and_keeps_grad_free():
    w = nn.Parameter(torch.empty(8, 4))
    torch.manual_seed(5); a = kaiming_(w).clone()
    torch.manual_seed(5); b = kaiming_(w).clone()
    assert torch.equal(a, b) and w.grad is None and w.requires_grad


def test_kaiming_errors():
    with pytest.raises(ValueError, match="'fan_avg'"): kaiming_(torch.empty(3, 3), mode='fan_avg')
    with pytest.raises(ValueError, match=r'\(10,\)'): kaiming_(torch.empty(10))
    with pytest.raises(ValueError, match='fan_in 0'): kaiming_(torch.empty(3, 0))


def test_stats():
    assert stats(torch.tensor([1., 3.])) == pytest.approx((2., math.sqrt(2)))
    assert stats(torch.ones(3, dtype=torch.int64)) == (1., 0.)


# ---------------------------------------------------------------- record_init_calls

@pytest.mark.parametrize('make', [lambda: nn.Conv1d(3, 4, 3), lambda: nn.Conv2d(1, 32, 5), lambda: nn.Conv3d(2, 2, 2),
                                  lambda: nn.Linear(10, 5), lambda: nn.ConvTranspose2d(3, 4, 3)])
def test_default_init_is_kaiming_uniform_sqrt5(make):
    layer, calls = record_init_calls(make)
    assert [(c.param, c.fn) for c in calls] == [('weight', 'kaiming_uniform_'), ('bias', 'uniform_')]
    assert math.isclose(calls[0].args['a'], math.sqrt(5))


def test_record_init_calls_outermost_only_and_restores_torch():
    originals = dict(vars(nn.init))
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3, 4)); self.tmp = torch.empty(2, 2)
            nn.init.xavier_normal_(self.w, gain=2.)
            nn.init.zeros_(self.tmp)
    m, calls = record_init_calls(Custom)
    assert calls == [InitCall('w', 'xavier_normal_', {'gain': 2.}), InitCall('?', 'zeros_', {})]
    assert dict(vars(nn.init)) == originals
    # a module that uses no initialiser, and one whose construction raises: torch is left untouched
    assert record_init_calls(nn.ReLU)[1] == []
    def boom(): nn.init.ones_(torch.empty(2)); raise RuntimeError('no')
    with pytest.raises(RuntimeError, match='no'): record_init_calls(boom)
    assert dict(vars(nn.init)) == originals


def test_record_init_calls_keeps_only_the_outermost_of_nested_inits(monkeypatch):
    "An initialiser that calls another through `nn.init` (as some torch versions do) is one call, not two."
    def scaled_normal_(tensor, scale=2.):
        nn.init.normal_(tensor); return tensor.mul_(scale)
    monkeypatch.setattr(nn.init, 'scaled_normal_', scaled_normal_, raising=False)
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3, 4))
            with torch.no_grad(): nn.init.scaled_normal_(self.w, scale=3.)
            nn.init.normal_(self.w)
    _, calls = record_init_calls(Custom)
    assert calls == [InitCall('w', 'scaled_normal_', {'scale': 3.}), InitCall('w', 'normal_', {'mean': 0.0, 'std': 1.0})]


# ---------------------------------------------------------------- layer_stats

def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Dropout(0.),
                         nn.Linear(16, 3))


def test_layer_stats_on_unseen_model_matches_manual_hooks():
    model, x = bn_model(), torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = layer_stats(model, x)
    assert [r.kind for r in table] == ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout', 'Linear']
    assert [r.name for r in table] == ['0', '1', '2', '3', '4']
    # the same quantities, by hand (after the call: the running statistics must be unchanged by it)
    for k, v in model.state_dict().items(): assert torch.equal(v, state[k]), k
    h0 = model[0](x); h1 = model[1](h0); h2 = F.relu(h1); h4 = model[4](h2)
    g0, g1, g2, g4 = torch.autograd.grad(h4.pow(2).mean(), [h0, h1, h2, h4])
    for row, act, grad in zip([table[i] for i in (0, 1, 2, 4)], [h0, h1, h2, h4], [g0, g1, g2, g4]):
        assert row[2:] == pytest.approx(stats(act) + stats(grad), rel=1e-4, abs=1e-6)
    assert hooks_left(model) == []
    assert all(p.grad is None for p in model.parameters())


def test_layer_stats_keeps_existing_grads_and_modes():
    model = bn_model()
    for p in model.parameters(): p.grad = torch.full_like(p, 7.)
    model[1].eval()
    layer_stats(model, torch.randn(8, 20))
    assert all(torch.equal(p.grad, torch.full_like(p, 7.)) for p in model.parameters())
    assert model.training and not model[1].training


@pytest.mark.parametrize('where', ['forward', 'loss', 'backward'])
def test_hooks_removed_when_something_raises(where):
    class Raises(nn.Module):
        def forward(self, x):
            if where == 'forward': raise RuntimeError('forward failed')
            return x
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x): return x.clone()
        @staticmethod
        def backward(ctx, g): raise RuntimeError('backward failed')
    class Bwd(nn.Module):
        def forward(self, x): return BadGrad.apply(x) if where == 'backward' else x
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(Raises(), Bwd()), nn.Linear(4, 1))
    running = model[1].running_mean.clone()
    def loss(out):
        if where == 'loss': raise RuntimeError('loss failed')
        return out.sum()
    with pytest.raises(RuntimeError, match=f'{where} failed'):
        layer_stats(model, torch.randn(5, 4), loss)
    assert hooks_left(model) == []
    assert torch.equal(model[1].running_mean, running)


def test_layer_stats_shared_layer_tuple_output_and_frozen_params():
    lin = nn.Linear(6, 6)
    class Shared(nn.Module):
        def __init__(self):
            super().__init__(); self.lin = lin; self.rnn = nn.GRU(6, 5, batch_first=True)
        def forward(self, x): return self.rnn(self.lin(self.lin(x)))[0]
    model = Shared().requires_grad_(False)  # frozen: gradients still come back through the input
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    table = layer_stats(model, x)
    assert [r.name for r in table] == ['lin', 'rnn']
    a1 = lin(x); a2 = lin(a1)
    assert table['lin'][2:4] == pytest.approx(stats(torch.cat([a1.flatten(), a2.flatten()])), rel=1e-5)
    assert table['rnn'].act_std == pytest.approx(stats(model.rnn(a2)[0])[1], rel=1e-5)
    assert all(math.isfinite(v) for r in table for v in r[2:])


def test_layer_stats_integer_input_and_chosen_modules():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    table = layer_stats(model, torch.randint(0, 10, (7, 3)), modules=['0', '2'])
    assert [r.name for r in table] == ['0', '2'] and all(math.isfinite(v) for r in table for v in r[2:])
    with pytest.raises(ValueError, match=r"\['nope'\]"): layer_stats(model, torch.zeros(2, 3, dtype=torch.long), modules=['nope'])
    # a model whose own forward is the only leaf
    assert layer_stats(nn.Linear(3, 2), torch.randn(4, 3))[0].name == ''


def test_layer_stats_bad_input():
    model = bn_model()
    with pytest.raises(ValueError, match=r'non-empty batch.*\(0, 20\)'): layer_stats(model, torch.empty(0, 20))
    with pytest.raises(TypeError, match='list'): layer_stats(model, [[0.] * 20])
    with pytest.raises(TypeError, match='loss_func'): layer_stats(nn.Identity(), torch.randint(0, 3, (4,)))
    assert hooks_left(model) == []


def test_table_repr_and_plot():
    table = layer_stats(bn_model(), torch.randn(16, 20))
    text = repr(table).splitlines()
    assert text[0].split() == ['layer', 'type', 'act', 'mean', 'act', 'std', 'grad', 'mean', 'grad', 'std']
    assert len(text) == 6 and text[2].split()[:2] == ['1', 'BatchNorm1d']
    assert isinstance(table[1:3], LayerStatsTable) and len(table[1:3]) == 2
    with pytest.raises(KeyError, match="'9'"): table['9']
    fig = plot_layer_stats(table, table, labels=['a', 'b'])
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 2
    assert len(table.plot().axes) == 4
    with pytest.raises(ValueError, match='2 tables'): plot_layer_stats(table, table, labels=['a'])
    with pytest.raises(ValueError, match='at least one'): plot_layer_stats()


# ---------------------------------------------------------------- LSUV

def deep_mlp():
    torch.manual_seed(0)
    layers = []
    for i in range(6): layers += [nn.Linear(64 if i else 20, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 1))


def test_lsuv_gives_unit_std_everywhere():
    model, x = deep_mlp(), torch.randn(256, 20, generator=torch.Generator().manual_seed(1))
    before = layer_stats(model, x)
    res = lsuv_(model, x, tol=0.01)
    assert [r.name for r in res] == [n for n, _ in init_layers(model)] and all(r.converged for r in res)
    after = layer_stats(model, x)
    for n, _ in init_layers(model): assert after[n].act_std == pytest.approx(1, abs=0.011)
    assert before['12'].act_std < 0.2 < after['12'].act_std


def test_lsuv_restores_modes_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train(); model[2].eval()
    running = model[1].running_var.clone()
    for train in (False, True):
        lsuv_(model, torch.randn(64, 10), train=train, tol=0.05)
        assert model.training and model[1].training and not model[2].training and model[3].training
        assert torch.equal(model[1].running_var, running)
    assert hooks_left(model) == []


def test_lsuv_runs_in_the_mode_asked_for_without_grad():
    "Every forward pass runs in eval mode (or train mode with train=True) under no_grad; the modes come back, on error too."
    seen = []
    class Spy(nn.Module):
        def forward(self, x): seen.append((self.training, torch.is_grad_enabled())); return x
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), Spy(), nn.Linear(8, 2))
    for train, start in ((False, True), (True, False), (False, False), (True, True)):
        model.train(start); seen.clear()
        lsuv_(model, torch.randn(64, 10), train=train, tol=0.05)
        assert seen and set(seen) == {(train, False)}, (train, start, set(seen))
        assert all(m.training == start for m in model.modules())
    dead = nn.Sequential(nn.Linear(10, 8), Spy())
    nn.init.zeros_(dead[0].weight); nn.init.zeros_(dead[0].bias)
    dead.train(); seen.clear()
    with pytest.raises(ValueError, match='output std 0'): lsuv_(dead, torch.randn(8, 10))
    assert seen == [(False, False)] and all(m.training for m in dead.modules())


def test_lsuv_by_name_and_max_passes():
    model, x = deep_mlp(), torch.randn(64, 20)
    with pytest.warns(UserWarning, match='did not reach std 1'):
        res = lsuv_(model, x, layers=['0', model[2]], tol=1e-9, max_passes=2)
    assert [(r.name, r.passes, r.converged) for r in res] == [('0', 2, False), ('2', 2, False)]


def test_lsuv_errors():
    model, x = deep_mlp(), torch.randn(16, 20)
    with pytest.raises(ValueError, match=r'\(0, 20\)'): lsuv_(model, x[:0])
    with pytest.raises(ValueError, match='no layers to initialise in Sequential'): lsuv_(nn.Sequential(nn.ReLU()), x)
    with pytest.raises(ValueError, match='no layers to initialise in BatchNorm1d'): init_layers(nn.BatchNorm1d(3))
    bn = nn.Sequential(nn.Linear(20, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r'shape \(4,\)'): lsuv_(bn, x, layers=[bn[1]])
    with pytest.raises(ValueError, match="no module named 'x'"): lsuv_(bn, x, layers=['x'])
    with pytest.raises(ValueError, match='no weight'): lsuv_(nn.Sequential(nn.ReLU()), x, layers=['0'])
    with pytest.raises(ValueError, match='part of the model'): lsuv_(bn, x, layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match='3'): lsuv_(bn, x, layers=[3])
    with pytest.raises(ValueError, match='empty'): lsuv_(bn, x, layers=[])
    with pytest.raises(ValueError, match='max_passes'): lsuv_(bn, x, max_passes=0)
    with pytest.raises(ValueError, match='tol'): lsuv_(bn, x, tol=0)
    dead = nn.Sequential(nn.Linear(20, 4))
    nn.init.zeros_(dead[0].weight); nn.init.zeros_(dead[0].bias)
    with pytest.raises(ValueError, match="layer '0' has output std 0"): lsuv_(dead, x)
    assert hooks_left(bn) == [] and hooks_left(dead) == []


# ---------------------------------------------------------------- depth

def test_matmul_chain_seeded_and_regimes():
    a, b = matmul_chain(n=64, depth=5, seed=3), matmul_chain(n=64, depth=5, seed=3)
    assert torch.equal(a.std, b.std) and a.std.shape == (6,)
    assert 20 <= first_nonfinite(matmul_chain(seed=0).std) <= 40
    assert matmul_chain(scale=0.01, seed=0).std[-1] == 0
    assert 0.5 <= matmul_chain(scale=1/math.sqrt(512), seed=0).std[-1] <= 2
    # float64 overflows much later than float32
    assert first_nonfinite(matmul_chain(n=64, depth=400, seed=0, dtype=torch.float64).std) > 100
    with pytest.raises(ValueError, match='-1'): matmul_chain(depth=-1)


def test_product_stats_theory():
    p = product_stats(n=32, trials=2000, seed=0)
    assert p.sq_mean == pytest.approx(32, rel=0.05) and abs(p.mean) < 0.3
    r = product_stats(n=32, trials=2000, scale=math.sqrt(2/32), act=torch.relu, seed=0)
    assert r.mean == pytest.approx(1/math.sqrt(math.pi), rel=0.03) and r.sq_mean == pytest.approx(1, rel=0.05)
    with pytest.raises(ValueError, match='trials'): product_stats(trials=0)


def test_first_nonfinite_and_plot():
    assert first_nonfinite(torch.tensor([1., math.nan])) == 1 and first_nonfinite([]) is None
    ax = plot_std_by_depth({'x': matmul_chain(n=16, depth=40, seed=0), 'y': torch.tensor([1., 0., 2.])})
    assert len(ax.lines) == 2  # 16x16 randn does not overflow in 40 steps: no cross
