"""Training data at AudioSet scale: memory of a 2-million-entry file list, loader throughput, and the
planning of `m2d convert` / the default `m2d stats` over that many files.

The list is faked on one machine: `--real_files` (default 64) log-mel files ``[1, 80, 1001]`` (10 s,
float32 and a float16 copy) are written to a temporary folder under AudioSet-like names
(``audioset_lms/unbalanced_train_segments/<11-char id>_0.000_10.000.npy``), and a CSV of `--entries`
rows names them cyclically (row i names file i mod `--real_files`). Every row is its own string in a Python list
as much as a distinct name of the same length, so memory and lookups behave as with 2 M distinct
files; reads of the repeated files come from the page cache (storage bandwidth is given as
`bytes_per_sample`, not measured).

    python benchmarks/scale.py --entries 2000000 --workers 2 --json results/issue26/scale_after.json

Keys written: entries, csv_load_s, main_rss_mb (RSS growth of the process holding the training set
built from the list), worker_private_mb (the largest growth over the loader workers of USS =
Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, from the worker's start to after it has
looked up the paths of its share of one epoch, one DataLoader over the whole list; with one worker
USS also counts the pages the parent process rewrites after the fork, which two or more workers
still share among themselves: `worker_private_mb_after_first_chunk` and `..._to_end` split the growth
at the first 10,000 paths),
samples_per_s_per_worker and samples_per_s_per_worker_float16 (the training loader of
`m2d pretrain`, `m2d.train.loop.make_loader`, default M2D input 80x608, patch 16x16, unstructured
mask 0.7, total samples/s divided by `--workers`, median of `--repeats`), samples_per_worker_cpu_s and
samples_per_worker_cpu_s_float16 (samples per CPU second the workers used: what a worker core gives,
much less affected by other load on a shared machine than wall clock), bytes_per_sample (file bytes
read per sample, float32 and float16), convert_plan_s and convert_plan_mb (planning `m2d convert --files LIST` of
`--entries` listed source files into an empty folder: time and peak RSS growth; `--convert_entries` plans
fewer and scales linearly, marked by `convert_plan_extrapolated_from`), stats_s (`m2d stats` on the
list with its default options; when that takes longer than `--stats_timeout` it is stopped and timed
on the first `--stats_probe` rows instead, scaled linearly: `stats_extrapolated_from` says so),
loadavg, cpu.

Each measurement runs in a forked child, so one does not inflate the next. It runs against an older
tree too (``PYTHONPATH=OLD_TREE/src``; it uses only `LMSDataset`, `ResumableSampler`,
`loop.build_dataset` / `make_loader`, `jobs.plan` (before `m2d.data.convert.plan_convert` existed) and `m2d stats`), which is how the before numbers
in benchmarks/README.md were taken (6e33ba4).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRAMES = 1001  # a 10-s AudioSet clip at 100 frames/s


def rss_mb(field: str = 'VmRSS') -> float:
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def uss_mb(pid: int | str = 'self') -> float:
    """Private_Clean + Private_Dirty of a process, MB."""
    total = 0
    for line in open(f'/proc/{pid}/smaps_rollup'):
        if line.startswith(('Private_Clean:', 'Private_Dirty:')):
            total += int(line.split()[1])
    return total / 1024


def reset_peak() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # VmHWM := VmRSS


def in_child(fn, *args):
    """fn(*args) in a forked process; returns its result (exceptions re-raised here)."""
    ctx = mp.get_context('fork')
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            child.send(('ok', fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the parent
            child.send(('error', f'{type(e).__name__}: {e}'))

    p = ctx.Process(target=target)
    p.start()
    status, value = parent.recv()
    p.join()
    if status != 'ok':
        raise RuntimeError(value)
    return value


# ----- the fake AudioSet ---------------------------------------------------------------------------

def make_files(root: Path, n_real: int) -> tuple[list[str], list[str]]:
    """`n_real` float32 files and float16 copies; their names relative to `root`."""
    rng = np.random.default_rng(0)
    alphabet = np.array(list(string.ascii_letters + string.digits + '-_'))
    f32, f16 = [], []
    for _ in range(n_real):
        ident = ''.join(rng.choice(alphabet, 11))
        x = (-6 + 3 * rng.standard_normal((1, 80, FRAMES))).astype(np.float32)
        for folder, dtype, names in (('audioset_lms', np.float32, f32), ('audioset_lms16', np.float16, f16)):
            name = f'{folder}/unbalanced_train_segments/{ident}_0.000_10.000.npy'
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / name, x.astype(dtype))
            names.append(name)
    return f32, f16


def write_list(path: Path, names: list[str], entries: int) -> Path:
    with open(path, 'w') as f:
        f.write('file_name\n')
        block = ''.join(n + '\n' for n in names)
        full, rest = divmod(entries, len(names))
        for _ in range(full):
            f.write(block)
        f.writelines(n + '\n' for n in names[:rest])
    return path


# ----- the measurements ------------------------------------------------------------------------------

def measure_list(csv: Path) -> dict:
    """csv_load_s and main_rss_mb: build the training set from the list (as `m2d pretrain` does)."""
    import gc

    from m2d.data.datasets import LMSDataset

    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    ds = LMSDataset(csv, crop_frames=608, norm_stats=(0.0, 1.0))
    load_s = time.perf_counter() - t0
    gc.collect()
    return {'csv_load_s': load_s, 'main_rss_mb': rss_mb() - before, 'entries_read': len(ds)}


class PathLookup:
    """For the memory test: a batch of keys -> the paths of their items; reports the worker's USS."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset.path(key[1] if isinstance(key, tuple) else key)


_START_USS: list[float] = []


def _record_start(worker_id: int) -> None:
    from m2d.train import seeding

    _START_USS.append(uss_mb())
    init = getattr(seeding, 'freeze_inherited_objects', None)  # the training loader's worker init, if any
    if init is not None:
        init(worker_id)


def _lookup_report(paths: list) -> tuple[int, float, float, int]:
    return os.getpid(), _START_USS[0], uss_mb(), len(paths)


def measure_worker_memory(csv: Path, workers: int, chunk: int = 10000) -> dict:
    """worker_private_mb: loader workers look up the paths of their share of one epoch."""
    from torch.utils.data import DataLoader

    from m2d.data.datasets import LMSDataset
    from m2d.train.distributed import ResumableSampler

    ds = LMSDataset(csv, crop_frames=608, norm_stats=(0.0, 1.0))
    lookup = PathLookup(ds)
    sampler = ResumableSampler(lookup, shuffle=True, seed=0)
    loader = DataLoader(lookup, batch_size=chunk, sampler=sampler, num_workers=workers, collate_fn=_lookup_report,
                        worker_init_fn=_record_start, multiprocessing_context='fork')
    per_worker: dict[int, list] = {}
    for pid, start, now, n in loader:
        w = per_worker.setdefault(pid, [start, now, 0, now])
        w[1] = now
        w[2] += n
    growth = {str(pid): round(end - start, 2) for pid, (start, end, _, _) in per_worker.items()}
    first = {str(pid): round(f - start, 2) for pid, (start, _, _, f) in per_worker.items()}
    rest = {str(pid): round(end - f, 2) for pid, (_, end, _, f) in per_worker.items()}
    looked_up = {str(pid): n for pid, (_, _, n, _) in per_worker.items()}
    return {'worker_private_mb': max(growth.values()), 'worker_private_mb_each': growth,
            'worker_private_mb_after_first_chunk': first, 'worker_private_mb_after_first_chunk_to_end': rest,
            'paths_looked_up_per_worker': looked_up, 'lookup_chunk': chunk}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def measure_throughput(csv: Path, workers: int, batch_size: int, samples: int, repeats: int) -> dict:
    """Samples/s of the training loader of `m2d pretrain` (one process, `workers` workers): wall-clock
    samples/s divided by the workers, and samples per CPU second of the workers (what one worker core
    gives, whatever else the machine runs)."""
    import torch

    from m2d.train import distributed, loop
    from m2d.train.config import TrainConfig

    torch.set_num_threads(1)
    opts = TrainConfig(csv_main=str(csv), batch_size=batch_size, num_workers=workers,
                       min_ds_size=samples * (repeats + 1) + 4 * workers * batch_size)  # one epoch covers it all
    ds = loop.build_dataset(opts, (-6.0, 3.0))
    _, sampler, loader = loop.make_loader(opts, distributed.DistEnv(), ds)
    wall, per_cpu = [], []
    it = iter(loader)
    for _ in range(2 * workers):  # workers started and busy
        next(it)
    pids = [w.pid for w in it._workers]  # noqa: SLF001 - the loader's worker processes
    for _ in range(repeats):
        n, t0, c0 = 0, time.perf_counter(), sum(cpu_s(p) for p in pids)
        while n < samples:
            n += next(it)['x'].shape[0]
        wall.append(n / (time.perf_counter() - t0) / workers)
        per_cpu.append(n / (sum(cpu_s(p) for p in pids) - c0))
    del it, loader
    return {'median': statistics.median(wall), 'runs': wall, 'per_cpu_s': statistics.median(per_cpu),
            'per_cpu_s_runs': per_cpu}


def write_source_list(n: int, folder: Path) -> tuple[Path, Path]:
    """An empty SRC folder and a `--files` list of `n` AudioSet-like source names (planning reads no
    audio, so the listed files need not exist)."""
    src, listed = folder / 'convert_src', folder / 'convert_files.txt'
    src.mkdir(exist_ok=True)
    with open(listed, 'w') as f:
        for i in range(n):
            f.write(f'unbalanced_train_segments/Y{i:011d}.wav\n')
    return src, listed


def plan_convert(src: Path, listed: Path, dest: Path) -> int:
    """`m2d convert SRC DEST --files LIST`'s planning step (adapt here when its planning function changes)."""
    from m2d.data.convert import plan_convert as plan

    planned = plan(src, dest, files=listed)
    count = len(planned.todo)
    planned.release()
    return count


def measure_convert_plan(n: int, dest: Path) -> dict:
    import m2d.data.convert  # noqa: F401  (imports are not planning)

    src, listed = write_source_list(n, dest.parent)
    reset_peak()
    before = rss_mb()
    t0 = time.perf_counter()
    count = plan_convert(src, listed, dest)
    return {'convert_plan_s': time.perf_counter() - t0, 'convert_plan_mb': rss_mb('VmHWM') - before,
            'convert_planned': count}


def stats_default(csv: Path) -> None:
    """`m2d stats CSV` with its default options (adapt here when the command changes)."""
    from m2d.cli import main

    devnull = open(os.devnull, 'w')
    sys.stdout = devnull
    rc = main(['stats', str(csv), '--no_progress'])
    if rc != 0:
        raise RuntimeError(f'm2d stats exited with {rc}')


def _timed_stats(csv: Path) -> float:
    t0 = time.perf_counter()
    stats_default(csv)
    return time.perf_counter() - t0


def measure_stats(csv: Path, timeout: float, probe_csv: Path, probe: int, entries: int) -> dict:
    ctx = mp.get_context('fork')
    with ctx.Pool(1) as pool:
        job = pool.apply_async(_timed_stats, (csv,))
        try:
            return {'stats_s': job.get(timeout)}
        except mp.TimeoutError:
            pool.terminate()
    t = in_child(_timed_stats, probe_csv)
    return {'stats_s': t * entries / probe, 'stats_extrapolated_from': probe, 'stats_probe_s': t,
            'stats_timeout_s': timeout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--entries', type=int, default=2_000_000)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--json', default=None)
    ap.add_argument('--real_files', type=int, default=64)
    ap.add_argument('--batch_size', type=int, default=128, help='loader batch for samples/s (default 128)')
    ap.add_argument('--samples', type=int, default=6000, help='samples per timed repeat')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--convert_entries', type=int, default=None,
                    help='plan this many files instead of --entries and scale linearly (marked in the JSON)')
    ap.add_argument('--stats_timeout', type=float, default=180.0)
    ap.add_argument('--stats_probe', type=int, default=20000)
    ap.add_argument('--skip', default='',
                    help='comma-separated parts to leave out: list,workers,throughput,convert,stats')
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    skip = set(filter(None, args.skip.split(',')))
    out: dict = {'entries': args.entries, 'workers': args.workers, 'real_files': args.real_files,
                 'cpu': next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                              if line.startswith('model name')), ''),
                 'loadavg_start': os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f32, f16 = make_files(root, args.real_files)
        csv = write_list(root / 'files.csv', f32, args.entries)
        print(f'{args.entries} rows naming {args.real_files} files: {csv}', flush=True)
        if 'list' not in skip:
            out.update(in_child(measure_list, csv))
            print(f'list: {out["csv_load_s"]:.2f} s, RSS +{out["main_rss_mb"]:.1f} MB', flush=True)
        if 'workers' not in skip:
            out.update(in_child(measure_worker_memory, csv, args.workers))
            print(f'workers: private +{out["worker_private_mb"]:.1f} MB after their paths', flush=True)
        if 'throughput' not in skip:
            for key, names in (('samples_per_s_per_worker', f32), ('samples_per_s_per_worker_float16', f16)):
                small = write_list(root / f'{key}.csv', names, len(names))
                r = in_child(measure_throughput, small, args.workers, args.batch_size, args.samples, args.repeats)
                cpu_key = key.replace('samples_per_s_per_worker', 'samples_per_worker_cpu_s')
                out[key], out[key + '_runs'] = r['median'], r['runs']
                out[cpu_key], out[cpu_key + '_runs'] = r['per_cpu_s'], r['per_cpu_s_runs']
                print(f'{key}: {r["median"]:.0f} ({", ".join(f"{x:.0f}" for x in r["runs"])}); per worker CPU second '
                      f'{r["per_cpu_s"]:.0f}', flush=True)
            out['throughput_batch_size'] = args.batch_size
            out['bytes_per_sample'] = {'float32': float(np.mean([os.path.getsize(root / n) for n in f32])),
                                       'float16': float(np.mean([os.path.getsize(root / n) for n in f16]))}
        if 'convert' not in skip:
            n = min(args.convert_entries or args.entries, args.entries)
            r = in_child(measure_convert_plan, n, root / 'convert_dest')
            if n < args.entries:
                r = {'convert_plan_s': r['convert_plan_s'] * args.entries / n,
                     'convert_plan_mb': r['convert_plan_mb'] * args.entries / n, 'convert_plan_extrapolated_from': n,
                     'convert_plan_measured': r}
            out.update(r)
            print(f'convert plan: {out["convert_plan_s"]:.2f} s, peak +{out["convert_plan_mb"]:.0f} MB', flush=True)
        if 'stats' not in skip:
            probe = write_list(root / 'probe.csv', f32, min(args.stats_probe, args.entries))
            out.update(measure_stats(csv, args.stats_timeout, probe, min(args.stats_probe, args.entries),
                                     args.entries))
            print(f'stats: {out["stats_s"]:.1f} s' + (' (extrapolated)' if 'stats_extrapolated_from' in out else ''),
                  flush=True)
    out['loadavg_end'] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + '\n')
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    main()
