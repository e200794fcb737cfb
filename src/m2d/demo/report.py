"""The demo report: ``report.json`` (numbers, settings, timings, commands) and ``report.md`` with figures."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_path

log = logging.getLogger(__name__)

SHOWCASE = ('vowel_i', 'vowel_a')  # synthesized classes whose mask figure reads well
ROWS = (('model', 'M2D, pre-trained here'), ('random', 'random encoder, same shape'), ('logmel', 'raw log-mel (mean, std)'))


def _pct(entry: dict | None) -> str:
    return '-' if not entry else f'{100 * entry["mean"]:.1f} ± {100 * entry["std"]:.1f}'


def _rel(path: str | Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _figures(out: Path, lms_dir: Path, run_dir: Path, mask_ratio: float, embed_dim: int) -> tuple[dict[str, str], dict]:
    """Loss, effective-rank and mask figures in `out` (none without matplotlib); also the curves' numbers."""
    from .figures import loss_figure, mask_figure, rank_figure, read_log

    train, epochs = read_log(run_dir / 'log.jsonl')
    curves = {'loss': [[r['step'], r['loss']] for r in train],
              'effective_rank': [[r['epoch'], r['effective_rank']] for r in epochs if 'effective_rank' in r]}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning('matplotlib is not installed: the report has no figures (pip install "m2d[demo]")')
        return {}, curves
    figs = {'loss': str(loss_figure(train, out / 'training_loss.png')),
            'effective_rank': str(rank_figure(epochs, out / 'effective_rank.png', max_rank=embed_dim))}
    npys = sorted(lms_dir.rglob('*.npy'))
    if npys:  # the clearest of a few showcase clips (widest log-mel range: loud over little noise)
        candidates = [p for p in npys if p.parent.name in SHOWCASE][:24] or [npys[len(npys) // 2]]
        pick = max(candidates, key=lambda p: float(np.ptp(np.load(p))))
        figs['mask'] = str(mask_figure(np.load(pick)[0], (16, 16), mask_ratio, out / 'masking.png',
                                       title=pick.relative_to(lms_dir).as_posix()))
    return figs, curves


def write_report(out: Path, ev: dict[str, Any], info: dict[str, Any], timings: dict[str, float], verdict: str,
                 clear: bool, lms_dir: Path, run_dir: Path, task) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.md``; returns their paths."""
    cfg = info['config']
    embed_dim = ev.get('settings', {}).get('geometry', {}).get('embed_dim', 192)
    figs, curves = _figures(out, lms_dir, run_dir, cfg['mask_ratio'], embed_dim)
    eval_dir = Path(info['linear_eval_dir'])
    eval_figs = {k: v for k, v in (ev.get('figures') or {}).items()}
    data = {
        'verdict': verdict,
        'clear_win': clear,
        'metric': ev['metric'],
        'results': {k: {kk: ev[k][kk] for kk in ('mean', 'std', 'per_seed')} | {'dim': ev[k].get('dim')}
                    for k, _ in ROWS if k in ev},
        'margin_vs_random': ev['model']['mean'] - ev['random']['mean'],
        'class_accuracy': ev.get('class_accuracy'),
        'timings_s': timings,
        'curves': curves,
        'figures': {**figs, **{f'linear_eval_{k}': str(eval_dir / v) if not Path(v).is_absolute() else v
                               for k, v in eval_figs.items()}},
        **info,
    }
    js = out / 'report.json'
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + '\n', encoding='utf-8')

    md = [f'# M2D demo report', '', f'**{verdict}**', '']
    md += [f'## Result: linear evaluation on {ev["task"]["name"]}', '',
           f'| representation | dim | {ev["metric"]} (%), mean ± std | per seed |', '|---|---|---|---|']
    for key, name in ROWS:
        if key in ev:
            e = ev[key]
            md.append(f'| {name} | {e.get("dim", "")} | {_pct(e)} | '
                      + ', '.join(f'{100 * v:.1f}' for v in e['per_seed']) + ' |')
    counts = ev['task']['clips']
    md += ['', f'{len(ev["task"]["classes"])} classes; the linear probe (logistic regression, EVAR protocol) trains on '
           f'{counts["train"]} clips, picks its epoch on {counts["valid"]} and is scored on {counts["test"]} held-out '
           f'test clips. Pre-training used the audio of the {info["n_pretrain_clips"]} train clips only, without '
           'labels. The random encoder has the pre-trained one\'s shape and normalization, MAE-initialized, never '
           'trained; the log-mel baseline is the mean and std of each mel bin over time. The probe\'s learning rate is '
           f'{cfg["probe_lr"]:g}: the protocol\'s default 3e-5 under-trains a probe on a few thousand clips within its '
           '200 epochs, and then ranks how fast each feature set trains rather than what it holds.', '']
    if ev.get('class_accuracy'):
        md += ['Per-class accuracy of the pre-trained encoder (%): ' + ', '.join(
            f'{c} {100 * v:.0f}' for c, v in ev['class_accuracy'].items() if v is not None), '']

    md += ['## Pre-training', '']
    loss, rank = curves['loss'], curves['effective_rank']
    if loss:
        md.append(f'Loss {loss[0][1]:.3f} at step {loss[0][0]} -> {loss[-1][1]:.3f} at step {loss[-1][0]}'
                  + (f'; effective rank of the patch features {rank[0][1]:.1f} (epoch {rank[0][0]}) -> {rank[-1][1]:.1f} '
                     f'(epoch {rank[-1][0]}) of at most {embed_dim}.' if rank else '.'))
        md.append('')
    for key, caption in (('loss', 'training loss'), ('effective_rank', 'effective rank')):
        if key in figs:
            md += [f'![{caption}]({_rel(figs[key], out)})', '']
    md += [f'Checkpoint: `{info["checkpoint"]}` (the official container: `m2d encode`, `m2d linear-eval`, '
           '`RuntimeM2D` read it).', '']
    if 'mask' in figs:
        md += ['## What M2D trains on', '',
               f'One input with a mask drawn as in pre-training ({cfg["mask_ratio"]:.0%} of the patches masked at random). '
               'The online encoder sees only the visible patches and predicts, through its predictor, the '
               'representation that the target encoder (an exponential moving average of the online one) computes '
               'from the masked patches alone.', '', f'![mask]({_rel(figs["mask"], out)})', '']
    if eval_figs:
        md += ['## Embeddings', '']
        for k, v in eval_figs.items():
            p = Path(v) if Path(v).is_absolute() else eval_dir / v
            md += [f'![{k}]({_rel(p, out)})', '']
        md += [f'The full evaluation report: [{_rel(eval_dir / "report.md", out)}]({_rel(eval_dir / "report.md", out)}).', '']

    cpu = info.get('cpu_s', {})
    md += ['## What ran', '', '| stage | wall-clock s | CPU s (all threads) |', '|---|---|---|']
    md += [f'| {k} | {v:.1f} | {cpu[k]:.1f} |' if k in cpu else f'| {k} | {v:.1f} | |' for k, v in timings.items()]
    md += ['', f'Device {info["device"]}, bf16 {"on" if info["bf16"] else "off"}, {info["threads"]} torch threads. '
           f'Data: {info["task"]}.', '', 'The commands of each stage (run them on your own data):', '', '```sh']
    if 'data_dir' in info['source'] and not cfg.get('data_dir'):
        md.append(f'# data: synthesized by m2d.demo.synth.make_collection into {info["source"]["data_dir"]} '
                  '(one sub-folder per class)')
    md += [f'# {c["stage"]}\n{c["command"]}' for c in info['commands']]
    md += ['```', '']
    path = out / 'report.md'
    with atomic_path(path) as tmp:
        tmp.write_text('\n'.join(md), encoding='utf-8')
    return path, js
