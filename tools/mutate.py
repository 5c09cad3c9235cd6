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
TESTS = {'training': ['tests/test_training.py', 'tests/test_checkpoint.py'],
         'callbacks': ['tests/test_callbacks.py', 'tests/test_checkpoint.py'],
         'anneal': ['tests/test_anneal.py'], 'initialization': ['tests/test_initialization.py'],
         'checkpoint': ['tests/test_checkpoint.py'], 'distributed': ['tests/test_distributed.py'],
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
    ('training', 'step: closure without enable_grad', "with torch.enable_grad(): return closure()", "return closure()"),
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
    ('callbacks', 'remove_cbs: callback keeps its runner', "        cb.run = None\n", "        pass\n"),
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
    ('callbacks', 'ProgressCallback: ticks in validation too', "        if not run.in_train: return\n        if self.bar is not None: self.bar.update", "        if self.bar is not None: self.bar.update"),
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

    # ---------------------------------------------------------------- checkpoint.py
    ('checkpoint', 'training_state: the model inside DDP not unwrapped', "while isinstance(getattr(model, 'module', None), torch.nn.Module): model = model.module\n    return model", "return model"),
    ('checkpoint', 'training_state: loaders not saved', "loaders=_loader_states(learn.data)", "loaders={}"),
    ('checkpoint', 'training_state: random state not saved', "rng=_rng_state()", "rng={'cpu': torch.get_rng_state()}"),
    ('checkpoint', '_to_cpu: tensors shared, not copied', "return o.detach().cpu().clone()", "return o.detach().cpu()"),
    ('checkpoint', 'read_checkpoint: damaged record ignored', "if damaged is not None:", "if False:"),
    ('checkpoint', 'read_checkpoint: weights_only off', "map_location='cpu', weights_only=True)", "map_location='cpu', weights_only=False)"),
    ('checkpoint', 'read_checkpoint: format not checked', "state.get('format') != CHECKPOINT_FORMAT", "state.get('format') is None"),
    ('checkpoint', 'read_checkpoint: whole-part check skipped', "    if bad: raise CheckpointError", "    if False: raise CheckpointError"),
    ('checkpoint', '_check_fits: extra keys accepted', "if missing or extra:", "if missing:"),
    ('checkpoint', '_check_fits: dtype not compared', "v.dtype != t.dtype or v.shape", "v.shape"),
    ('checkpoint', '_check_fits: shape not compared', "or v.shape != t.shape:", ":"),
    ('checkpoint', '_check_fits: rng shape not compared', "and cpu.shape == torch.get_rng_state().shape", ""),
    ('checkpoint', '_check_fits: runner not checked', "    _check_resume(r, r['epochs'])", "    pass"),
    ('checkpoint', 'load_checkpoint: loaders not restored', "    for k, sd in loaders.items(): getattr(learn.data, k).load_state_dict(sd)", "    pass"),
    ('checkpoint', 'load_checkpoint: loader set not compared', "if set(loaders) != set(state['loaders']):", "if False:"),
    ('checkpoint', 'load_checkpoint: random state not restored', "    _set_rng_state(state['rng'])", "    pass"),
    ('checkpoint', 'load_checkpoint: optimizer not restored', "    learn.opt.load_state_dict(opt)\n", ""),
    ('checkpoint', 'load_checkpoint: a part that failed to load not undone', "        _load_parts(learn, *before)\n", ""),
    ('checkpoint', 'DivergenceCallback: ratio > -> <', "bad |= losses > self.max_ratio", "bad |= losses < self.max_ratio"),
    ('checkpoint', 'DivergenceCallback: yardstick reset every batch', "if self._start is None: self._start = run.loss.detach()", "self._start = run.loss.detach()"),
    ('checkpoint', 'DivergenceCallback: validation losses checked', "if not run.in_train: return", "pass"),
    ('checkpoint', 'DivergenceCallback: batch number off by one', "k, iters = first + i, len", "k, iters = first + i + 1, len"),
    ('checkpoint', 'DivergenceCallback: no check at epoch end', "    def after_epoch(self): self._check()", "    def after_epoch(self): pass"),
    ('checkpoint', 'DivergenceCallback: every ignored', "if self.every is not None and self._unchecked() >= self.every: self._check()", "pass"),
    ('checkpoint', 'DivergenceCallback: resume drops the yardstick', "self._start = sd['first'], [], sd.get('start')", "self._start = sd['first'], [], None"),
    ('checkpoint', 'DivergenceCallback: resume drops unchecked losses', "self._chunks = [] if sd['losses'] is None else [sd['losses']]", "self._chunks = []"),
    ('checkpoint', 'DivergenceCallback: max_ratio 1 accepted', "not 1 < max_ratio < math.inf", "not 0 < max_ratio < math.inf"),
    ('checkpoint', 'Checkpoint: last epoch not always saved', " or run.epoch + 1 == run.epochs: self.save()", ": self.save()"),
    ('checkpoint', 'Checkpoint: stop request ignored at after_batch', "if self.stop_requested is not None: self._save_and_stop()\n\n    def after_epoch", "pass\n\n    def after_epoch"),
    ('checkpoint', 'Checkpoint: stop without saving', "        r = self.save()['runner']", "        r = training_state(self.run)['runner']"),
    ('checkpoint', 'strict_json: NaN kept', "if isinstance(v, float) and not math.isfinite(v): return None", "pass"),
    ('checkpoint', 'RunFolder.open: a busy folder taken anyway', "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass"),
    ('checkpoint', 'RunFolder.close: discard keeps the private area', "if discard and self.created: shutil.rmtree", "if False: shutil.rmtree"),
    ('checkpoint', 'publish: a folder in the way not refused first', "if p.is_dir() and not p.is_symlink():", "if False:"),
    ('checkpoint', 'publish: sha256 of the wrong file', "'files': {n: sha256sum(stage/'new'/n) for n in names}", "'files': {n: sha256sum(stage/'new'/names[0]) for n in names}"),
    ('checkpoint', 'publish: stale files of the previous set kept', "'stale': [n for n in old if n not in files]", "'stale': []"),
    ('checkpoint', 'publish: stale list includes the new files', "'stale': [n for n in old if n not in files]", "'stale': list(old)"),
    ('checkpoint', '_move_in_or_back: failure not rolled back', "            self._move_back(j)\n            raise", "            raise"),
    ('checkpoint', '_move_in: old file not moved aside', "if dst.exists() or dst.is_symlink(): os.replace(dst, stage/'old'/n)", "pass"),
    ('checkpoint', '_move_back: new file removed even if a manifest lists it', "n != self.manifest and n not in listed and dst.is_file()", "n != self.manifest and dst.is_file()"),
    ('checkpoint', '_move_back: files moved aside not put back', "if kept.exists() or kept.is_symlink(): os.replace(kept, dst)", "if False: pass"),
    ('checkpoint', '_recover: a journal with its manifest in place undone', "if manifest.is_file() and sha256sum(manifest) == j['manifest_sha256']: self._commit(j)", "if False: pass"),
    ('checkpoint', '_recover: a complete staged set undone', "elif self._complete(j): self._move_in_or_back(j)", "elif False: pass"),
    ('checkpoint', '_recover: stray stages kept', "if j is None or p.name != j.get('stage'): shutil.rmtree(p, ignore_errors=True)", "pass"),
    ('checkpoint', '_complete: in-place file not checked by sha', "and sha256sum(self.path/n) == j['files'].get(n))", ")"),
    ('checkpoint', '_write_file: no fsync', "f.flush(); os.fsync(f.fileno())", "pass"),
    # ---------------------------------------------------------------- resume parts of callbacks.py and training.py
    ('callbacks', 'AvgStats.sums_on: sums loaded elsewhere left there', "elif self.sums[0].device != torch.device(device): self.sums = [s.to(device, dtype) for s in self.sums]", "pass"),
    ('callbacks', 'state_dict: after_batch saves the same batch again', "iter=self.iter + 1)", "iter=self.iter)"),
    ('callbacks', 'state_dict: after_epoch saves the same epoch', "nxt = dict(epoch=self.epoch + 1, in_train=True, iter=0)", "nxt = dict(epoch=self.epoch, in_train=True, iter=0)"),
    ('callbacks', 'state_dict: a duplicate callback name not refused', "if cb.name in cbs: raise", "if False: raise"),
    ('callbacks', '_load_resume: counters not restored', "self.n_iter, self.n_epochs, self.pos = r['n_iter'], r['n_epochs'], r['pos']", "pass"),
    ('callbacks', '_load_resume: callback set not compared', "if set(mine) != set(r['cbs']):", "if False:"),
    ('callbacks', '_resume_epoch: validation resume restarts validation', "else (len(self.data.train_dl), r['iter'])", "else (len(self.data.train_dl), 0)"),
    ('callbacks', '_batches_from: a finished phase run again', "if start >= len(dl): return iter(())", "pass"),
    ('callbacks', '_check_resume: epochs not compared', "if r['epochs'] != epochs: raise", "if False: raise"),
    ('callbacks', '_check_resume: pos above 1 accepted', "if not r['pos'] <= 1: raise", "if False: raise"),
    ('callbacks', 'AvgStats.load_state_dict: sums shared, not copied', "None if sums is None else [s.clone() for s in sums]", "sums"),
    ('callbacks', 'GradientAccumulation.load_state_dict: window counts dropped', "    self.samples, self.batches = sd['samples'], sd['batches']", "    pass"),
    ('callbacks', 'GradientAccumulation.state_dict: grads not copied', "None if p.grad is None else p.grad.detach().clone()", "p.grad"),
    ('callbacks', 'InvariantsCallback.state_dict: pending batch not counted', "return {'n_train': self.n_train + pending}", "return {'n_train': self.n_train}"),
    ('training', 'Sampler.load_state_dict: duplicate indices accepted', "if not torch.equal(order.cpu().sort().values, torch.arange(self.n)):", "if False:"),
    ('training', 'Sampler.load_state_dict: generator not restored', "if g is not None: self.generator.set_state(g)", "pass"),
    ('training', 'Sampler.iter_from: starts one batch late', "return self._batches(self.order, start)", "return self._batches(self.order, start + 1)"),
    ('training', 'Optimizer.load_state_dict: state of an unknown parameter ignored', "if p is None: raise ValueError", "if p is None: continue\n        if False: raise ValueError"),
    ('training', 'Optimizer.load_state_dict: state shape not compared', "v.ndim and (v.shape != p.shape or v.dtype != p.dtype)", "False"),
    ('training', 'Optimizer.load_state_dict: hyper-parameters not restored', "groups.append({**copy.deepcopy({k: v for k, v in kept.items() if k != 'params'}), 'params': g['params']})", "groups.append(g)"),
    # ---------------------------------------------------------------- distributed.py
    ('distributed', 'shard_bounds: parts overlap (rank < r -> <=)', "start + q + (rank < r)", "start + q + (rank <= r)"),
    ('distributed', 'global_size: a last partial batch counted as full', "return min(self.sampler.bs, self.sampler.n - i*self.sampler.bs)", "return self.sampler.bs"),
    ('distributed', 'shard_loss_weight: not times world_size', "return n_local * world_size / n_global", "return n_local / n_global"),
    ('distributed', 'loss_share: an empty part shares its NaN', "if n_local == 0: return torch.zeros_like(loss.detach())", "pass"),
    ('distributed', 'loss_share: not weighted by the part', "return loss.detach() * (n_local / n_global)", "return loss.detach()"),
    ('distributed', 'after_loss: the shares not summed across ranks', "dist.all_reduce(loss)  # the global", "pass  # the global"),
    ('distributed', "after_loss: run.loss left as the rank's own", "run.loss = loss.to(run.loss.device)", "pass"),
    ('distributed', 'after_loss: weights the validation loss, not the training one', "if run.in_train: run.loss_grad", "if not run.in_train: run.loss_grad"),
    ('distributed', 'unpack_stats: counts not set from the sums', "s.count = round(n)", "pass"),
    ('distributed', 'after_epoch: stats not summed across ranks', "dist.all_reduce(packed)", "pass"),
    ('distributed', '_check_same_data: differing ranks accepted', "differ = [r for r, s in enumerate(sigs) if s != sigs[0]]", "differ = []"),
    ('distributed', '_check_same_data: unseeded shuffle accepted', "if sigs[0][3] and sigs[0][4] == -1:", "if False:"),
    ('distributed', '_data_signature: generator state left out', "state if s.shuffle else 0]", "0]"),
    ('distributed', 'begin_fit: whole-batch layers accepted', "if found := whole_batch_layer(learn.model):", "if found := None:"),
    ('distributed', 'whole_batch_layer: dropout p > 0 -> p > 1', "lambda m: m.p > 0", "lambda m: m.p > 1"),
    ('distributed', 'begin_fit: rank 0 silenced instead of the others', "        if not world.is_main:\n", "        if world.is_main:\n"),
    ('distributed', 'after_fit: the DDP wrapper left on the learner', "learn.model, learn.data, reports = self._saved", "_, learn.data, reports = self._saved"),
    ('distributed', 'DistributedCheckpoint.save: every rank writes', "if is_main_process(): atomic_write(", "if True: atomic_write("),
    ('distributed', 'DistributedCheckpoint.save: no barrier after rank 0 writes', "barrier()  # the file is whole", "pass  # the file is whole"),
    ('distributed', 'DistributedCheckpoint: stop flags combined by MIN', "op=dist.ReduceOp.MAX", "op=dist.ReduceOp.MIN"),
    ('distributed', "DistributedCheckpoint: another rank's stop ignored", "if flag.item() and self.stop_requested is None:", "if False:"),
    ('distributed', 'DistributedCheckpoint: stops in the middle of an epoch', "def after_batch(self): pass", "def after_batch(self): super().after_batch()"),
    ('distributed', 'distributed(): a failing rank not named', "print(f\"rank {world.rank} of {world.world_size} failed:", "print(f\"a rank of {world.world_size} failed:"),
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
