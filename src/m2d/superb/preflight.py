"""The preflight of `m2d superb run`: what would stop s3prl, found before its first command.

Checked: the Python that runs s3prl (`--python`) imports s3prl (from the checkout given), the m2d
upstream, `m2d`, everything `run_downstream.py` imports and the task's downstream expert with its
imports (`catalyst` for KS, ...; see `probe.py`); the device exists for that Python's torch; the
data roots of the task's config (after the -o overrides) exist; the training writes the
`dev-best.ckpt` that the evaluate step reads. Each finding is one sentence naming the fix.

    check = preflight(get_task('KS'), s3prl_dir, 'python', 'm2d', overrides=[], env=os.environ)
    check.findings  # [] when ready; check.device: the device s3prl gets
"""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import SuperbError
from .tasks import Task, check_device

log = logging.getLogger(__name__)

PROBE = Path(__file__).with_name('probe.py')
PROBE_MARK = 'M2D-PROBE '
PROBE_TIMEOUT_S = 600

# The data each downstream config names (dotted key, what it must point to). Relative values are
# relative to the s3prl folder, where s3prl runs.
DATA_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    'speech_commands': (
        ('downstream_expert.datarc.speech_commands_root', 'the Speech Commands v0.01 training folder'),
        ('downstream_expert.datarc.speech_commands_test_root', 'the Speech Commands v0.01 test set folder')),
    'fluent_commands': (
        ('downstream_expert.datarc.file_path', 'the fluent_speech_commands_dataset folder'),),
    'emotion': (
        ('downstream_expert.datarc.root', 'the IEMOCAP_full_release folder'),
        ('downstream_expert.datarc.meta_data', "s3prl's IEMOCAP meta data (downstream/emotion/meta_data)")),
    'voxceleb1': (
        ('downstream_expert.datarc.file_path', 'the VoxCeleb1 folder (holding dev/wav and test/wav)'),
        ('downstream_expert.datarc.meta_data', 'the VoxCeleb1 split list (veri_test_class.txt)')),
    'ctc': (
        ('downstream_expert.corpus.path', 'the LibriSpeech folder (train-clean-100, dev-clean, test-clean)'),),
}

# pip names of modules s3prl's SUPERB tasks import, where they differ or are worth naming.
PIP_NAMES = {'yaml': 'pyyaml', 'sklearn': 'scikit-learn', 'PIL': 'pillow', 'tensorboardX': 'tensorboardX',
             'huggingface_hub': 'huggingface_hub', 'catalyst': 'catalyst', 'editdistance': 'editdistance',
             'librosa': 'librosa', 'pandas': 'pandas', 'omegaconf': 'omegaconf'}


@dataclass
class Preflight:
    """The findings (empty: ready), the device s3prl gets, and what the probe saw (None: not run)."""

    findings: list[str] = field(default_factory=list)
    device: str = 'cpu'
    probe: dict | None = None
    pip: list[str] = field(default_factory=list)  # pip names of the missing modules

    @property
    def pip_line(self) -> str:
        """One pip command for all missing modules ('' when fewer than two)."""
        python = (self.probe or {}).get('executable', 'python')
        return f'all missing modules at once: {python} -m pip install {" ".join(self.pip)}' if len(self.pip) > 1 else ''

    def message(self, task: Task) -> str:
        """All findings in one line, for the error that stops the run."""
        items = ' '.join(f'({i}) {f}' for i, f in enumerate(self.findings, 1))
        return (f'{task.name}: not ready to run s3prl ({len(self.findings)} to fix): {items}'
                + (f'; {self.pip_line}' if self.pip_line else ''))


def config_value(config, key: str):
    """The value at a dotted key of a nested dict, or None."""
    for part in key.split('.'):
        if not isinstance(config, Mapping) or part not in config:
            return None
        config = config[part]
    return config


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `config.A.B=VALUE` options to a config dict in place, as s3prl does (values read as Python
    literals where they are, else kept as strings); `args.*` options are left to s3prl."""
    for option in overrides:
        key, text = (s.strip() for s in option.split('=', 1))
        first, *path = key.split('.')
        if first != 'config':
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = config
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return config


def data_findings(task: Task, s3prl_dir: Path, overrides: list[str]) -> list[str]:
    """Missing data roots of the task's config, and a training that would write no dev-best.ckpt."""
    from .stats import read_config

    try:
        config = apply_overrides(read_config(s3prl_dir, task) or {}, overrides)
    except SuperbError as e:
        return [str(e)]
    findings = []
    for key, what in DATA_KEYS.get(task.downstream, ()):
        value = config_value(config, key)
        fix = f'set it to {what} in {task.config_path} or with -o "config.{key}=PATH"'
        if value in (None, ''):
            findings.append(f'{key} is not set: {fix}')
        elif not (s3prl_dir / Path(str(value)).expanduser()).exists():
            findings.append(f'{key} = {value} does not exist: {fix}')
    runner = config_value(config, 'runner') or {}
    total, every = runner.get('total_steps'), runner.get('eval_step')
    if isinstance(total, int) and isinstance(every, int) and total < every:
        findings.append(f'config.runner.total_steps={total} is below config.runner.eval_step={every}: s3prl writes '
                        'dev-best.ckpt (which the evaluate step reads) only at a dev evaluation; add '
                        f'-o "config.runner.eval_step={total}"')
    elif 'dev' not in (runner.get('eval_dataloaders') or ['dev']):
        findings.append('config.runner.eval_dataloaders has no dev: s3prl writes dev-best.ckpt (which the evaluate '
                        "step reads) only at a dev evaluation; keep 'dev' in it")
    return findings


def run_probe(python: str, s3prl_dir: Path, downstream: str, upstream: str,
              env: Mapping[str, str]) -> tuple[dict | None, str]:
    """Run `probe.py` with `python` in the s3prl folder -> (its report, '') or (None, why it failed)."""
    argv = [python, str(PROBE), str(s3prl_dir), downstream, upstream]
    try:
        done = subprocess.run(argv, cwd=s3prl_dir if s3prl_dir.is_dir() else None, env=dict(env),
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except OSError as e:
        return None, f'could not start it ({e.strerror or e})'
    except subprocess.TimeoutExpired:
        return None, f'its imports took over {PROBE_TIMEOUT_S} s'
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):]), ''
    tail = [s for s in done.stderr.strip().splitlines() if s.strip()]
    return None, f'it failed (exit status {done.returncode}: {tail[-1] if tail else "no output"})'


def import_findings(info: dict, python: str, s3prl_dir: Path, upstream: str) -> tuple[list[str], list[str]]:
    """Findings from the probe's report (missing modules with what to install, a foreign s3prl, no upstream)
    and the pip names of the missing modules."""
    root = s3prl_dir.parent
    findings, to_pip = [], []
    for name, needed_by in info.get('missing', {}).items():
        top = name.split('.')[0]
        if top == 's3prl':
            findings.append(f'{python} cannot import {name}: install the checkout there '
                            f'({python} -m pip install -e {root})')
        elif top == 'm2d':
            findings.append(f'{python} cannot import m2d (the m2d upstream runs in s3prl\'s process): '
                            f'install this package there ({python} -m pip install m2d, or -e YOUR_M2D_CHECKOUT)')
        elif name != top:
            findings.append(f'{name} (imported by {needed_by}) is not in the {top} installed in {python}: '
                            f'install a version of {top} that has it')
        else:
            to_pip.append(PIP_NAMES.get(name, name))
            findings.append(f'{python} cannot import {name} (imported by {needed_by}): '
                            f'{python} -m pip install {to_pip[-1]}')
    for error in info.get('errors', []):
        m = re.search(r"^(\S+): ImportError: cannot import name '(\w+)' from '([\w.]+)'", error)
        if m and m[3].split('.')[0] not in info.get('missing', {}):
            top = m[3].split('.')[0]
            findings.append(f'{m[1]} imports {m[2]} from {m[3]}, which the {top} installed in {python} no longer '
                            f'has: install an older {PIP_NAMES.get(top, top)} there')
        else:
            after = (' (perhaps only because of a missing module above)'
                     if any(name.split('.')[0] in error for name in info.get('missing', {})) else '')
            findings.append(f'{python}: importing {error}{after}')
    where = info.get('s3prl')
    if where and Path(where).resolve() != s3prl_dir.resolve():
        findings.append(f'{python} imports s3prl from {where}, not from {s3prl_dir}: install the checkout there '
                        f'({python} -m pip install -e {root})')
    elif where and info.get('upstream') is False:
        findings.append(f's3prl.hub has no upstream {upstream!r}: m2d superb install {root}')
    return findings, to_pip


def resolve_device(device: str | None, info: dict | None, python: str) -> tuple[str, list[str]]:
    """--device as given (checked against what the probe saw) or cuda when available, else cpu."""
    if info is not None:
        cuda, count = info.get('cuda', False), info.get('cuda_count', 0)
        torch = f'torch {info["torch"]}' if info.get('torch') else 'no torch'
    else:
        import torch as local

        cuda, count, torch = local.cuda.is_available(), local.cuda.device_count(), f'torch {local.__version__}'
    if device is None:
        chosen = 'cuda' if cuda else 'cpu'
        log.info('s3prl device: %s (%s; choose with --device cpu|cuda[:N])', chosen,
                 'CUDA is available' if cuda else f'no CUDA device for {torch}')
        return chosen, []
    device = check_device(device)
    if device.startswith('cuda') and not cuda:
        return device, [f'--device {device}: {python} ({torch}) sees no CUDA device; use --device cpu']
    index = int(device.split(':')[1]) if ':' in device else 0
    if device.startswith('cuda') and index >= count:
        return device, [f'--device {device}: {python} sees {count} CUDA device(s) (cuda:0..cuda:{count - 1}); '
                        'CUDA_VISIBLE_DEVICES (--gpu) renumbers them']
    return device, []


def preflight(task: Task, s3prl_dir: Path, python: str, upstream: str, overrides: list[str],
              env: Mapping[str, str], device: str | None = None) -> Preflight:
    """Everything the module docstring lists, in one pass; nothing is started in s3prl."""
    findings = []
    if not (s3prl_dir / 'run_downstream.py').is_file():
        findings.append(f'{s3prl_dir}: no run_downstream.py (give the root of an s3prl checkout)')
    info, why = run_probe(python, s3prl_dir, task.downstream, upstream, env)
    pip = []
    if info is None:
        findings.append(f'--python {python}: {why}')
    else:
        info['executable'] = python
        missing, pip = import_findings(info, python, s3prl_dir, upstream)
        findings += missing
    chosen, device_findings = resolve_device(device, info, python)
    findings += device_findings + data_findings(task, s3prl_dir, overrides)
    return Preflight(findings, chosen, info, pip)
