"""Class names for fine-tuned heads: a file's own names, or AudioSet's 527 for EVAR's AudioSet heads.

The AudioSet class list (``resources/class_labels_indices.csv``: ``index,mid,display_name``, in the
ontology's index order) is the one Google publishes with AudioSet; the AudioSet ontology is
CC BY-SA 4.0 (Google Inc., https://research.google.com/audioset/; see ``resources/README.md``).

EVAR builds multi-label targets with scikit-learn's ``MultiLabelBinarizer``, which sorts the label
strings, so a head fine-tuned on AudioSet by EVAR (the released ``*_AS-FT_enconly`` weights) has
its outputs in the order of the sorted ``mid`` strings, not the ``index`` column; the reference's
tagging notebooks sort the table by ``mid`` for the same reason.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

AUDIOSET_NUM_CLASSES = 527
AUDIOSET_LICENSE = 'AudioSet ontology (c) Google Inc., CC BY-SA 4.0'


class AudioSetClass(NamedTuple):
    """One row of ``class_labels_indices.csv``."""

    index: int
    mid: str
    name: str


@lru_cache(maxsize=1)
def audioset_classes() -> tuple[AudioSetClass, ...]:
    """The 527 AudioSet classes in the ontology's index order (``index`` 0..526)."""
    text = resources.files('m2d').joinpath('resources/class_labels_indices.csv').read_text(encoding='utf-8')
    rows = tuple(AudioSetClass(int(r['index']), r['mid'], r['display_name'])
                 for r in csv.DictReader(io.StringIO(text)))
    if [r.index for r in rows] != list(range(AUDIOSET_NUM_CLASSES)):
        raise RuntimeError('m2d/resources/class_labels_indices.csv is damaged: expected indices 0..526')
    return rows


def audioset_head_classes() -> list[str]:
    """AudioSet display names in the output order of an EVAR-fine-tuned 527-class head (sorted by mid)."""
    return [c.name for c in sorted(audioset_classes(), key=lambda c: c.mid)]


@dataclass
class HeadLabels:
    """What a fine-tuned file says (or implies) about its head's outputs."""

    classes: list[str] | None     # None: unknown, shown as indices (#3)
    multilabel: bool
    unit_sec: float | None        # the fine-tuning clip length, when the file says
    info: dict[str, Any] = field(default_factory=dict)
    source: str = 'none'          # 'file', 'audioset' or 'none'


def head_labels(meta: dict[str, Any], num_outputs: int, name: str = '') -> HeadLabels:
    """Labels of a head with `num_outputs` outputs from a checkpoint's metadata (``Checkpoint.meta``).

    A file written by ``m2d finetune`` keeps its own class names and settings. A file without names
    whose head has 527 outputs is taken as EVAR's AudioSet fine-tuning: AudioSet names, multi-label.
    """
    try:
        info = json.loads(meta.get('m2d_finetune') or '{}')
    except (TypeError, ValueError):
        info = {}
    unit = info.get('unit_sec')
    unit = float(unit) if unit else None
    classes = meta.get('classes')
    if classes is not None and (not isinstance(classes, (list, tuple)) or len(classes) != num_outputs):
        log.warning('%s: the class names do not match the %d head outputs; showing indices', name, num_outputs)
        classes = None
    if classes:
        return HeadLabels([str(c) for c in classes], bool(info.get('multilabel', False)), unit, info, 'file')
    if num_outputs == AUDIOSET_NUM_CLASSES and 'multilabel' not in info:
        return HeadLabels(audioset_head_classes(), True, unit, info, 'audioset')
    return HeadLabels(None, bool(info.get('multilabel', False)), unit, info, 'none')
