"""VoxCeleb1 speaker identification: 153,516 utterances of 1,251 speakers (EVAR: the lines
``<1|2|3> <id>/<video>/<n>.wav`` of `iden_split.txt`: file_name ``wav/<path>``, label = the speaker
id, split 1 train, 2 valid, 3 test)."""

from __future__ import annotations

from pathlib import Path

from .spec import DatasetError, Row, TaskSpec, View, read_split_file

IDEN_SPLIT_URL = 'https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/iden_split.txt'
_SPLITS = {'1': 'train', '2': 'valid', '3': 'test'}


def _iden_split(view: View, split_files: list[Path]) -> tuple[str, str]:
    """--split_file, else `iden_split.txt` in the source, else the file from the VGG site."""
    if split_files:
        return read_split_file(split_files[0]), str(split_files[0])
    if 'iden_split.txt' in view:
        return view.text('iden_split.txt'), view.describe('iden_split.txt')
    import urllib.request

    try:
        with urllib.request.urlopen(IDEN_SPLIT_URL, timeout=60) as r:
            return r.read().decode('utf-8'), IDEN_SPLIT_URL
    except OSError as e:
        raise DatasetError(f'vc1: cannot download {IDEN_SPLIT_URL} ({getattr(e, "reason", e)}); '
                           'download it and give --split_file iden_split.txt') from None


def rows(view: View, split_files: list[Path]) -> list[Row]:
    text, where = _iden_split(view, split_files)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in _SPLITS:
            raise DatasetError(f'{where}: line {i} is not "<1|2|3> <id>/<video>/<n>.wav": {line.strip()!r}')
        name = f'wav/{parts[1]}'
        out.append(Row(name, name, _SPLITS[parts[0]], {'vc1': parts[1].split('/')[0]}))
    return out


SPEC = TaskSpec(
    name='vc1', title='VoxCeleb1', size=153516, rows=rows, marker=r'wav/id\d+/[^/]+/[^/]+\.wav',
    license='CC BY 4.0',
    citation='A. Nagrani, J. S. Chung, A. Zisserman, "VoxCeleb: a large-scale speaker identification dataset," '
             'Interspeech 2017.',
    where='https://www.robots.ox.ac.uk/~vgg/data/voxceleb/vox1.html (request access; vox1_dev_wav and '
          'vox1_test_wav)',
    layout='a folder (or zip) holding wav/<id>/<video>/<n>.wav (vox1_dev_wav.zip and vox1_test_wav.zip unpacked '
           'into one folder)',
    split_file=f'iden_split.txt ({IDEN_SPLIT_URL}; downloaded when not given and not in the source)')
