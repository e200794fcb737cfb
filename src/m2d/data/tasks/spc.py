"""Speech Commands v1 (spcv1, 30 words) and v2 (spcv2, 35 words). EVAR's rule: every
``<word>/<file>.wav`` whose folder starts with a lower-case letter (so not `_background_noise_`),
label = the folder; split = valid for the names in `validation_list.txt`, test for those in
`testing_list.txt`, train otherwise."""

from __future__ import annotations

import re

from .spec import Row, TaskSpec, View

_CLIP = re.compile(r'^[a-z][^/]*/[^/]+\.wav$')


def rows(view: View, task: str) -> list[Row]:
    valid = set(view.text('validation_list.txt').split())
    test = set(view.text('testing_list.txt').split())
    out = []
    for name in view.names:
        if _CLIP.match(name):
            split = 'test' if name in test else 'valid' if name in valid else 'train'
            out.append(Row(name, name, split, {task: name.split('/')[0]}))
    return out


def _spec(version: int) -> TaskSpec:
    name = f'spcv{version}'
    archive = f'speech_commands_v0.0{version}.tar.gz'

    return TaskSpec(
        name=name, title=f'Speech Commands v0.0{version}', size=(64721, 105829)[version - 1], rows=lambda view, split_files: rows(view, name),
        marker=r'validation_list\.txt', license='CC BY 4.0',
        citation='P. Warden, "Speech Commands: A Dataset for Limited-Vocabulary Speech Recognition," '
                 'arXiv:1804.03209, 2018.',
        urls=(f'http://download.tensorflow.org/data/{archive}',),
        where=f'http://download.tensorflow.org/data/{archive}',
        layout=f'the unpacked {archive} (or the archive): <word>/*.wav, validation_list.txt, testing_list.txt')


SPECS = {'spcv1': _spec(1), 'spcv2': _spec(2)}
