"""VoxForge language identification, 6 languages (EVAR ships its own metadata, `voxforge.csv`:
file_name, label, split, speaker folders split 70/15/15; too large to ship here, so it is read
from --split_file). Rows = the split file's rows."""

from __future__ import annotations

import re
from pathlib import Path

from .spec import DatasetError, Row, TaskSpec, View, csv_rows, read_split_file


def _split_rows(split_files: list[Path]) -> tuple[list[dict], str]:
    if len(split_files) != 1:
        raise DatasetError('voxforge: give EVAR\'s metadata with --split_file voxforge.csv (from '
                           'https://github.com/nttcslab/eval-audio-repr/blob/main/evar/metadata/voxforge.csv)')
    text = read_split_file(split_files[0])
    return csv_rows(text, str(split_files[0]), ('file_name', 'label', 'split')), str(split_files[0])


def marker_from(split_files: list[Path]) -> str:
    meta, where = _split_rows(split_files)
    if not meta:
        raise DatasetError(f'{where}: no rows')
    return re.escape(meta[0]['file_name'])


def rows(view: View, split_files: list[Path]) -> list[Row]:
    meta, _ = _split_rows(split_files)
    return [Row(r['file_name'], r['file_name'], r['split'], {'voxforge': r['label']}) for r in meta]


SPEC = TaskSpec(
    name='voxforge', title='VoxForge', size=176428, rows=rows, marker=None, marker_from=marker_from,
    license='GPL (VoxForge corpus)',
    citation='K. MacLean, "VoxForge," http://www.voxforge.org/, 2018.',
    where='http://www.voxforge.org/ (EVAR\'s evar/utils/download_voxforge.py fetches the 13,837 archives '
          'listed by TFDS)',
    layout='the folder the archives were unpacked into, holding the file_name paths of voxforge.csv',
    split_file='EVAR\'s evar/metadata/voxforge.csv (required)')
