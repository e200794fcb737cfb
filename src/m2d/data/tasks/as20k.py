"""AudioSet20K (balanced train + eval), multi-label, from the user's own AudioSet copy, as EVAR's
make_as_metadata.py does: the wavs under ``balanced_train_segments/`` and ``eval_segments/`` (any
depth) are matched by their first 11 characters (the YouTube id) to the rows of the official
segment CSVs of the same subset; label = positive_labels; split train (balanced) or test (eval).
Rows of clips the copy lacks are left out (AudioSet clips keep disappearing)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .spec import DatasetError, Row, TaskSpec, View, read_split_file

CSV_URL = 'http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/{}.csv'
SUBSETS = {'eval_segments': 'test', 'balanced_train_segments': 'train'}  # EVAR's order
_CLIP = re.compile(r'^([^/]+)/(?:.*/)?([^/]+)\.wav$')


def _segments(subset: str, view: View, split_files: list[Path]) -> list[list[str]]:
    """The rows (ytid, start, end, labels) of an official segment CSV: --split_file named after the
    subset, else the file in the source, else downloaded."""
    given = [p for p in split_files if p.name.startswith(subset)]
    if given:
        text, where = read_split_file(given[0]), str(given[0])
    elif f'{subset}.csv' in view:
        text, where = view.text(f'{subset}.csv'), view.describe(f'{subset}.csv')
    else:
        import urllib.request

        url = CSV_URL.format(subset)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text, where = r.read().decode('utf-8'), url
        except OSError as e:
            raise DatasetError(f'as20k: cannot download {url} ({getattr(e, "reason", e)}); download it and give '
                               f'--split_file {subset}.csv') from None
    out = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or row[0].startswith('#'):
            continue
        if len(row) != 4:
            raise DatasetError(f'{where}: expected "YTID, start, end, "labels"" rows, got {row}')
        out.append(row)
    return out


def rows(view: View, split_files: list[Path]) -> list[Row]:
    id2 = {}  # ytid -> (subset folder, file): the last file of an id wins, as in EVAR
    for name in view.names:
        m = _CLIP.match(name)
        if m:
            id2[m[2][:11]] = (m[1], name)
    out = []
    for subset, split in SUBSETS.items():
        for ytid, _, _, labels in _segments(subset, view, split_files):
            if ytid in id2 and id2[ytid][0] == subset:
                out.append(Row(id2[ytid][1], id2[ytid][1], split, {'as20k': labels}))
    return out


SPEC = TaskSpec(
    name='as20k', title='AudioSet20K', size=None, rows=rows,
    marker=r'(balanced_train_segments|eval_segments)/(.*/)?[^/]+\.wav',
    license='CC BY 4.0 (labels), the audio belongs to its YouTube uploaders',
    citation='J. F. Gemmeke, D. P. W. Ellis, D. Freedman, A. Jansen, W. Lawrence, R. C. Moore, M. Plakal, '
             'M. Ritter, "Audio Set: An ontology and human-labeled dataset for audio events," ICASSP 2017.',
    where='https://research.google.com/audioset/ (the audio is not distributed: bring your own copy)',
    layout='a folder holding balanced_train_segments/ and eval_segments/ with <YTID>*.wav files (any depth)',
    split_file='eval_segments.csv and balanced_train_segments.csv (give --split_file twice; downloaded from '
               'storage.googleapis.com when not given and not in the source)')
