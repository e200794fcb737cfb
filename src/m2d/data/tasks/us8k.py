"""UrbanSound8K: 8,732 urban sound excerpts, 10 classes, 10 folds (EVAR: file_name
``audio/fold<fold>/<slice_file_name>``, label = class, fold, from `metadata/UrbanSound8K.csv`)."""

from __future__ import annotations

from .spec import Row, TaskSpec, View, csv_rows

META = 'metadata/UrbanSound8K.csv'


def rows(view: View, split_files) -> list[Row]:
    meta = csv_rows(view.text(META), view.describe(META), ('slice_file_name', 'fold', 'class'))
    out = []
    for r in meta:
        name = f'audio/fold{r["fold"]}/{r["slice_file_name"]}'
        out.append(Row(name, name, r['fold'], {'us8k': r['class']}))
    return out


SPEC = TaskSpec(
    name='us8k', title='UrbanSound8K', size=8732, column='fold', rows=rows, marker=r'metadata/UrbanSound8K\.csv',
    license='CC BY-NC 3.0',
    citation='J. Salamon, C. Jacoby, J. P. Bello, "A Dataset and Taxonomy for Urban Sound Research," '
             'ACM Multimedia 2014.',
    urls=('https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz',),
    where='https://urbansounddataset.weebly.com/urbansound8k.html (Zenodo record 1203745)',
    layout='UrbanSound8K/ (or UrbanSound8K.tar.gz): metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav')
