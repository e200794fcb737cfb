"""GTZAN genres with the fault-filtered split of jongpillee/music_dataset_split (443/197/290
clips; shipped in `lists/`). EVAR's rule: every ``<genre>/<clip>.wav``, label = the genre, split
from the three lists; the 70 clips no list names (the faulty ones) get no split in EVAR's CSV
and are left out here. A `.au` source (the original archive) is read and written as `.wav`."""

from __future__ import annotations

import re
from pathlib import Path

from .spec import DatasetError, Row, TaskSpec, View, package_list, read_split_file

_CLIP = re.compile(r'^([^/]+)/([^/]+)\.(wav|au)$')
GENRES = r'(blues/blues|classical/classical|country/country|disco/disco|hiphop/hiphop|jazz/jazz|metal/metal|' \
         r'pop/pop|reggae/reggae|rock/rock)'
SPLITS = ('train', 'valid', 'test')


def _lists(split_files: list[Path]) -> dict[str, str]:
    """name -> split from the filtered lists (--split_file: the three lists, named *train*, *valid*,
    *test*)."""
    if split_files:
        texts = {}
        for p in split_files:
            split = next((s for s in SPLITS if s in p.name), None)
            if split is None:
                raise DatasetError(f'{p}: a GTZAN split list is named after its split (train, valid or test)')
            texts[split] = read_split_file(p)
        if set(texts) != set(SPLITS):
            raise DatasetError(f'--split_file: GTZAN needs the train, valid and test lists, got {sorted(texts)}')
    else:
        texts = {s: package_list(f'gtzan_{s}_filtered.txt') for s in SPLITS}
    split_of = {}
    for split in ('test', 'valid', 'train'):  # EVAR assigns in this order; a later list wins
        split_of.update({line.strip(): split for line in texts[split].splitlines() if line.strip()})
    return split_of


def rows(view: View, split_files: list[Path]) -> list[Row]:
    split_of = _lists(split_files)
    out = []
    for name in view.names:
        m = _CLIP.match(name)
        if m:
            file_name = f'{m[1]}/{m[2]}.wav'
            if file_name in split_of:
                out.append(Row(name, file_name, split_of[file_name], {'gtzan': m[1]}))
    return out


SPEC = TaskSpec(
    name='gtzan', title='GTZAN Genre Collection', size=930, rows=rows, marker=GENRES + r'\.\d{5}\.(wav|au)',
    license='none stated (copyrighted recordings; research use)',
    citation='G. Tzanetakis, P. Cook, "Musical genre classification of audio signals," IEEE Trans. Speech and '
             'Audio Processing 10(5), 2002.',
    where='the GTZAN genres archive (genres.tar.gz; the original http://opihi.cs.uvic.ca/sound/genres.tar.gz is '
          'offline, mirrors exist, e.g. Kaggle "genres_original")',
    layout='genres/ (or its archive): <genre>/<genre>.000NN.wav (or .au), ten genre folders',
    split_file='the three filtered lists train/valid/test (default: shipped, from jongpillee/music_dataset_split)')
