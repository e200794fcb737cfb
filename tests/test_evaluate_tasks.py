"""Evaluation tasks: CSV (EVAR's metadata), folder and FSDD tasks, splits, clip loading, bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from m2d.evaluate import Clip, TaskError, load_clip, load_task
from m2d.evaluate.tasks import stratified_split


def write_wav(path: Path, seconds: float = 0.5, sr: int = 16000, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.1 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + '\n' + '\n'.join(rows) + '\n')
    return path


@pytest.fixture
def audio_dir(tmp_path) -> Path:
    """a0..a9 (0.5 s) and b0..b9 (1.5 s) wavs."""
    d = tmp_path / 'audio'
    for i in range(10):
        write_wav(d / f'a{i}.wav', 0.5)
        write_wav(d / f'b{i}.wav', 1.5, freq=880.0)
    return d


def test_csv_with_split_column_as_evar_writes_it(tmp_path, audio_dir):
    # EVAR's cremad.csv: file_name,label,speaker_id,split (extra columns ignored)
    rows = [f'a{i}.wav,ANG,100{i % 3},{"test" if i < 2 else "valid" if i < 4 else "train"}' for i in range(10)]
    rows += [f'b{i}.wav,SAD,100{i % 3},{"test" if i < 3 else "valid" if i < 4 else "train"}' for i in range(10)]
    csv = write_csv(tmp_path / 'cremad.csv', 'file_name,label,speaker_id,split', rows)
    task = load_task(csv=csv, data_dir=audio_dir)
    assert task.name == 'cremad' and task.classes == ['ANG', 'SAD'] and not task.multilabel
    assert task.counts() == {'train': 12, 'valid': 3, 'test': 5}
    test = task.split('test')
    assert [c.key for c in test] == ['a0', 'a1', 'b0', 'b1', 'b2']
    assert task.targets(test).tolist() == [0, 0, 1, 1, 1]
    assert task.unit_sec == pytest.approx(1.5, abs=1e-3)  # the longest clip
    assert isinstance(test[0], Clip) and test[0].path == audio_dir / 'a0.wav'


def test_csv_multilabel_semicolon_and_evar_comma(tmp_path, audio_dir):
    rows = [f'a{i}.wav,{"x;y" if i % 2 else "x"},{"test" if i < 3 else "valid" if i < 5 else "train"}' for i in range(10)]
    rows += [f'b{i}.wav,{"z;y" if i % 2 else "z"},{"test" if i < 3 else "valid" if i < 5 else "train"}' for i in range(10)]
    task = load_task(csv=write_csv(tmp_path / 'm.csv', 'file_name,label,split', rows), data_dir=audio_dir)
    assert task.multilabel and task.classes == ['x', 'y', 'z']
    y = task.targets(task.split('test'))
    assert y.shape == (6, 3) and y.dtype == np.float32
    assert y.tolist()[:2] == [[1, 0, 0], [1, 1, 0]]  # a0: x; a1: x;y
    # EVAR's AudioSet metadata: several labels in one quoted cell separated by commas
    rows = [r.replace('x;y', '"x,y"').replace('z;y', '"z,y"') for r in rows]
    task2 = load_task(csv=write_csv(tmp_path / 'm2.csv', 'file_name,label,split', rows), data_dir=audio_dir)
    assert task2.multilabel and task2.targets(task2.clips).tolist() == task.targets(task.clips).tolist()


def test_stratified_split_without_split_column(tmp_path, audio_dir):
    rows = [f'a{i}.wav,low' for i in range(10)] + [f'b{i}.wav,high' for i in range(10)]
    csv = write_csv(tmp_path / 't.csv', 'file_name,label', rows)
    t1 = load_task(csv=csv, data_dir=audio_dir, seed=1, unit_sec=1.0)
    for split, n in (('train', 7), ('valid', 1), ('test', 2)):
        clips = t1.split(split)
        assert Counter(c.labels[0] for c in clips) == {'low': n, 'high': n}, split
    assert t1.unit_sec == 1.0
    again = load_task(csv=csv, data_dir=audio_dir, seed=1)
    other = load_task(csv=csv, data_dir=audio_dir, seed=2)
    assert [c.split for c in again.clips] == [c.split for c in t1.clips]  # seeded
    assert [c.split for c in other.clips] != [c.split for c in t1.clips]
    assert 'stratified 70/10/20' in t1.notes[0]


def test_stratified_split_ratio_and_small_classes():
    labels = [('a',)] * 100 + [('b',)] * 3
    split = stratified_split(labels, seed=0, ratio=(0.7, 0.1, 0.2))
    a = Counter(split[:100])
    assert a == {'train': 70, 'valid': 10, 'test': 20}
    assert Counter(split[100:]) == {'train': 1, 'valid': 1, 'test': 1}  # every split gets one
    assert stratified_split([('a',), ('a',)], seed=0) .count('train') >= 1


def test_fold_column_holds_out_fold_1(tmp_path, audio_dir):
    rows = [f'a{i}.wav,dog,{i % 5 + 1}' for i in range(10)] + [f'b{i}.wav,cat,{i % 5 + 1}' for i in range(10)]
    task = load_task(csv=write_csv(tmp_path / 'esc.csv', 'file_name,label,fold', rows), data_dir=audio_dir)
    assert sorted(c.key for c in task.split('test')) == ['a0', 'a5', 'b0', 'b5']
    assert task.counts()['valid'] >= 2 and 'fold 1' in task.notes[0]


def test_fold_api_every_fold_as_test(tmp_path, audio_dir):
    # folds 1..10 as EVAR's us8k.csv: sorted numerically (10 after 9), each one the test set in turn
    rows = [f'a{i}.wav,dog,{i + 1}' for i in range(10)] + [f'b{i}.wav,cat,{i + 1}' for i in range(10)]
    task = load_task(csv=write_csv(tmp_path / 'us.csv', 'file_name,label,fold', rows), data_dir=audio_dir)
    assert task.folds == [str(k) for k in range(1, 11)]
    assert {c.key: c.fold for c in task.clips}['b9'] == '10'
    tested = []
    for fold in task.folds:
        f = task.for_fold(fold)
        assert f.counts() == {'train': 18, 'valid': 0, 'test': 2}
        assert {c.fold for c in f.split('test')} == {fold} and fold not in {c.fold for c in f.split('train')}
        assert [c.key for c in f.clips] == [c.key for c in task.clips]  # same clips, same order
        tested += [c.key for c in f.split('test')]
    assert sorted(tested) == sorted(c.key for c in task.clips)  # every clip is tested exactly once
    assert task.for_fold(2).split('test') == task.for_fold('2').split('test')
    assert task.counts()['valid'] > 0  # the task itself is unchanged
    with pytest.raises(TaskError, match='fold .11. is not a fold'):
        task.for_fold(11)
    split_rows = [r.rsplit(',', 1)[0] + (',test' if r.startswith(('a9', 'b9')) else ',valid' if
                                         r.startswith(('a8', 'b8')) else ',train') for r in rows]
    split_task = load_task(csv=write_csv(tmp_path / 's.csv', 'file_name,label,split', split_rows), data_dir=audio_dir)
    assert split_task.folds == [] and all(c.fold is None for c in split_task.clips)
    with pytest.raises(TaskError, match='no fold column'):
        split_task.for_fold(1)


def test_folder_task(tmp_path):
    root = tmp_path / 'animals'
    for i in range(6):
        write_wav(root / 'dog' / f'd{i}.wav', 0.3)
        write_wav(root / 'cat' / 'sub' / f'c{i}.flac', 0.2)
    task = load_task(data_dir=root)
    assert task.name == 'animals' and task.classes == ['cat', 'dog']
    assert {c.key for c in task.clips} >= {'dog/d0', 'cat/sub/c0'}
    assert all(task.counts()[s] >= 1 for s in ('train', 'valid', 'test'))


def test_fsdd_official_split(fsdd_dir):
    digits = load_task('fsdd-digits', data_dir=fsdd_dir.parent, seed=0)  # the folder holding recordings/
    assert digits.classes == [str(d) for d in range(10)]
    test = digits.split('test')
    assert len(test) == 300 and all(int(c.key.split('_')[2]) < 5 for c in test)
    assert all(int(c.key.split('_')[2]) >= 5 for c in digits.split('train') + digits.split('valid'))
    n = digits.counts()
    assert n['train'] + n['valid'] == 2700 and 300 <= n['valid'] <= 380
    assert 2.2 < digits.unit_sec < 2.4  # the longest recording (2.28 s)
    speakers = load_task('fsdd-speakers', data_dir=fsdd_dir, unit_sec=1.0, seed=3)  # the recordings folder itself
    assert len(speakers.classes) == 6 and len(speakers.split('test')) == 300
    assert [c.split for c in load_task('fsdd-digits', data_dir=fsdd_dir, unit_sec=1, seed=0).clips] == \
        [c.split for c in digits.clips]


def test_load_clip_crops_and_pads(tmp_path):
    path = write_wav(tmp_path / 'x.wav', 0.5, sr=8000)
    wav = load_clip(path, 16000, 4000)
    assert wav.shape == (4000,) and wav.dtype == np.float32 and np.abs(wav).max() > 0.05
    padded = load_clip(path, 16000, 20000)
    assert padded.shape == (20000,) and np.all(padded[8000:] == 0) and np.abs(padded[:7900]).max() > 0.05
    np.testing.assert_allclose(padded[:4000], wav)


@pytest.mark.parametrize('case, match', [
    ('missing_csv', 'no such file'),
    ('no_label_column', "no column 'label'"),
    ('missing_audio', '1 of 4 listed file'),
    ('one_class', 'only one class'),
    ('empty_split', 'the valid split is empty'),
    ('unseen_test_label', "never occur in train \\(e.g. 'c'"),
    ('bad_split_value', "split 'holdout'"),
    ('duplicate', 'listed twice'),
    ('unknown_task', 'not a built-in task'),
    ('no_task', 'no task'),
    ('fsdd_no_dir', '--data_dir'),
])
def test_bad_input_is_one_line_error(tmp_path, audio_dir, case, match):
    csv = tmp_path / 'bad.csv'
    kwargs = {'csv': csv, 'data_dir': audio_dir}
    if case == 'missing_csv':
        pass
    elif case == 'no_label_column':
        write_csv(csv, 'file_name,class', ['a0.wav,x'])
    elif case == 'missing_audio':
        write_csv(csv, 'file_name,label,split', ['a0.wav,x,train', 'b0.wav,y,train', 'a1.wav,x,test', 'nope.wav,y,test'])
    elif case == 'one_class':
        write_csv(csv, 'file_name,label', [f'a{i}.wav,x' for i in range(10)])
    elif case == 'empty_split':
        write_csv(csv, 'file_name,label,split', ['a0.wav,x,train', 'b0.wav,y,train', 'a1.wav,x,test'])
    elif case == 'unseen_test_label':
        write_csv(csv, 'file_name,label,split', ['a0.wav,x,train', 'b0.wav,y,train', 'a1.wav,x,valid',
                                                 'a2.wav,c,test'])
    elif case == 'bad_split_value':
        write_csv(csv, 'file_name,label,split', ['a0.wav,x,holdout'])
    elif case == 'duplicate':
        write_csv(csv, 'file_name,label,split', ['a0.wav,x,train', 'a0.wav,x,test'])
    elif case == 'unknown_task':
        kwargs = {'task': 'esc51', 'data_dir': audio_dir}
    elif case == 'no_task':
        kwargs = {}
    elif case == 'fsdd_no_dir':
        kwargs = {'task': 'fsdd-digits'}
    with pytest.raises(TaskError, match=match) as e:
        load_task(**kwargs)
    assert '\n' not in str(e.value)
