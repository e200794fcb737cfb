"""Preparation speed of `m2d datasets` on mocks of a dataset's published layout (files/s).

The mock is ESC-50's layout (meta/esc50.csv, audio/*.wav) filled with FSDD recordings (8 kHz,
~0.4 s; ../shared/data/fsdd/recordings), given as the folder, its zip and its tar.gz. Each run
prepares into an empty DEST at 16 kHz with `--workers` processes and is timed from the call to its
return (worker start, tar unpacking, CSV and PREPARED.json included); the median of the runs is
reported per source kind.

    python benchmarks/datasets.py [--files 300 --workers 2 --runs 3 --json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import statistics
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

FSDD = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'fsdd' / 'recordings'


def make_mock(root: Path, n: int) -> dict[str, Path]:
    base = root / 'ESC-50-master'
    (base / 'audio').mkdir(parents=True)
    rows = []
    for i, src in enumerate(sorted(FSDD.glob('*.wav'))[:n]):
        name = f'{i % 5 + 1}-{i}-A-{src.name[0]}.wav'
        shutil.copyfile(src, base / 'audio' / name)
        rows.append((name, i % 5 + 1, src.name[0], f'digit{src.name[0]}', False, i, 'A'))
    (base / 'meta').mkdir()
    with open(base / 'meta/esc50.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take'])
        w.writerows(rows)
    with zipfile.ZipFile(root / 'master.zip', 'w') as z:
        for p in sorted(base.rglob('*')):
            z.write(p, p.relative_to(root).as_posix())
    with tarfile.open(root / 'master.tar.gz', 'w:gz') as t:
        t.add(base, arcname='ESC-50-master')
    return {'folder': base, 'zip': root / 'master.zip', 'tar.gz': root / 'master.tar.gz'}


def main() -> None:
    from m2d.data.tasks.prepare import prepare_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=300)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--json', default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_mock(Path(tmp), args.files)
        for kind, src in sources.items():
            rates = []
            for k in range(args.runs):
                dest = Path(tmp) / f'D_{kind}_{k}'
                t0 = time.perf_counter()
                r = prepare_task('esc50', dest, [str(src)], workers=args.workers, progress=False)
                rates.append(r.rows / (time.perf_counter() - t0))
                shutil.rmtree(dest)
            results[kind] = {'files': args.files, 'workers': args.workers, 'median_files_per_s': statistics.median(rates),
                             'runs_files_per_s': rates}
            print(f'{kind:7s} {args.files} files, {args.workers} workers: median {statistics.median(rates):.0f} files/s '
                  f'(runs: {", ".join(f"{x:.0f}" for x in rates)})')
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
