"""FSD50K, multi-label (200 classes). EVAR's rule: `FSD50K.ground_truth/dev.csv` rows as
``FSD50K.dev_audio/<fname>.wav`` with split train (train) or valid (val), `eval.csv` rows as
``FSD50K.eval_audio/<fname>.wav`` with split test; label = the `labels` cell (comma-joined)."""

from __future__ import annotations

from .spec import Row, TaskSpec, View, csv_rows

GT = 'FSD50K.ground_truth'


def rows(view: View, split_files) -> list[Row]:
    dev = csv_rows(view.text(f'{GT}/dev.csv'), view.describe(f'{GT}/dev.csv'), ('fname', 'labels', 'split'))
    ev = csv_rows(view.text(f'{GT}/eval.csv'), view.describe(f'{GT}/eval.csv'), ('fname', 'labels'))
    out = []
    for r in dev:
        name = f'FSD50K.dev_audio/{r["fname"]}.wav'
        out.append(Row(name, name, {'train': 'train', 'val': 'valid'}.get(r['split'], r['split']),
                       {'fsd50k': r['labels']}))
    for r in ev:
        name = f'FSD50K.eval_audio/{r["fname"]}.wav'
        out.append(Row(name, name, 'test', {'fsd50k': r['labels']}))
    return out


SPEC = TaskSpec(
    name='fsd50k', title='FSD50K', size=51197, rows=rows, marker=r'FSD50K\.ground_truth/dev\.csv',
    license='CC BY 4.0 (the dataset; each clip carries its own Creative Commons license)',
    citation='E. Fonseca, X. Favory, J. Pons, F. Font, X. Serra, "FSD50K: An Open Dataset of Human-Labeled Sound '
             'Events," IEEE/ACM Trans. Audio, Speech, and Language Processing 30, 2022.',
    where='https://zenodo.org/record/4060432 (split zips: join FSD50K.dev_audio.z01.. with zip -s 0 first)',
    layout='a folder holding FSD50K.dev_audio/*.wav, FSD50K.eval_audio/*.wav and FSD50K.ground_truth/{dev,eval}.csv')
