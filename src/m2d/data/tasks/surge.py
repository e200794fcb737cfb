"""Pitch Audio Dataset (Surge synthesizer): 88 pitches per tone (preset), split by tone with EVAR's
`dataset_surge_tone_splits.csv` (shipped). EVAR's rule: every ``<tone>/<name>.ogg``, label = the
file's stem, split = its tone's. Written as `<tone>/<name>.wav`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .spec import Row, TaskSpec, View, csv_rows, one_split_file

log = logging.getLogger(__name__)
_CLIP = re.compile(r'^([^/]+)/([^/]+)\.ogg$')


def rows(view: View, split_files: list[Path]) -> list[Row]:
    text, where = one_split_file('surge', split_files, 'surge_tone_splits.csv')
    split_of = {r['tone']: r['split'] for r in csv_rows(text, where, ('tone', 'split'))}
    out, unknown = [], set()
    for name in view.names:
        m = _CLIP.match(name)
        if m:
            if m[1] in split_of:
                out.append(Row(name, name, split_of[m[1]], {'surge': m[2]}))
            else:
                unknown.add(m[1])
    if unknown:
        log.warning('surge: %d tone folders are not in %s and are left out (e.g. %s)', len(unknown), where,
                    sorted(unknown)[0])
    tones = {r.member.split('/')[0] for r in out}
    if len(tones) < len(split_of):
        log.warning('surge: the source holds %d of the %d tones of %s', len(tones), len(split_of), where)
    return out


SPEC = TaskSpec(
    name='surge', title='Pitch Audio Dataset (Surge synthesizer)', size=None, rows=rows,
    marker=r'surge-[^/]+/[^/]+\.ogg', license='see https://zenodo.org/record/4677097',
    citation='Pitch Audio Dataset (Surge synthesizer), Zenodo record 4677097, 2021.',
    where='https://zenodo.org/record/4677097',
    layout='the unpacked folder (or archive) holding <tone>/<pitch>.ogg, one folder per Surge tone (surge-...)',
    split_file='a CSV tone,split (default: EVAR\'s dataset_surge_tone_splits.csv, shipped)')
