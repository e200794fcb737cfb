"""Time and memory of planning `m2d convert` for many source files (no audio is decoded).

    python benchmarks/convert_plan.py --entries 2000000 --json results/convert_plan.json

Fakes N source files cheaply: a tree of `--dirs` folders of hard links to 40 copies of one short WAV
(hard links cost a directory entry each, no inode and no data), names shaped like AudioSet's
(``Y<11 chars>_<start>_<end>.wav``), plus a `--files` list of the same paths. Each case plans in a
fresh process (`m2d.data.convert.plan_convert`, or `m2d.jobs.plan` on code that predates it) into an
empty DEST and reports the planning time and memory: ``plan_peak_mb`` (the process's peak resident
memory while planning, above what it held before: kernel ``VmHWM`` after a reset) and
``plan_held_mb`` (what the finished plan holds). The tree is removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(key: str) -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
    return float('nan')


def fake_sources(root: Path, entries: int, dirs: int) -> Path:
    """`entries` hard links under root/src in `dirs` folders and root/list.txt naming them."""
    import numpy as np
    import soundfile as sf

    src = root / 'src'
    if (root / 'list.txt').exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    seeds = []
    for i in range(40):  # ext4 allows 65,000 links per inode
        p = root / f'seed{i}.wav'
        sf.write(str(p), np.zeros(1600, np.float32), 16000)
        seeds.append(p)
    alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
    with open(root / 'list.txt', 'w') as listing:
        for i in range(entries):
            d = src / f'part{i % dirs:03d}'
            if i < dirs:
                d.mkdir(parents=True)
            x, ident = i * 2654435761 % (1 << 62), []
            for _ in range(11):
                ident.append(alphabet[x % 64])
                x //= 64
            name = f'Y{"".join(ident)}_{(i % 300) * 10}.000_{(i % 300) * 10 + 10}.000.wav'
            os.link(seeds[i % len(seeds)], d / name)
            listing.write(f'{d.name}/{name}\n')
    return src


def child(args: argparse.Namespace) -> None:
    from m2d import jobs

    try:
        from m2d.data.convert import plan_convert
    except ImportError:
        plan_convert = None
    dest = Path(tempfile.mkdtemp(prefix='plan_dest_'))
    rss0 = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    t0 = time.perf_counter()
    if plan_convert is None:
        if args.files or args.shard:
            print(json.dumps({'unsupported': True}))
            return
        p = jobs.plan(args.src, dest, name='convert')
    else:
        p = plan_convert(args.src, dest, files=args.files, shard=args.shard)
    seconds = time.perf_counter() - t0
    out = {'plan_s': seconds, 'plan_peak_mb': _status('VmHWM') - rss0, 'plan_held_mb': _status('VmRSS') - rss0,
           'todo': len(p.todo), 'found': p.found}
    p.release()
    shutil.rmtree(dest)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--entries', type=int, default=2_000_000)
    p.add_argument('--dirs', type=int, default=200)
    p.add_argument('--workdir', default=None, help='where the fake tree goes (default: a new temp folder)')
    p.add_argument('--keep', action='store_true', help='keep the tree (reuse it with --workdir)')
    p.add_argument('--cases', nargs='+', default=['walk', 'files', 'walk_shard'],
                   choices=['walk', 'files', 'walk_shard', 'files_shard'])
    p.add_argument('--json', default=None)
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--src', help=argparse.SUPPRESS)
    p.add_argument('--files', default=None, help=argparse.SUPPRESS)
    p.add_argument('--shard', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    root = Path(args.workdir or tempfile.mkdtemp(prefix='convert_plan_'))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = fake_sources(root, args.entries, args.dirs)
    print(f'{args.entries} fake sources in {root} ({time.perf_counter() - t0:.0f} s)', flush=True)
    results = {'entries': args.entries, 'dirs': args.dirs, 'load_avg_before': os.getloadavg()}
    try:
        for case in args.cases:
            cmd = [sys.executable, __file__, '--child', '--src', str(src)]
            if case.startswith('files'):
                cmd += ['--files', str(root / 'list.txt')]
            if case.endswith('shard'):
                cmd += ['--shard', '1/8']
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            results[case] = json.loads(res.stdout.strip().splitlines()[-1])
            print(case, results[case], flush=True)
    finally:
        results['load_avg_after'] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(root)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
