"""What computing the embeddings once per clip saves on a fold task (US8K: 8,732 clips, 10 folds).

    python benchmarks/evar_folds.py --clips_per_s 3.46            # CPU figure of benchmarks/embed.py
    python benchmarks/evar_folds.py --clips_per_s 3.46 --json out.json

EVAR's lineareval.py re-encodes the whole task for every fold (its fold loop builds the data
loaders and converts every split to embeddings again); `m2d linear-eval` encodes each clip once and
probes every fold on the same embeddings. The probe part is the same in both. This script measures
the probe (EVAR's classifier on US8K-sized random embeddings, 3840-d, 10 classes, the train part of
one fold: 9/10 of the clips; median seconds per epoch over `--epochs` epochs after one warm-up) and
takes the embedding throughput from `--clips_per_s` (measure it with benchmarks/embed.py on the
same machine), then computes both totals for `--folds` folds with `--probe_epochs` epochs per fold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from m2d.evaluate.probe import Split, fit_linear
from m2d.fileio import atomic_path


def probe_epoch_seconds(n: int, dim: int, classes: int, epochs: int, device: str) -> float:
    """Median seconds per probe epoch (EVAR's classifier, batch min(200, N), 10 % carve) on random data."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    y = np.arange(n) % classes
    test = Split(x[:200], y[:200])
    times = []
    for _ in range(3):  # each fit: `epochs` epochs (patience larger, no early stop)
        t0 = time.perf_counter()
        fit = fit_linear(Split(x, y), None, test, multilabel=False, n_classes=classes, epochs=epochs,
                         patience=epochs + 1, device=device)
        times.append((time.perf_counter() - t0) / fit.epochs_run)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--clips_per_s', type=float, required=True, help='embedding throughput (benchmarks/embed.py)')
    p.add_argument('--clips', type=int, default=8732, help='clips of the task (default 8732, US8K)')
    p.add_argument('--folds', type=int, default=10)
    p.add_argument('--dim', type=int, default=3840, help='embedding size (default 3840, ViT-Base)')
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--epochs', type=int, default=5, help='measured probe epochs per run (default 5)')
    p.add_argument('--probe_epochs', type=int, default=200, help='epochs per fold in the totals (default 200, '
                   'the most EVAR runs; early stopping makes it fewer)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', default=None)
    args = p.parse_args()

    n_train = args.clips * (args.folds - 1) // args.folds
    epoch_s = probe_epoch_seconds(n_train, args.dim, args.classes, args.epochs, args.device)
    embed_s = args.clips / args.clips_per_s
    probe_s = args.folds * args.probe_epochs * epoch_s
    evar_s, m2d_s = args.folds * embed_s + probe_s, embed_s + probe_s
    out = {'clips': args.clips, 'folds': args.folds, 'clips_per_s (given)': args.clips_per_s,
           'probe_epoch_s (measured, median)': epoch_s, 'embed_once_s': embed_s, 'probe_all_folds_s': probe_s,
           'evar_total_s': evar_s, 'm2d_total_s': m2d_s, 'speedup': evar_s / m2d_s,
           'embedding_speedup': float(args.folds), 'device': args.device, 'threads': torch.get_num_threads(),
           'load_average': os.getloadavg()}
    print(f'embedding {args.clips} clips once: {embed_s / 3600:.2f} h at {args.clips_per_s:g} clips/s '
          f'(EVAR: {args.folds}x = {args.folds * embed_s / 3600:.2f} h)')
    print(f'probe: {epoch_s:.3f} s/epoch (median) -> {probe_s / 60:.1f} min for {args.folds} folds x '
          f'{args.probe_epochs} epochs (the same in both)')
    print(f'total: EVAR {evar_s / 3600:.2f} h, m2d {m2d_s / 3600:.2f} h -> {evar_s / m2d_s:.1f}x faster '
          f'(embedding stage {args.folds}x)')
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(out, indent=1) + '\n')


if __name__ == '__main__':
    main()
