"""CREMA-D emotion (6 classes) with EVAR's speaker-disjoint split (63/9/19 speakers), shipped as
`lists/cremad.csv` (EVAR's evar/metadata/cremad.csv); the derived task cremad_gender labels each
clip with its speaker's sex (EVAR's cremad_gender.csv, shipped as a speaker -> sex list)."""

from __future__ import annotations

from pathlib import Path

from .spec import Row, TaskSpec, View, csv_rows, one_split_file, package_list


def rows(view: View, split_files: list[Path]) -> list[Row]:
    text, where = one_split_file('cremad', split_files, 'cremad.csv')
    meta = csv_rows(text, where, ('file_name', 'label', 'split'))
    sex = {r['speaker_id']: r['sex'] for r in csv_rows(package_list('cremad_speaker_sex.csv'),
                                                      'cremad_speaker_sex.csv', ('speaker_id', 'sex'))}
    out = []
    for r in meta:
        labels = {'cremad': r['label']}
        speaker = r.get('speaker_id') or r['file_name'].split('_')[0]
        if speaker in sex:
            labels['cremad_gender'] = sex[speaker]
        out.append(Row(r['file_name'], r['file_name'], r['split'], labels))
    return out


SPEC = TaskSpec(
    name='cremad', title='CREMA-D', size=7438, rows=rows, marker=r'\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z]{2}\.wav',
    derived=('cremad_gender',), license='Open Database License (ODbL) 1.0, contents: Database Contents License',
    citation='H. Cao, D. G. Cooper, M. K. Keutmann, R. C. Gur, A. Nenkova, R. Verma, "CREMA-D: Crowd-Sourced '
             'Emotional Multimodal Actors Dataset," IEEE Trans. Affective Computing 5(4), 2014.',
    where='https://github.com/CheyneyComputerScience/CREMA-D (git lfs; the AudioWAV folder)',
    layout='the folder holding the 7,442 clips <speaker>_<sentence>_<emotion>_<level>.wav (AudioWAV/ of the '
           'repository, or the flat folder of EVAR\'s download_cremad.py)',
    split_file='a CSV file_name,label,split (default: EVAR\'s cremad.csv, shipped)')
