"""Class names -> caption sentences for zero-shot classification, as EVAR writes them.

EVAR (nttcslab/eval-audio-repr, ``zeroshot.py``, ``class_to_caption``) turns each class name into a
sentence before encoding it with the CLAP text encoder: CREMA-D's emotion codes become six fixed
sentences, GTZAN's genres get `` music``, NSynth's instrument families are prefixed with ``the
musical instrument sound of``, AudioSet's ids (``/m/09x0r``) become their display names; then every
caption is the name with ``_`` replaced by a space, followed by `` can be heard``. The other tasks
(ESC-50, US8K, Speech Commands, VoxCeleb1, VoxForge, Surge, FSD50K, ...) use the class name as it is.

EVAR applies the AudioSet names to its task ``as`` (AudioSet's eval set as the test split); here
they apply to ``as20k`` as well, whose test split is the same eval set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..clap import DEFAULT_TEMPLATE, captions

log = logging.getLogger(__name__)

# The sentence every caption is made of (EVAR's name + " can be heard"; also the reference notebook's,
# `m2d.clap.DEFAULT_TEMPLATE`). ``{label}`` (or ``{}``) is where the class name goes.
EVAR_TEMPLATE = DEFAULT_TEMPLATE
PLACEHOLDERS = ('{label}', '{}')

# CREMA-D's emotion codes as EVAR words them.
CREMAD_SENTENCES = {
    'ANG': 'angry person talking',
    'DIS': 'someone talking in disgust',
    'FEA': 'someone talking with a sense of fear',
    'HAP': 'someone talking happily and joyfully',
    'NEU': 'someone talking calmly',
    'SAD': 'someone talking sadly',
}

AUDIOSET_TASKS = ('as', 'as20k')


def audioset_names(classes: Sequence[str]) -> list[str]:
    """AudioSet ids (``/m/09x0r``) -> display names (``Speech``); a name that is not an id is kept."""
    from ..labels import audioset_classes

    names = {c.mid: c.name for c in audioset_classes()}
    unknown = [c for c in classes if c not in names]
    if unknown:
        log.warning('%d class(es) are not AudioSet ids and are used as they are (e.g. %r)', len(unknown), unknown[0])
    return [names.get(c, c) for c in classes]


def class_names(task: str | None, classes: Sequence[str]) -> list[str]:
    """The per-task wording of EVAR's `class_to_caption`, before the template."""
    classes = [str(c) for c in classes]
    if task == 'cremad':
        missing = [c for c in classes if c not in CREMAD_SENTENCES]
        if missing:
            raise ValueError(f'cremad: class {missing[0]!r} is not one of the six CREMA-D codes '
                             f'({", ".join(CREMAD_SENTENCES)})')
        return [CREMAD_SENTENCES[c] for c in classes]
    if task == 'gtzan':
        return [f'{c} music' for c in classes]
    if task == 'nsynth':
        return [f'the musical instrument sound of {c}' for c in classes]
    if task in AUDIOSET_TASKS:
        return audioset_names(classes)
    return classes


def class_to_caption(task: str | None, classes: Sequence[str], template: str = EVAR_TEMPLATE) -> list[str]:
    """One caption per class, in the order of `classes`: EVAR's wording for `task` (None: the names as
    they are), ``_`` -> space, then put into `template` (``'{label} can be heard'``; ``{}`` works too)."""
    slot = next((p for p in PLACEHOLDERS if p in template), None)
    if slot is None:
        raise ValueError(f'--template {template!r}: needs {{label}} where the class name goes')
    return captions(class_names(task, classes), template.replace(slot, '{label}'))  # '_' -> ' ', as predict's
