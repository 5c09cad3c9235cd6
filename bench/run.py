"""Speed benchmark: lesson9's training loops against a plain PyTorch loop, PyTorch Lightning and fastai.

    python bench/run.py                 # CPU, the full run (about 8-10 minutes on 2 cores)
    python bench/run.py --quick         # 6 rounds instead of 15 (about 5 minutes)
    python bench/run.py --device cuda   # data and models on the GPU

Each loop runs in its own process per model (`bench/worker.py --serve`): it makes the data and warms up,
then times one epoch whenever asked. The loops are asked in turn, round after round (round 1: loops 1..6,
round 2: 2..6,1, ...), so that a change in the machine's load hits every loop alike and each ratio compares
epochs run seconds apart; the rounds are split over 3 generations of fresh processes, so that no loop's
numbers rest on one process. The table shows medians over the rounds. Loops 5 and 6 (Lightning,
fastai) run with the Python of bench/.venv-peers (`bash bench/setup_peers.sh`), or this one if it has them,
and are skipped with a message otherwise. See bench/README.md for what is measured and how.
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, 'worker.py')
sys.path.insert(0, HERE)
from worker import LOOP_NAMES  # noqa: E402  (a plain constant; importing worker does not import torch)

PEER_MODULES = {5: 'lightning', 6: 'fastai.basics'}
TARGETS_CPU = {3: 1.05, 4: 1.05, 7: 0.70}   # loop / loop 1, lesson MLP (7: after its warm-up epoch)
TARGET_GPU_LOOP4 = 1.10
TARGET_MEM = 1.10                  # peak memory of loop 4 / loop 1
TARGET_DL_VS_TORCH, TARGET_DL_VS_RAW = 20., 1.3


def log(*a): print(*a, file=sys.stderr, flush=True)


def run_jsons(cmd, timeout, env=None):
    "Run `cmd`; its stdout lines that hold JSON objects, parsed, or raise with its stderr."
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])}... failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    for line in p.stderr.splitlines():
        if line.startswith('loop 4:'): log('  note:', line)
    return [json.loads(l) for l in p.stdout.splitlines() if l.startswith('{')]


def run_json(cmd, timeout, env=None): return run_jsons(cmd, timeout, env)[-1]


class Worker:
    "One loop's process (`worker.py --serve`): started once, then asked for one timed epoch at a time."
    def __init__(self, loop, cmd, env, timeout=600):
        self.loop, self.timeout = loop, timeout
        self.err = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=env, cwd=REPO)

    def wait_ready(self):
        "Wait for the 'ready' line: data made, warmed up (its warm-up times kept in `self.warmup`)."
        self.warmup = self._read().get('warmup', {})
        for line in self.stderr().splitlines():
            if line.startswith('loop 4:'): log('  note:', line)
        return self

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def _read(self):
        timer = threading.Timer(self.timeout, self.proc.kill)  # a hung worker must not hang the bench
        timer.start()
        try: line = self.proc.stdout.readline()
        finally: timer.cancel()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"loop {self.loop}'s worker stopped (exit {self.proc.returncode}):\n{self.stderr()[-3000:]}")
        return json.loads(line)

    def epoch(self, model):
        "One timed epoch of `model`, as the worker's result dict."
        self.proc.stdin.write(model + '\n'); self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write('quit\n'); self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired): self.proc.kill()
        self.err.close()


def python_with(module, candidates, env):
    "The first (interpreter, extra PYTHONPATH) in `candidates` that can import `module`, or None."
    for py, path in candidates:
        if not (py and os.path.exists(py)) or (path and not os.path.isdir(path)): continue
        if subprocess.run([py, '-c', f'import {module}'], capture_output=True, cwd=HERE, env=with_path(env, path)).returncode == 0:
            return py, path
    return None


def with_path(env, path):
    "`env` with `path` put first on PYTHONPATH (unchanged when `path` is None)."
    if not path: return env
    return dict(env, PYTHONPATH=os.pathsep.join([path] + [p for p in [env.get('PYTHONPATH')] if p]))


def versions(py, modules, env=None):
    "{module: version} as seen by the interpreter `py` (missing ones left out)."
    code = ("import importlib, json, sys; v = {}\n"
            "for m in sys.argv[1:]:\n"
            "    try: v[m] = importlib.import_module(m).__version__\n"
            "    except Exception: pass\n"
            "print(json.dumps(v))")
    p = subprocess.run([py, '-c', code, *modules], capture_output=True, text=True, cwd=HERE, env=env)
    return json.loads(p.stdout) if p.returncode == 0 else {}


def machine_info(device):
    "Machine, load and software facts for the table's header."
    import torch
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f: cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration): pass
    info = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), platform=platform.platform(),
                cpu=cpu, cpu_count=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                loadavg=os.getloadavg() if hasattr(os, 'getloadavg') else None)
    if device.startswith('cuda'): info['gpu'] = torch.cuda.get_device_name(torch.device(device))
    return info


def median(xs): return statistics.median(xs) if xs else float('nan')


def summarize(records, loops, models):
    """Per (model, loop): medians over the rounds of time and memory, and ratios to loop 1. `ratio` is the median
    over rounds of (this loop's epoch / loop 1's epoch in the same round): each ratio compares epochs run seconds
    apart, so a slow drift in the machine's load cancels; `ratio_of_medians` is kept in the JSON too."""
    rows = []
    for model in models:
        base = {r['rep']: r for r in records if r['model'] == model and r['loop'] == 1}
        for loop in loops:
            rs = [r for r in records if r['model'] == model and r['loop'] == loop]
            if not rs: continue
            ms, cpu, mem = ([r[k] for r in rs] for k in ('ms_per_epoch', 'cpu_ms_per_epoch', 'peak_mem'))
            paired = [(r['ms_per_epoch'] / base[r['rep']]['ms_per_epoch'], r['cpu_ms_per_epoch'] / base[r['rep']]['cpu_ms_per_epoch'])
                      for r in rs if r['rep'] in base]
            base_ms = median([b['ms_per_epoch'] for b in base.values()])
            base_mem = median([b['peak_mem'] for b in base.values()])
            rows.append(dict(model=model, loop=loop, name=rs[0]['name'], n=len(rs), samples=rs[0]['samples'], bs=rs[0]['bs'],
                             steps=rs[0]['train_steps'], ms_median=median(ms), ms_min=min(ms), ms_max=max(ms),
                             us_per_step=median(ms) * 1e3 / rs[0]['train_steps'], cpu_ms_median=median(cpu),
                             ratio=median([a for a, _ in paired]), cpu_ratio=median([c for _, c in paired]),
                             ratio_of_medians=median(ms) / base_ms if base else float('nan'),
                             peak_mem_mb=median(mem) / 2**20, mem_ratio=median(mem) / base_mem if base else float('nan'),
                             added_mem_mb=median([r['peak_mem'] - r['mem_at_start'] for r in rs]) / 2**20,
                             mem_kind=rs[0]['mem_kind'], stats=rs[-1]['stats'], with_anneal=rs[0].get('with_anneal')))
    return rows


def table(rows):
    out = ['| model | loop | ms/epoch (median) | min-max | us/step | x loop 1 (paired) | CPU ms (x loop 1) | peak MB | mem x loop 1 | MB added | valid loss |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        name = r['name'] + (' (no anneal yet)' if r['loop'] == 4 and r['with_anneal'] is False else '')
        spec = f"{r['model']} ({r['samples']:,} samples, bs {r['bs']})"
        vl = r['stats'].get('valid_loss')
        out.append(f"| {spec} | {r['loop']}. {name} | {r['ms_median']:.1f} | {r['ms_min']:.0f}-{r['ms_max']:.0f} | "
                   f"{r['us_per_step']:.1f} | {r['ratio']:.3f} | {r['cpu_ms_median']:.0f} ({r['cpu_ratio']:.3f}) | {r['peak_mem_mb']:.1f} | {r['mem_ratio']:.3f} | {r['added_mem_mb']:.1f} | "
                   f"{'' if vl is None else f'{vl:.6f}'} |")
    return '\n'.join(out)


def dl_table(dl):
    out = ['| loader | ms/epoch (median) | batches/s | speed x torch DataLoader | time x fastest raw |',
           '|---|---:|---:|---:|---:|']
    torch_key = 'torch DataLoader(TensorDataset, shuffle=True)'
    meds = {k: median(v) for k, v in dl['ms_per_epoch'].items()}
    raw = min(v for k, v in meds.items() if k.startswith('raw'))
    for k, v in meds.items():
        out.append(f"| {k} | {v:.1f} | {dl['batches'][k] / v * 1e3:,.0f} | {meds[torch_key] / v:.1f} | {v / raw:.2f} |")
    return '\n'.join(out)


def check_targets(rows, dl, parity, device):
    "Lines saying which of the issue's targets hold in this run."
    res = []
    get = lambda loop: next((r for r in rows if r['model'] == 'lesson' and r['loop'] == loop), None)
    def say(ok, text): res.append(f"- {'PASS' if ok else 'MISS'}: {text}")
    if device == 'cpu':
        for loop, t in TARGETS_CPU.items():
            r = get(loop)
            if r: say(r['ratio'] <= t, f"CPU lesson MLP loop {loop} / loop 1 = {r['ratio']:.3f} (target <= {t}; in process CPU time {r['cpu_ratio']:.3f})")
    else:
        r = get(4)
        if r: say(r['ratio'] <= TARGET_GPU_LOOP4, f"GPU lesson MLP loop 4 / loop 1 = {r['ratio']:.3f} (target <= {TARGET_GPU_LOOP4})")
        for loop in (5, 6):
            if not get(loop): res.append(f"- MISS: {LOOP_NAMES[loop]} not measured in this run")
    r = get(4)
    if r: say(r['mem_ratio'] <= TARGET_MEM, f"peak memory loop 4 / loop 1 = {r['mem_ratio']:.3f} (target <= {TARGET_MEM}; {r['mem_kind']})")
    if dl:
        meds = {k: median(v) for k, v in dl['ms_per_epoch'].items()}
        ours = meds['lesson9 DataLoader(Dataset, shuffle=True)']
        vs_torch = meds['torch DataLoader(TensorDataset, shuffle=True)'] / ours
        raw = min(v for k, v in meds.items() if k.startswith('raw'))
        say(vs_torch >= TARGET_DL_VS_TORCH, f"lesson9 DataLoader = {vs_torch:.1f}x the batches/s of torch's DataLoader (target >= {TARGET_DL_VS_TORCH:.0f}x)")
        say(ours / raw <= TARGET_DL_VS_RAW, f"lesson9 DataLoader time / fastest raw slicing = {ours / raw:.2f} (target <= {TARGET_DL_VS_RAW})")
    if parity: say(parity['ok'], f"parity: loops 1, 3, 4 final losses agree to {parity['max_diff']:.2e} (target 1e-5)")
    return res


def warmup_lines(warmups):
    "Loop 7's warm-up per model: the first epoch, compile included, against the epochs after it."
    out = []
    for model, ws in warmups.items():
        if not ws: continue
        secs, comp = median([w['seconds'] for w in ws]), median([w['compile_s'] for w in ws])
        out.append(f"- loop 7, {model}: warm-up epoch {secs:.1f} s, of which compiling {comp:.1f} s "
                   f"({ws[0]['n_graphs']} graph(s), mode {ws[0]['mode']}; median over {len(ws)} processes)")
    return out


def start_workers(loops, models, pythons, envs, args, wide_samples, tag):
    "One `Worker` per (loop, model), all started at once (start-up is not timed); those that fail are left out."
    workers, ready = {}, {}
    t0 = time.time()
    for model in models:
        for loop in loops:
            cmd = [pythons[loop], WORKER, '--serve', '--loop', str(loop), '--models', model, '--device', args.device,
                   '--threads', str(args.threads), '--samples', str(args.samples), '--wide-samples', str(wide_samples)]
            workers[loop, model] = Worker(loop, cmd, envs[loop])
    for key, w in workers.items():
        try: ready[key] = w.wait_ready()
        except RuntimeError as e: log(f"  loop {key[0]} {key[1]}: FAILED to start, left out: {e}"); w.close()
    log(f"processes {tag}: {len(ready)} started (data made, warmed up) in {time.time() - t0:.0f} s")
    return ready


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (data on the device)")
    p.add_argument('--quick', action='store_true', help='6 rounds in 2 generations of processes instead of 15 in 3')
    p.add_argument('--reps', type=int, help='rounds: timed epochs per loop and model (default 15, quick 6; at least 5)')
    p.add_argument('--procs', type=int, help='generations of processes the rounds are split over (default 3, quick 2)')
    p.add_argument('--threads', type=int, default=1, help='torch threads in every loop process (default 1)')
    p.add_argument('--loops', default='1,2,3,4,5,6,7,8')
    p.add_argument('--models', default='lesson,wide')
    p.add_argument('--samples', type=int, default=50_000, help='training samples per epoch (lesson MLP)')
    p.add_argument('--wide-samples', type=int, help='training samples per epoch for the wide MLP '
                   '(default: 50,000 on a GPU; 1,024 on the CPU, where a full epoch takes a minute)')
    p.add_argument('--peer-python', help='interpreter with lightning and fastai (default: bench/.venv-peers, then this one)')
    p.add_argument('--no-dataloader', action='store_true', help='skip the DataLoader benchmark')
    p.add_argument('--no-parity', action='store_true', help='skip the parity check')
    p.add_argument('--out', default=os.path.join(HERE, 'results'), help='folder for the JSON and markdown results')
    args = p.parse_args(argv)
    import torch
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    on_gpu = args.device.startswith('cuda')
    reps = args.reps or (6 if args.quick else 15)
    args.procs = args.procs or (2 if args.quick else 3)
    loops = [int(l) for l in args.loops.split(',')]
    models = args.models.split(',')
    wide_samples = args.wide_samples or (50_000 if on_gpu else 1_024)
    t_start = time.time()

    info = machine_info(args.device)
    info.update(threads=args.threads, reps=reps, procs=args.procs, device=args.device)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONWARNINGS='ignore')
    # peers: their own venv here; on a GPU machine the system Python, plus bench/.peers-site for fastai
    # (`bash bench/setup_peers.sh --offline`)
    peer_candidates = ([(args.peer_python, None)] if args.peer_python else
                       [(os.path.join(HERE, '.venv-peers', 'bin', 'python'), None),
                        (sys.executable, os.path.join(HERE, '.peers-site')), (sys.executable, None)])
    pythons, envs = {l: sys.executable for l in loops if l not in PEER_MODULES}, {l: env for l in loops}
    for l in [l for l in loops if l in PEER_MODULES]:
        found = python_with(PEER_MODULES[l], peer_candidates, env)
        if found is None:
            log(f"skipping loop {l} ({LOOP_NAMES[l]}): {PEER_MODULES[l]} is not importable from {[c[0] for c in peer_candidates]}; "
                "run `bash bench/setup_peers.sh` to install it (bench/README.md)")
            continue
        pythons[l], envs[l] = found[0], with_path(env, found[1])
        info.update(versions(found[0], [PEER_MODULES[l].split('.')[0]], envs[l]))
        if found[0] != sys.executable: info['torch (peers)'] = versions(found[0], ['torch'], envs[l]).get('torch')
    loops = [l for l in loops if l in pythons]
    log(f"bench: device {args.device}, {reps} reps, loops {loops}, models {models}, threads {args.threads}, load {info['loadavg']}")

    parity = None
    if not args.no_parity and 'lesson' in models:
        log("parity check: loops 1, 3, 4 (constant-lr ParamScheduler) on the lesson MLP ...")
        try:
            parity = run_json([sys.executable, os.path.join(HERE, 'parity.py'), '--device', args.device, '--threads', str(args.threads),
                               '--samples', str(args.samples)], 600, env)
            log(f"  max |difference| {parity['max_diff']:.2e} -> {'ok' if parity['ok'] else 'FAILED'}")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            parity = dict(ok=False, max_diff=float('nan'), loops={}, error=str(e))
            log(f"  parity check FAILED to run: {e}")

    # Rounds run in `procs` generations, each with its own fresh processes: a process can carry a bias of its own
    # (up to about 10% on this machine, for an identical loop, e.g. from where its memory landed), so each loop
    # is measured by several processes and the paired ratios average that out.
    records, warmups = [], {m: [] for m in models}
    gens = max(1, min(args.procs, reps))
    bounds = [round(g * reps / gens) for g in range(gens + 1)]
    for g in range(gens):
        workers = start_workers(loops, models, pythons, envs, args, wide_samples, f"{g+1}/{gens}")
        for (loop, model), w in workers.items():
            if loop == 7 and model in w.warmup: warmups[model].append(w.warmup[model])
        try:
            for rep in range(bounds[g], bounds[g + 1]):
                line = []
                for model in models:
                    live = [l for l in loops if (l, model) in workers]
                    order = live[rep % len(live):] + live[:rep % len(live)] if live else []
                    for loop in order:
                        try: r = workers[loop, model].epoch(model)
                        except RuntimeError as e:
                            log(f"  loop {loop} {model}: FAILED, left out of this generation: {e}"); workers.pop((loop, model)).close(); continue
                        r['rep'], r['proc'] = rep, g
                        records.append(r)
                        line.append(f"{model[0]}{loop}:{r['ms_per_epoch']:.0f}")
                log(f"  round {rep+1}/{reps} ms: " + ' '.join(line))
        finally:
            for w in workers.values(): w.close()

    dl = None
    if not args.no_dataloader:
        log("DataLoader benchmark ...")
        dl = run_json([sys.executable, WORKER, '--dataloader', '--device', args.device, '--threads', str(args.threads),
                       '--reps', str(min(reps, 7)), '--samples', str(args.samples)], 600, env)

    info['loadavg_after'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    info['seconds'] = round(time.time() - t_start, 1)
    rows = summarize(records, loops, models)
    targets = check_targets(rows, dl, parity, 'cuda' if on_gpu else 'cpu')
    head = (f"{info['date']} | {info.get('gpu', info['cpu'])} ({info['cpu_count']} CPU cores) | {info['platform']}\n"
            f"python {info['python']}, torch {info['torch']}"
            + ''.join(f", {k} {info[k]}" for k in ('lightning', 'fastai', 'torch (peers)') if info.get(k))
            + f" | device {args.device}, torch threads {args.threads}, {reps} interleaved rounds (median) over {args.procs} processes per loop and model, load average "
            f"{' '.join(f'{x:.2f}' for x in info['loadavg'] or ())} before, "
            f"{' '.join(f'{x:.2f}' for x in info['loadavg_after'] or ())} after | {info['seconds']:.0f} s")
    md = [head, '', table(rows)]
    if dl: md += ['', f"DataLoader, iterating batches only ({dl['samples']:,} x 784 float32, bs {dl['bs']}, shuffled):", '', dl_table(dl)]
    if parity: md += ['', 'Parity (one epoch, same seed and batch order; loop 4 '
                      + ('with Recorder and a constant-lr ParamScheduler' if parity.get('loop4_with_anneal') else 'without lesson9.anneal')
                      + '): ' + ', '.join(f"loop {k}: train {v['train_loss']:.8f} valid {v['valid_loss']:.8f}" for k, v in parity['loops'].items())]
    if any(warmups.values()):
        md += ['', 'Fast path (loop 7): its epochs above are after the warm-up epoch, which compiles the step:', *warmup_lines(warmups)]
    md += ['', 'Targets:', *targets]
    text = '\n'.join(md)
    print(text)

    os.makedirs(args.out, exist_ok=True)
    tag = 'gpu' if on_gpu else 'cpu'
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    blob = dict(info=info, rows=rows, records=records, dataloader=dl, parity=parity, targets=targets, warmups=warmups)
    for name in (f'{tag}-{stamp}.json', f'latest-{tag}.json'):
        with open(os.path.join(args.out, name), 'w') as f: json.dump(blob, f, indent=1)
    with open(os.path.join(args.out, f'latest-{tag}.md'), 'w') as f: f.write(text + '\n')
    log(f"wrote {os.path.join(args.out, f'latest-{tag}.json')} and latest-{tag}.md ({info['seconds']:.0f} s)")


if __name__ == '__main__':
    main()
