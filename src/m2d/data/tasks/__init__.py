"""EVAR's downstream tasks, each prepared from its official distribution by `m2d datasets TASK DEST`.

One small module per dataset declares a `TaskSpec` (`spec.py`): where the data comes from, the
layout `--source` must have, and EVAR's metadata rule (make_metadata.py and friends) as a function
of the source's files. `prepare.py` is the machinery they share; `source.py` reads folders and
archives; `lists/` holds the split lists EVAR ships or downloads at run time.
"""

from __future__ import annotations

import importlib

from .spec import DatasetError, TaskSpec

# task -> module (spcv1 and spcv2 share one)
_MODULES = {'esc50': 'esc50', 'us8k': 'us8k', 'spcv1': 'spc', 'spcv2': 'spc', 'vc1': 'vc1',
            'voxforge': 'voxforge', 'cremad': 'cremad', 'gtzan': 'gtzan', 'nsynth': 'nsynth', 'surge': 'surge',
            'fsd50k': 'fsd50k', 'as20k': 'as20k'}
TASKS = tuple(_MODULES)
# the nine tasks of the seed's table (`m2d linear-eval --suite evar`)
SEED_TASKS = ('esc50', 'us8k', 'spcv2', 'vc1', 'voxforge', 'cremad', 'gtzan', 'nsynth', 'surge')


def get_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of `task`; `DatasetError` listing the tasks when unknown."""
    if task not in _MODULES:
        raise DatasetError(f'{task!r}: not a task; choose one of {", ".join(TASKS)}')
    module = importlib.import_module(f'.{_MODULES[task]}', __name__)
    return module.SPECS[task] if hasattr(module, 'SPECS') else module.SPEC


__all__ = ['DatasetError', 'TaskSpec', 'TASKS', 'SEED_TASKS', 'get_spec']
