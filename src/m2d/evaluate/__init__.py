"""Downstream evaluation of M2D representations on labeled audio (EVAR's protocol, built in).

    >>> from m2d.evaluate import load_task, linear_eval
    >>> task = load_task('fsdd-digits', data_dir='data/fsdd')
    >>> report = linear_eval('m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth', task)
    >>> report['model']['mean'], report['random']['mean'], report['logmel']['mean']

Modules: `evar` (EVAR's task definitions, the seed table), `tasks` (CSV/folder/built-in/EVAR tasks,
folds, clip loading), `embed` (clip embeddings, cached), `probe` (EVAR's linear classifier),
`linear` (`linear_eval`: load -> statistics -> embed -> probe per fold -> baselines -> report),
`baselines`, `report` (report.json/report.md), `summary` (the table over tasks), `suite` (several
tasks, ``--suite evar``). Fine-tuning lives in `finetune` and `predict`. M2D-CLAP: `captions` (EVAR's
class -> caption wording), `clap_embed` (CLAP audio/text embeddings, cosine), `zeroshot`
(`zeroshot_eval`, EVAR's zero-shot protocol), `retrieval` (recall@K both ways on a caption CSV),
`zeroshot_report` (their report.md).
"""

from __future__ import annotations

from .tasks import BUILTIN_TASKS, Clip, Task, TaskError, load_clip, load_task

__all__ = ['BUILTIN_TASKS', 'Clip', 'Task', 'TaskError', 'load_clip', 'load_task', 'linear_eval', 'run_suite',
           'zeroshot_eval']


def __getattr__(name: str):
    # The linear evaluation pulls in torch training code; import it only when asked for.
    if name == 'linear_eval':
        from .linear import linear_eval
        return linear_eval
    if name == 'run_suite':
        from .suite import run_suite
        return run_suite
    if name == 'zeroshot_eval':
        from .zeroshot import zeroshot_eval
        return zeroshot_eval
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
