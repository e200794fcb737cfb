"""NSynth instrument family (11 classes), and the derived nspitch (pitch) and nsvelocity
(velocity). EVAR's rule: for each split of train, valid, test, every key of
`nsynth-<split>/examples.json` in its order: file_name ``nsynth-<split>/audio/<key>.wav``."""

from __future__ import annotations

import json

from .spec import DatasetError, Row, TaskSpec, View

URL = 'http://download.magenta.tensorflow.org/datasets/nsynth/nsynth-{}.jsonwav.tar.gz'


def rows(view: View, split_files) -> list[Row]:
    out = []
    for split in ('train', 'valid', 'test'):
        meta = f'nsynth-{split}/examples.json'
        if meta not in view:
            continue  # a source with only some of the three archives: a partial task
        try:
            examples = json.loads(view.text(meta))
        except ValueError as e:
            raise DatasetError(f'{view.describe(meta)}: not JSON ({e})') from None
        for key, ex in examples.items():
            name = f'nsynth-{split}/audio/{key}.wav'
            out.append(Row(name, name, split, {'nsynth': ex['instrument_family_str'], 'nspitch': str(ex['pitch']),
                                               'nsvelocity': str(ex['velocity'])}))
    return out


SPEC = TaskSpec(
    name='nsynth', title='NSynth', size=305979, rows=rows, marker=r'nsynth-(train|valid|test)/examples\.json',
    derived=('nspitch', 'nsvelocity'), license='CC BY 4.0',
    citation='J. Engel, C. Resnick, A. Roberts, S. Dieleman, D. Eck, K. Simonyan, M. Norouzi, "Neural Audio '
             'Synthesis of Musical Notes with WaveNet Autoencoders," ICML 2017.',
    urls=tuple(URL.format(s) for s in ('train', 'valid', 'test')),
    where='https://magenta.tensorflow.org/datasets/nsynth (nsynth-{train,valid,test}.jsonwav.tar.gz)',
    layout='a folder holding nsynth-train/, nsynth-valid/, nsynth-test/ (each examples.json and audio/*.wav), '
           'or the three .jsonwav.tar.gz archives (give --source three times)')
