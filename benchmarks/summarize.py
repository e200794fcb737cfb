"""Medians over repeated benchmark runs: one table of before/after per benchmark and thread count.

    python benchmarks/summarize.py benchmarks/results/issue13/round2/alternated

Reads ``{pretrain,encode}_{label}_t{threads}_r{k}.json`` (what `pretrain.py --json` and
`encode.py --json` write) and prints, per benchmark, thread count and label, the median over the
runs of the throughput and % of peak per precision, of the bf16/fp32 speed-up and of its share of
the peak ratio, with the range of the bf16 throughput.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

NAME = re.compile(r'(?P<bench>pretrain|encode)_(?P<label>[a-z0-9]+)_t(?P<threads>\d+)_r(?P<run>\d+)\.json$')


def rows_of(report: dict, bench: str) -> dict[str, tuple[float, float]]:
    """precision -> (throughput, % of peak) of one report."""
    if bench == 'pretrain':
        return {p: (r['samples_per_s'], r['percent_of_peak']) for p, r in report['results'].items()}
    return {r['precision']: (r['clips_per_s'], r['pct_of_peak']) for r in report['results']}


def ratios_of(report: dict) -> tuple[float, float]:
    """(bf16/fp32 step or encode speed-up, the same as a share of the matmul peak ratio)."""
    r = report['bf16_vs_fp32']
    return r.get('step_speedup', r.get('speedup')), r['speedup_over_peak_ratio']


def summarize(folder: Path) -> str:
    runs: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob('*.json')):
        m = NAME.match(path.name)
        if m:
            runs[m['bench'], int(m['threads']), m['label']].append(json.loads(path.read_text()))
    if not runs:
        raise SystemExit(f'{folder}: no BENCH_LABEL_tTHREADS_rK.json files')
    med = statistics.median
    lines = ['| benchmark | threads | run | runs | fp32 per s (% of peak) | bf16 per s (% of peak) | bf16 range | '
             'bf16/fp32 | of the peak ratio |', '|---|---|---|---|---:|---:|---:|---:|---:|']
    for (bench, threads, label), reports in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != 'before')):
        per = [rows_of(r, bench) for r in reports]
        cells = []
        for prec in (('fp32', 'float32'), ('bf16', 'bfloat16')):
            vals = [next(row[p] for p in prec if p in row) for row in per]
            cells.append(f'{med(v[0] for v in vals):.2f} ({med(v[1] for v in vals):.1f} %)')
        bf16 = [next(row[p][0] for p in ('bf16', 'bfloat16') if p in row) for row in per]
        speed, share = zip(*(ratios_of(r) for r in reports))
        lines.append(f'| {bench} | {threads} | {label} | {len(reports)} | {cells[0]} | {cells[1]} | '
                     f'{min(bf16):.2f}-{max(bf16):.2f} | {med(speed):.2f}x | {100 * med(share):.0f} % |')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    args = p.parse_args(argv)
    print(summarize(args.folder))
    return 0


if __name__ == '__main__':
    sys.exit(main())
