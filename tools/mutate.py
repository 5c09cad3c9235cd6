#!/usr/bin/env python
"""Mutation pass: does the test suite notice small wrong changes to the library?

Each mutant is one textual edit (a flipped comparison, a dropped call or statement, an off-by-one constant,
`and`/`or` swapped, a wrong value returned) to one module of `lesson9`. For each one this script copies the
package and the tests into a fresh temporary folder, applies the edit to the COPY, runs that module's test file
there (`pytest -x -q`, with a timeout), and records whether a test failed (killed) or all passed (survived).
The working tree is never written to; the copy is restored in `finally` and the folder removed at the end.

    python tools/mutate.py                      # every mutant
    python tools/mutate.py training callbacks   # only these modules
    python tools/mutate.py -k 'nesterov|lr_min' # only mutants whose description matches a regex

Not part of the test run: it takes minutes (one pytest process per mutant).
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {'training': ['tests/test_training.py'], 'callbacks': ['tests/test_callbacks.py'],
         'anneal': ['tests/test_anneal.py'], 'initialization': ['tests/test_initialization.py'],
         # without the two tests that compile in subprocesses under other CPU kernels (minutes, and about torch's cache only)
         'fast': ['tests/test_fast.py', '-k', 'not other_cpu_kernels']}

# (module, description, original text, mutated text): the original must occur exactly once in the module
MUTANTS = [
    # ---------------------------------------------------------------- training.py
    ('training', 'logsumexp: drop the shift fix for infinite rows', "a = a.masked_fill(a.isinf(), 0.)", "a = a"),
    ('training', 'nll: drop the widening of labels to int64', "target = target.long()", "target = target"),
    ('training', 'nll: range check >= n_classes -> >', "(target >= n_classes)", "(target > n_classes)"),
    ('training', 'nll: range check | -> &', "bad = (target < 0) | (target >= n_classes)", "bad = (target < 0) & (target >= n_classes)"),
    ('training', 'nll: mean -> sum', "target].mean()", "target].sum()"),
    ('training', '_check_rows: accept bool labels', " or target.dtype == torch.bool:", ":"),
    ('training', 'accuracy: == -> !=', "(out.argmax(dim=1) == yb)", "(out.argmax(dim=1) != yb)"),
    ('training', 'DummyModule: re-assignment keeps the old module', "self._modules.pop(name, None); self._params.pop(name, None)", "self._params.pop(name, None)"),
    ('training', 'Optimizer._known: accept any value of a torch switch', "elif not (k in _INERT and any(v is ok for ok in _INERT[k])):", "elif not (k in _INERT):"),
    ('training', 'load_state_dict: skip the missing-key check', "if missing: raise", "if False: raise"),
    ('training', 'zero_grad: set_to_none flipped', "if set_to_none: p.grad = None", "if not set_to_none: p.grad = None"),
    ('training', 'SGD: dampening 1 - d -> 1 + d', "alpha=1 - g['dampening']", "alpha=1 + g['dampening']"),
    ('training', 'SGD: nesterov ignored', "d = d.add(buf, alpha=mom) if g['nesterov'] else buf", "d = buf"),
    ('training', 'SGD: momentum != 0 -> == 0', "if mom != 0:", "if mom == 0:"),
    ('training', 'SGD._check: nesterov momentum <= 0 -> < 0', "g['momentum'] <= 0 or g['dampening'] != 0", "g['momentum'] < 0 or g['dampening'] != 0"),
    ('training', 'SGD: weight decay sign', "p.grad.add(p, alpha=g['weight_decay'])", "p.grad.add(p, alpha=-g['weight_decay'])"),
    ('training', 'step: closure without enable_grad', "with torch.enable_grad(): loss = closure()", "loss = closure()"),
    ('training', 'step: return None instead of the loss', "        return loss\n\n    def _update", "        return None\n\n    def _update"),
    ('training', 'load_state_dict: state not cloned', "v.detach().clone().to(p.device)", "v.to(p.device)"),
    ('training', 'Sampler.__len__: drop_last branches swapped', "self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)", "math.ceil(self.n / self.bs) if self.drop_last else self.n // self.bs"),
    ('training', 'Sampler: batches one short', "yield idxs[i:i+self.bs]", "yield idxs[i:i+self.bs-1]"),
    ('training', '_batch_indexable: any __getitem__ is fast', "return getitem is TensorDataset.__getitem__", "return True"),
    ('training', '_batch_indexable: ignore a declaration', "if _declares(ds, 'batch_indexable'): return bool(ds.batch_indexable)", "pass"),
    ('training', 'DataLoader: fast path with a custom collate_fn', "self.fast = collate_fn is collate and _batch_indexable(ds)", "self.fast = _batch_indexable(ds)"),
    ('training', 'get_dls: validation batch bs instead of 2*bs', "DataLoader(valid_ds, 2*bs,", "DataLoader(valid_ds, bs,"),
    ('training', 'get_dls: drop_last kept for validation', "if k != 'drop_last'}", "if True}"),
    ('training', '_run_epoch: no optimizer step', "loss.backward(); opt.step(); opt.zero_grad()", "loss.backward(); opt.zero_grad()"),
    ('training', '_run_epoch: loss not weighted by batch size', "tot_loss.add_(loss.detach(), alpha=n)", "tot_loss.add_(loss.detach())"),
    ('training', 'fit: validation in train mode', "        model.eval()\n", "        model.train()\n"),
    ('training', 'fit: epochs >= 1 -> >= 0', "_check_int('epochs', epochs, 1)", "_check_int('epochs', epochs, 0)"),
    # ---------------------------------------------------------------- callbacks.py
    ('callbacks', 'camel2snake: acronyms split', "_acronym_word.sub(r'\\1_\\2', name)", "name"),
    ('callbacks', 'listify: a list is copied', "if isinstance(o, list): return o", "if isinstance(o, list): return list(o)"),
    ('callbacks', 'Callback.__getstate__ keeps the runner', "state.pop('run', None)", "pass"),
    ('callbacks', '_check_event_names: cutoff 0.8 -> 0.99', "cutoff=0.8)", "cutoff=0.99)"),
    ('callbacks', 'TrainEvalCallback: pos over total, not total - 1', "/ (self.total - 1))", "/ self.total)"),
    ('callbacks', 'TrainEvalCallback: pos not set to 1 at the end', "if run.n_iter >= self.total: run.pos = 1.", "pass"),
    ('callbacks', 'TrainEvalCallback: validation in train mode', "self.run.model.eval()", "self.run.model.train()"),
    ('callbacks', 'Runner: a handler returning True passes', "if h() is True:", "if h() is False:"),
    ('callbacks', 'Runner: no note when after_fit also fails', "if hasattr(err, 'add_note'): err.add_note(", "if False: err.add_note("),
    ('callbacks', 'Runner: no zero_grad after the step', "        self('after_step')\n        learn.opt.zero_grad()", "        self('after_step')"),
    ('callbacks', 'Runner: validation with in_train True', "        self.in_train = False\n        with torch.no_grad():", "        self.in_train = True\n        with torch.no_grad():"),
    ('callbacks', 'Runner.fit: epochs < 0 -> < 1', "or epochs < 0:", "or epochs < 1:"),
    ('callbacks', 'remove_cbs: callback keeps its runner', "            cb.run = None\n", "            pass\n"),
    ('callbacks', 'AvgStats: loss not weighted', "sums[0].add_(loss.detach(), alpha=bn)", "sums[0].add_(loss.detach())"),
    ('callbacks', 'AvgStats: count off by one', "[v / self.count for v", "[v / (self.count + 1) for v"),
    ('callbacks', 'AvgStatsCallback: train stats not reset per epoch', "self.train_stats.reset(); self.valid_stats.reset()", "self.valid_stats.reset()"),
    ('callbacks', 'DeviceCallback: optimizer state not moved', "if torch.is_tensor(v) and v.dim() > 0: state[k] = v.to(self.device)", "pass"),
    ('callbacks', 'DeviceCallback: 0-d step counters moved too', "v.dim() > 0: state[k]", "v.dim() >= 0: state[k]"),
    ('callbacks', 'GradientAccumulation: no zero_grad at begin_epoch', "        self.run.opt.zero_grad()  # nothing left over", "        pass  # nothing left over"),
    ('callbacks', 'GradientAccumulation: samples not reset at begin_epoch', "    def begin_epoch(self):\n        self.samples = self.batches = 0", "    def begin_epoch(self):\n        self.batches = 0"),
    ('callbacks', 'GradientAccumulation: count at after_loss (cancelled batches too)', "        if run.in_train: run.loss_grad = run.loss_grad * len(run.yb)", "        if run.in_train: run.loss_grad = run.loss_grad * len(run.yb); self.samples += len(run.yb); self.batches += 1"),
    ('callbacks', 'GradientAccumulation: < n -> <= n', "if self.batches < self.n and", "if self.batches <= self.n and"),
    ('callbacks', 'GradientAccumulation: window not closed at the epoch end', "run.iter < run.iters - 1: raise", "run.iter < run.iters: raise"),
    ('callbacks', 'GradientAccumulation: gradients not divided', "if p.grad is not None: p.grad.div_(self.samples)", "pass"),
    ('callbacks', 'GradientAccumulation: loss_grad not scaled', "run.loss_grad = run.loss_grad * len(run.yb)", "run.loss_grad = run.loss_grad"),
    ('callbacks', 'ProgressCallback: ticks in validation too', "if self.run.in_train: self.on_batch()", "self.on_batch()"),
    # ---------------------------------------------------------------- anneal.py
    ('anneal', 'Recorder: records validation batches too', "        if not run.in_train: return\n        for lrs, g in zip(self._lrs", "        for lrs, g in zip(self._lrs"),
    ('anneal', '_lerp: branch < 0.5 -> > 0.5', "if w < 0.5 else", "if w > 0.5 else"),
    ('anneal', 'sched_cos: 1 - cos -> 1 + cos', "(1 - math.cos(math.pi*pos))/2", "(1 + math.cos(math.pi*pos))/2"),
    ('anneal', 'sched_no: returns end', "    \"Constant: `start` at every `pos`.\"\n    return start", "    \"Constant: `start` at every `pos`.\"\n    return end"),
    ('anneal', 'sched_exp: and -> or in the check', "if not (start > 0 and end > 0)", "if not (start > 0 or end > 0)"),
    ('anneal', 'combine_scheds: zero-width phases kept', "if p > 0: starts.append", "if p >= 0: starts.append"),
    ('anneal', 'combine_scheds: bisect_right -> bisect_left', "bisect.bisect_right(starts, pos) - 1", "bisect.bisect_left(starts, pos) - 1"),
    ('anneal', 'one_cycle_scheds: start lr v*div', "cos_1cycle_anneal(v/div, v, v/final_div)", "cos_1cycle_anneal(v*div, v, v/final_div)"),
    ('anneal', 'one_cycle_scheds: moms < 1 -> <= 1', "0 <= m < 1 for m in moms", "0 <= m <= 1 for m in moms"),
    ('anneal', 'ParamScheduler: sets values in validation too', "if run.in_train: self._set(run.pos)", "self._set(run.pos)"),
    ('anneal', 'LRFinder: diverged > -> >=', "if loss > self.div_thresh * self._best", "if loss >= self.div_thresh * self._best"),
    ('anneal', 'LRFinder: max_iter >= -> >', "self._n >= self.max_iter", "self._n > self.max_iter"),
    ('anneal', '_restore: gradients not restored', "for p, g in zip(model.parameters(), saved['grads']): p.grad = g", "pass"),
    ('anneal', '_restore: modes not restored', "for m, mode in zip(model.modules(), saved['modes']): m.training = mode", "pass"),
    ('anneal', 'smoothed: bias correction off by one', "out.append(avg / (1 - beta**(i + 1)))", "out.append(avg / (1 - beta**(i + 2)))"),
    ('anneal', 'lr_min: / 10 -> / 1', "return self.lrs[self._argmin()] / 10", "return self.lrs[self._argmin()]"),
    ('anneal', 'lr_steep: end < 2 -> < 1', "if end < 2: return None", "if end < 1: return None"),
    ('anneal', 'lr_find: too few epochs', "math.ceil(max_iter / n)", "max_iter // n"),
    # ---------------------------------------------------------------- initialization.py
    ('initialization', 'gain: a*a -> a', "math.sqrt(2/(1 + a*a))", "math.sqrt(2/(1 + a))"),
    ('initialization', 'fans: fan_in and fan_out swapped', "return shape[1]*rf, shape[0]*rf", "return shape[0]*rf, shape[1]*rf"),
    ('initialization', 'receptive_field: < 2 -> < 1', "if len(shape) < 2: raise", "if len(shape) < 1: raise"),
    ('initialization', 'kaiming_std: mode flipped', "fans(w)[mode == 'fan_out']", "fans(w)[mode == 'fan_in']"),
    ('initialization', 'kaiming_: uniform bound without sqrt(3)', "w.uniform_(-math.sqrt(3)*std, math.sqrt(3)*std,", "w.uniform_(-std, std,"),
    ('initialization', '_Moments: drop the between-groups term', "self.m2 += m2 + delta*delta*self.n*n/total", "self.m2 += m2"),
    ('initialization', '_Moments: biased std', "math.sqrt(self.m2/(self.n - 1))", "math.sqrt(self.m2/self.n)"),
    ('initialization', 'record_init_calls: nested calls recorded', "if depth[0] == 0:", "if depth[0] >= 0:"),
    ('initialization', 'layer_stats: input not made to require grad', "if xb.is_floating_point(): xb = xb.detach().requires_grad_()", "pass"),
    ('initialization', '_kept_buffers: buffers not restored', "for b, v in saved: b.copy_(v)", "pass"),
    ('initialization', 'lsuv_: model not put in the asked mode', "    model.train(train)\n", "    pass\n"),
    ('initialization', 'lsuv_: weight multiplied by the std', "layer.weight /= std", "layer.weight *= std"),
    ('initialization', 'lsuv_: modes not restored', "for m, mode in modes: m.training = mode", "pass"),
    ('initialization', 'lsuv_: no warning', "if bad: warnings.warn", "if False: warnings.warn"),
    ('initialization', '_output_std: hook left on the layer', "    finally: h.remove()\n    if not seen", "    finally: pass\n    if not seen"),
    ('initialization', 'init_layers: dim >= 2 -> > 2', "m.weight.dim() >= 2]", "m.weight.dim() > 2]"),
    ('initialization', 'LayerStatsTable: a slice is a plain list', "return LayerStatsTable(res) if isinstance(i, slice) else res", "return res"),
    ('initialization', '_first_float: integer outputs accepted', "return out if out.is_floating_point() else None", "return out"),
    # ---------------------------------------------------------------- fast.py
    ('fast', '_check: callbacks added during the fit not noticed', "if run._handlers is not self._handlers: raise", "if False: raise"),
    ('fast', '_check: a changed fast_path not noticed', "if cb.fast_path != mode:", "if False:"),
    ('fast', '_check: a replaced loss not noticed', "learn.loss_func is not self.loss_func or", "False or"),
    ('fast', '_check: a frozen parameter not noticed', "            if not p.requires_grad:", "            if False:"),
    ('fast', '_check: requires_grad test flipped', "            if not p.requires_grad:", "            if p.requires_grad:"),
    ('fast', '_check: maximize during the fit not noticed', "if g.get('maximize'): raise FastPathRefused", "if False: raise FastPathRefused"),
    ('fast', '_probe: unused parameters accepted', "        if unused:", "        if False:"),
    ('fast', '_probe: not run for a new compiled graph', "        self._probe()  # on the batch", "        pass  # on the batch"),
    ('fast', '_probe: uncompiled, only at the first batch', "        if self.mode == 'func': self._probe()", "        if self.mode == 'func' and self.calls == 0: self._probe()"),
    ('fast', '_refusal: a wrapped refusal not found', "        if isinstance(e, FastPathRefused): return e", "        if False: return e"),
    ('fast', 'guards skipped once a graph exists', "        out = self._compiled(*args)", "        with torch.compiler.set_stance(skip_guard_eval_unsafe=self.n_graphs > 0): out = self._compiled(*args)"),
    ('fast', 'labels not checked', "if self.mode != 'func': self._check_labels()", "pass"),
    ('fast', 'labels: range test 0 <= lo dropped', "if 0 <= lo.item() and hi.item() < tail[0]: return", "if hi.item() < tail[0]: return"),
    ('fast', 'labels: hi < classes -> <=', "hi.item() < tail[0]: return", "hi.item() <= tail[0]: return"),
    ('fast', 'window: a resumed window not copied in', "else: a.copy_(g); self._acc_zero[i] = False", "else: self._acc_zero[i] = False"),
    ('fast', 'window: not zeroed after zero_grad', "if not self._acc_zero[i]: a.zero_(); self._acc_zero[i] = True", "if False: pass"),
    ('fast', 'window: marked zero after an accumulating batch', "self._acc_zero = [do_step] * len(self.accs)", "self._acc_zero = [True] * len(self.accs)"),
    ('fast', 'window: .grad not cleared after the step', "for p in self.params: p.grad = None  # as zero_grad", "pass  # as zero_grad"),
    ('fast', 'window: < n -> <= n', "do_step = not (batches < ga.n and", "do_step = not (batches <= ga.n and"),
    ('fast', 'accumulating batches make momentum buffers', "        if do_step:\n            bufs, had = self._momentum_buffers()", "        if True:\n            bufs, had = self._momentum_buffers()"),
    ('fast', 'sgd_coeffs: first step with momentum as a later one', "buf_decay, buf_in = (mom, 1 - damp) if has_buf else (0., 1.)", "buf_decay, buf_in = (mom, 1 - damp)"),
    ('fast', 'why_not_fast: trainable set not compared', "if {id(p) for p in trained} != {id(p) for p in in_opt}:", "if False:"),
    ('fast', 'stats: count per batch, not per sample', "for st in self.stats: st.count += bn", "for st in self.stats: st.count += 1"),
]


def run_mutant(work:Path, module:str, old:str, new:str, timeout:int):
    "Apply one edit to the copy in `work`, run the module's tests there, restore the copy: 'killed', 'survived' or 'timeout'."
    path = work/'lesson9'/f'{module}.py'
    original = path.read_text()
    if original.count(old) != 1: return f'not applied ({original.count(old)} matches)'
    try:
        path.write_text(original.replace(old, new))
        env = {**os.environ, 'PYTHONPATH': str(work), 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
        try:
            r = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *TESTS[module]],
                               cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired: return 'timeout'
        if r.returncode == 0: return 'survived'
        failed = [l.split(' ')[1] for l in r.stdout.splitlines() if l.startswith('FAILED ')]
        return 'killed' + (f' by {failed[0].split("::", 1)[1]}' if failed else f' (rc {r.returncode})')
    finally: path.write_text(original)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('modules', nargs='*', help=f"modules to mutate (default: all of {', '.join(TESTS)})")
    ap.add_argument('-k', default='', help='only mutants whose description matches this regular expression')
    ap.add_argument('--timeout', type=int, default=180, help='seconds per mutant')
    args = ap.parse_args()
    todo = [m for m in MUTANTS if (not args.modules or m[0] in args.modules) and re.search(args.k, m[1])]
    with tempfile.TemporaryDirectory(prefix='lesson9-mutants-') as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT/'lesson9', work/'lesson9', ignore=shutil.ignore_patterns('__pycache__'))
        shutil.copytree(ROOT/'tests', work/'tests', ignore=shutil.ignore_patterns('__pycache__'))
        # sanity: the copy is what the tests import, and it passes unmutated
        for module in sorted({m[0] for m in todo}):
            env = {**os.environ, 'PYTHONPATH': str(work), 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
            where = subprocess.run([sys.executable, '-c', 'import lesson9; print(lesson9.__file__)'], cwd=work, env=env,
                                   capture_output=True, text=True).stdout.strip()
            assert where.startswith(str(work)), f"the tests would import {where}, not the copy"
            r = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *TESTS[module]],
                               cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
            assert r.returncode == 0, f"{module}: tests fail before any mutation:\n{r.stdout[-2000:]}"
        results = []
        for module, desc, old, new in todo:
            t0 = time.time()
            res = run_mutant(work, module, old, new, args.timeout)
            results.append((module, desc, res))
            print(f"{module:<15} {res.split(' ')[0]:<9} {desc}  [{time.time() - t0:.0f}s]  {res}", flush=True)
    killed = sum(r[2].startswith('killed') for r in results)
    print(f"\n{killed}/{len(results)} killed; survivors:")
    for module, desc, res in results:
        if not res.startswith('killed'): print(f"  {module}: {desc} ({res})")
    return 0


if __name__ == '__main__': sys.exit(main())
