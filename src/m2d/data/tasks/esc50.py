"""ESC-50: 2,000 5-s environmental sounds, 50 classes, 5 folds (EVAR: `meta/esc50.csv`, file_name
``audio/<filename>``, label = category, fold)."""

from __future__ import annotations

from .spec import Row, TaskSpec, View, csv_rows


def rows(view: View, split_files) -> list[Row]:
    meta = csv_rows(view.text('meta/esc50.csv'), view.describe('meta/esc50.csv'), ('filename', 'category', 'fold'))
    return [Row(f'audio/{r["filename"]}', f'audio/{r["filename"]}', r['fold'], {'esc50': r['category']})
            for r in meta]


SPEC = TaskSpec(
    name='esc50', title='ESC-50', size=2000, column='fold', rows=rows, marker=r'meta/esc50\.csv',
    license='CC BY-NC 3.0',
    citation='K. J. Piczak, "ESC: Dataset for Environmental Sound Classification," ACM Multimedia 2015.',
    urls=('https://github.com/karoldvl/ESC-50/archive/master.zip',),
    where='https://github.com/karolpiczak/ESC-50 (archive/master.zip)',
    layout='ESC-50-master/ (or its zip): meta/esc50.csv and audio/*.wav')
