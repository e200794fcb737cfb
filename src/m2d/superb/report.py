"""Read the results s3prl wrote into experiment folders and summarize them (`m2d superb report`).

What s3prl writes (0.4.x): the KS, IC, SID and ER experts append ``test at step N: ACC`` to
``EXPDIR/log.log``; the evaluate step (``-m evaluate -e EXPDIR/dev-best.ckpt``) writes its line with
step 0, and during training ``New best on dev at step S`` marks the step of dev-best.ckpt. The PR
(ctc) expert writes no score file: it prints ``test per: X`` and writes ``test-hyp.ark`` and
``test-ref.ark`` (``NAME PHONES...`` per line), from which the phone error rate is recomputed as
s3prl does (word-level edit distance over space-separated phones / reference length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import SuperbError
from .tasks import TASKS, Task, get_task

NAME_RE = re.compile(r'-(?P<task>PR|KS|IC|SID|ER)-lr[\d.eE+-]+?-s\d+(?:-(?P<fold>fold\d+))?$')
TEST_RE = re.compile(r'^test at step (\d+): ([-+0-9.eE]+)\s*$')
BEST_RE = re.compile(r'^New best on dev at step (\d+): ')


@dataclass
class Result:
    """One experiment's test score: `value` in percent (accuracy, or phone error rate for PR)."""

    expdir: Path
    task: Task
    value: float
    source: str  # where the number came from
    fold: str | None = None

    @property
    def metric(self) -> str:
        return 'PER (%)' if self.task.metric == 'per' else 'acc (%)'


def _task_of(expdir: Path) -> tuple[Task, str | None]:
    m = NAME_RE.search(expdir.name)
    if m:
        return TASKS[m['task']], m['fold']
    for args in sorted(expdir.glob('args_*.yaml')):  # s3prl saves its arguments there
        d = re.search(r'^downstream:\s*(\S+)', args.read_text(), re.M)
        if d:
            fold = re.search(r'test_fold\W+(fold\d+)', ''.join(p.read_text() for p in expdir.glob('config_*.yaml')))
            return get_task(d.group(1)), fold.group(1) if fold else None
    raise SuperbError(f'{expdir}: cannot tell the task (name it like m2d superb run does, or keep args_*.yaml)')


def _edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def _read_ark(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().split('\n'):
        if line:
            name, _, text = line.partition(' ')
            out[name] = text
    return out


def phone_error_rate(hyp_ark: str | Path, ref_ark: str | Path) -> float:
    """s3prl's `per`: sum of edit distances over space-separated phones / total reference phones."""
    hyp, ref = _read_ark(Path(hyp_ark)), _read_ark(Path(ref_ark))
    if not ref:
        raise SuperbError(f'{ref_ark}: empty')
    errors = total = 0
    for name, r in ref.items():
        if name not in hyp:
            raise SuperbError(f'{hyp_ark}: no hypothesis for {name}')
        t = r.split(' ')
        errors += _edit_distance(hyp[name].split(' '), t)
        total += len(t)
    return errors / total


def read_result(expdir: str | Path) -> Result:
    """The test score of one s3prl experiment folder."""
    expdir = Path(expdir)
    if not expdir.is_dir():
        raise SuperbError(f'{expdir}: no such experiment folder')
    task, fold = _task_of(expdir)
    if task.metric == 'per':
        hyp, ref = expdir / 'test-hyp.ark', expdir / 'test-ref.ark'
        if not (hyp.is_file() and ref.is_file()):
            raise SuperbError(f'{expdir}: no test-hyp.ark/test-ref.ark yet; run the evaluate step '
                              f'(python run_downstream.py -m evaluate -n {expdir.name} -d ctc '
                              f'-e {expdir}/dev-best.ckpt)')
        return Result(expdir, task, 100 * phone_error_rate(hyp, ref), 'test-hyp.ark', fold)
    log = expdir / 'log.log'
    lines = log.read_text().splitlines() if log.is_file() else []
    tests = [(int(m[1]), float(m[2])) for m in map(TEST_RE.match, lines) if m]
    evaluated = [v for step, v in tests if step == 0]
    if evaluated:
        return Result(expdir, task, 100 * evaluated[-1], 'log.log (evaluate step)', fold)
    best = [int(m[1]) for m in map(BEST_RE.match, lines) if m]
    at_best = [v for step, v in tests if best and step == best[-1]]
    if at_best:
        return Result(expdir, task, 100 * at_best[-1], f'log.log (test at the best dev step {best[-1]})', fold)
    raise SuperbError(f'{log}: no test result yet; run the evaluate step '
                      f'(python run_downstream.py -m evaluate -e {expdir}/dev-best.ckpt)')


def model_of(result: Result) -> str:
    """The weight file an experiment evaluated: its name without the -TASK-lrLR-sSEED[-foldN] suffix."""
    m = NAME_RE.search(result.expdir.name)
    return result.expdir.name[:m.start()] if m else result.expdir.name


def summarize(results: list[Result]) -> tuple[list[tuple[str, str, str, str]], dict[str, dict[str, float]]]:
    """Rows (task, metric, value, experiment), with the mean where a model has several runs of a task
    (ER's folds, seeds), and {model: {task: value}} with the tasks in table order."""
    rows, table = [], {}
    for model in dict.fromkeys(model_of(r) for r in results):
        for task in TASKS.values():
            mine = [r for r in results if r.task is task and model_of(r) == model]
            for r in sorted(mine, key=lambda r: (r.fold or '', r.expdir.name)):
                rows.append((task.name, r.metric, f'{r.value:.2f}', r.expdir.name))
            if not mine:
                continue
            mean = sum(r.value for r in mine) / len(mine)
            if len(mine) > 1:
                folds = sorted({r.fold for r in mine if r.fold})
                what = f'mean of {len(mine)} ({", ".join(folds)})' if folds else f'mean of {len(mine)}'
                rows.append((task.name, mine[0].metric, f'{mean:.2f}', what))
            table.setdefault(model, {})[task.name] = mean
    return rows, table


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_table(results: list[Result]) -> str:
    """The per-experiment table, then one line per model in the paper's column order (PR KS IC SID ER)."""
    rows, table = summarize(results)
    lines = _columns([('task', 'metric', 'value', 'experiment'), *rows])
    head = ('model', *(f'{t} ({"PER" if TASKS[t].metric == "per" else "acc"})' for t in TASKS))
    models = [(m, *(f'{v[t]:.2f}' if t in v else '-' for t in TASKS)) for m, v in table.items()]
    return '\n'.join(lines + [''] + _columns([head, *models]))
