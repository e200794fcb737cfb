"""`m2d datasets TASK DEST` on small mocks of each dataset's published layout, built from FSDD
recordings: the CSV rows against rows written here from the mock's construction by EVAR's rules,
the audio rate, failures, resume after an interruption, partial sources, archives, bad input."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import soundfile as sf

from conftest import FSDD, need, write_small_checkpoint
from m2d.cli import main
from m2d.data.tasks import TASKS, DatasetError
from m2d.data.tasks import prepare as prep
from m2d.data.tasks.prepare import prepare_task

REC = FSDD


@pytest.fixture(scope='module')
def clips() -> list[Path]:
    """Twelve short FSDD recordings (8 kHz)."""
    need(REC)
    return sorted(REC.glob('*_george_*.wav'))[:12]


def put(path: Path, src: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, path)
    return path.name


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def zip_folder(folder: Path, path: Path) -> Path:
    """A zip of the files under `folder`, named relative to it."""
    with zipfile.ZipFile(path, 'w') as z:
        for p in sorted(folder.rglob('*')):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return path


def read_rows(path: Path) -> list[tuple]:
    with open(path, newline='') as f:
        r = csv.reader(f)
        header = next(r)
        return [tuple(row) for row in r], header


def check(dest: Path, task: str, expected: list[tuple], column: str = 'split', rate: int = 16000) -> None:
    rows, header = read_rows(dest / f'{task}.csv')
    assert header == ['file_name', 'label', column]
    assert sorted(rows) == sorted(expected)
    for name, _, _ in rows[:3]:
        info = sf.info(str(dest / name))
        assert info.samplerate == rate and info.channels == 1
    info = json.loads((dest / 'PREPARED.json').read_text())
    assert info['task'] in (task, 'nsynth', 'cremad') and info['sample_rate'] == rate
    assert info['license'] and info['citation'] and info['m2d_version']


def run(task, dest, source, **kw):
    kw.setdefault('workers', 0)
    kw.setdefault('progress', False)
    return prepare_task(task, dest, [str(s) for s in ([source] if not isinstance(source, list) else source)], **kw)


# ----- mocks: each builds the published layout and returns the rows EVAR's rule gives ----------

def mock_esc50(root: Path, clips) -> list[tuple]:
    base = root / 'ESC-50-master'
    meta, expected = [], []
    for i, c in enumerate(clips[:10]):
        fold, cat = i % 5 + 1, ['dog', 'rain'][i % 2]
        name = f'{fold}-{1000 + i}-A-{i % 2}.wav'
        put(base / 'audio' / name, c)
        meta.append((name, fold, i % 2, cat, False, 1000 + i, 'A'))
        expected.append((f'audio/{name}', cat, str(fold)))
    write_csv(base / 'meta/esc50.csv', ['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take'], meta)
    (base / 'README.md').write_text('ESC-50')
    return expected


def test_esc50_folder_rows_rate_rerun_and_32k(tmp_path, clips, caplog):
    expected = mock_esc50(tmp_path / 'src', clips)
    with caplog.at_level(logging.WARNING):
        r = run('esc50', tmp_path / 'D', tmp_path / 'src')
    assert 'holds 10 of the official 2000 files' in caplog.text  # the partial-source warning
    check(tmp_path / 'D', 'esc50', expected, 'fold')
    assert r.counts == {str(k): 2 for k in range(1, 6)} and not (tmp_path / 'D/datasets_failures.csv').exists()
    assert not (tmp_path / 'D' / prep.STARTED).exists() and not (tmp_path / 'D' / prep.WORK).exists()
    again = run('esc50', tmp_path / 'D', tmp_path / 'src')
    assert again.already and again.summary is None
    r32 = run('esc50', tmp_path / 'D32', tmp_path / 'src/ESC-50-master', sample_rate=32000)
    check(tmp_path / 'D32', 'esc50', expected, 'fold', rate=32000)
    wav8, _ = sf.read(str(clips[0]))
    wav32, _ = sf.read(str(tmp_path / 'D32' / expected[0][0]))
    assert abs(len(wav32) - 4 * len(wav8)) <= 4 and r32.rows == 10


def test_us8k_tar_gz(tmp_path, clips):
    base = tmp_path / 'u' / 'UrbanSound8K'
    meta, expected = [], []
    for i, c in enumerate(clips[:8]):
        fold, cls = i % 3 + 1, ['siren', 'drilling'][i % 2]
        name = f'{100 + i}-{i % 2}-0-{i}.wav'
        put(base / f'audio/fold{fold}' / name, c)
        meta.append((name, 100 + i, 0.0, 1.0, 1, fold, i % 2, cls))
        expected.append((f'audio/fold{fold}/{name}', cls, str(fold)))
    write_csv(base / 'metadata/UrbanSound8K.csv',
              ['slice_file_name', 'fsID', 'start', 'end', 'salience', 'fold', 'classID', 'class'], meta)
    archive = tmp_path / 'UrbanSound8K.tar.gz'
    with tarfile.open(archive, 'w:gz') as t:
        t.add(base, arcname='UrbanSound8K')
    run('us8k', tmp_path / 'D', archive)
    check(tmp_path / 'D', 'us8k', expected, 'fold')
    assert not (tmp_path / 'D' / prep.WORK).exists()  # the unpacked members are removed


def mock_spc(root: Path, clips) -> list[tuple]:
    valid, test, expected = [], [], []
    for i, c in enumerate(clips[:9]):
        word = ['yes', 'no', 'up'][i % 3]
        name = f'{word}/{i:08x}_nohash_0.wav'
        put(root / name, c)
        split = ['train', 'valid', 'test'][i // 3]
        (valid if split == 'valid' else test if split == 'test' else []).append(name)
        expected.append((name, word, split))
    put(root / '_background_noise_/white_noise.wav', clips[0])  # not a word: left out
    (root / 'validation_list.txt').write_text('\n'.join(valid) + '\n')
    (root / 'testing_list.txt').write_text('\n'.join(test) + '\n')
    return expected


def test_spcv2_zip_and_spcv1_folder(tmp_path, clips):
    expected = mock_spc(tmp_path / 'spc', clips)
    archive = zip_folder(tmp_path / 'spc', tmp_path / 'speech_commands_v0.02.zip')
    run('spcv2', tmp_path / 'D2', archive, workers=2)  # zip members read in worker processes
    check(tmp_path / 'D2', 'spcv2', expected)
    run('spcv1', tmp_path / 'D1', tmp_path / 'spc')
    check(tmp_path / 'D1', 'spcv1', expected)


def test_vc1_with_iden_split(tmp_path, clips):
    lines, expected = [], []
    for i, c in enumerate(clips[:6]):
        spk, split = f'id1000{i % 2 + 1}', i // 2 + 1
        rel = f'{spk}/vid{i}/00001.wav'
        put(tmp_path / 'vox1/wav' / rel, c)
        lines.append(f'{split} {rel}')
        expected.append((f'wav/{rel}', spk, ['train', 'valid', 'test'][split - 1]))
    lines.append('3 id10003/gone/00001.wav')  # in the list, not in the source: a failure
    (tmp_path / 'iden_split.txt').write_text('\n'.join(lines) + '\n')
    r = run('vc1', tmp_path / 'D', tmp_path / 'vox1', split_files=[tmp_path / 'iden_split.txt'])
    check(tmp_path / 'D', 'vc1', expected)
    failures, _ = read_rows(tmp_path / 'D/datasets_failures.csv')
    assert len(failures) == 1 and 'gone/00001.wav' in failures[0][0] and 'not in the source' in failures[0][1]
    assert r.rows == 6


def test_voxforge_needs_and_uses_its_split_file(tmp_path, clips):
    rows, expected = [], []
    for i, c in enumerate(clips[:6]):
        name = f'speaker{i}-20080101-abc/wav/a000{i}.wav'
        put(tmp_path / 'vf' / name, c)
        rows.append((name, ['de', 'fr'][i % 2], ['train', 'valid', 'test'][i % 3]))
        expected.append(rows[-1])
    meta = write_csv(tmp_path / 'voxforge.csv', ['file_name', 'label', 'split'], rows)
    with pytest.raises(DatasetError, match='--split_file voxforge.csv'):
        run('voxforge', tmp_path / 'D', tmp_path / 'vf')
    run('voxforge', tmp_path / 'D', tmp_path / 'vf', split_files=[meta])
    check(tmp_path / 'D', 'voxforge', expected)


def test_cremad_shipped_split_and_gender(tmp_path, clips):
    # EVAR's evar/metadata/cremad.csv: speakers 1001 (test, Male), 1002 (train, Female), 1009 (valid, Female)
    picks = [('1001_DFA_ANG_XX.wav', 'ANG', 'test', 'Male'), ('1001_DFA_DIS_XX.wav', 'DIS', 'test', 'Male'),
             ('1002_DFA_ANG_XX.wav', 'ANG', 'train', 'Female'), ('1009_DFA_ANG_XX.wav', 'ANG', 'valid', 'Female'),
             ('1009_DFA_DIS_XX.wav', 'DIS', 'valid', 'Female')]
    for (name, *_), c in zip(picks, clips):
        put(tmp_path / 'CREMA-D/AudioWAV' / name, c)
    run('cremad', tmp_path / 'D', tmp_path / 'CREMA-D')
    check(tmp_path / 'D', 'cremad', [(n, e, s) for n, e, s, _ in picks])
    check(tmp_path / 'D', 'cremad_gender', [(n, g, s) for n, _, s, g in picks])


def test_gtzan_filtered_lists_and_au(tmp_path, clips):
    # jongpillee/music_dataset_split GTZAN_split: country.00030 test, country.00019 train, country.00000 valid;
    # jazz.00033 is in no list (a faulty clip): left out
    picks = [('country', '00030', 'test'), ('country', '00019', 'train'), ('country', '00000', 'valid'),
             ('blues', '00012', 'test'), ('jazz', '00033', None)]
    for (genre, n, _), c in zip(picks, clips):
        wav, sr = sf.read(str(c))
        out = tmp_path / 'genres' / genre / f'{genre}.{n}.au'
        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), wav, sr, format='AU', subtype='PCM_16')
    archive = tmp_path / 'genres.tar.gz'
    with tarfile.open(archive, 'w:gz') as t:
        t.add(tmp_path / 'genres', arcname='genres')
    run('gtzan', tmp_path / 'D', archive)
    check(tmp_path / 'D', 'gtzan', [(f'{g}/{g}.{n}.wav', g, s) for g, n, s in picks if s])


def test_nsynth_three_splits_and_derived_tasks(tmp_path, clips):
    expected = {'nsynth': [], 'nspitch': [], 'nsvelocity': []}
    for k, split in enumerate(['train', 'valid', 'test']):
        examples = {}
        for i, c in enumerate(clips[3 * k:3 * k + 3]):
            key = f'bass_synthetic_{k}{i:02d}-0{60 + i}-{25 * (i + 1)}'
            put(tmp_path / 'ns' / f'nsynth-{split}/audio/{key}.wav', c)
            fam = ['bass', 'guitar', 'keyboard'][i]
            examples[key] = {'instrument_family_str': fam, 'pitch': 60 + i, 'velocity': 25 * (i + 1), 'note': 1}
            name = f'nsynth-{split}/audio/{key}.wav'
            expected['nsynth'].append((name, fam, split))
            expected['nspitch'].append((name, str(60 + i), split))
            expected['nsvelocity'].append((name, str(25 * (i + 1)), split))
        (tmp_path / 'ns' / f'nsynth-{split}/examples.json').write_text(json.dumps(examples))
    run('nsynth', tmp_path / 'D', tmp_path / 'ns')
    for task, rows in expected.items():
        check(tmp_path / 'D', task, rows)


def test_surge_ogg_by_tone(tmp_path, clips):
    # EVAR's dataset_surge_tone_splits.csv: Argitoth Kick -> valid, Snare -> train
    tones = {'surge-patches-3rdparty-Argitoth-Drums-Kick-velocity64': 'valid',
             'surge-patches-3rdparty-Argitoth-Drums-Snare-velocity64': 'train'}
    expected = []
    for t, (tone, split) in enumerate(tones.items()):
        for i, c in enumerate(clips[2 * t:2 * t + 2]):
            wav, sr = sf.read(str(c))
            out = tmp_path / 'surge' / tone / f'{60 + i}.ogg'
            out.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(out), wav, sr, format='OGG', subtype='VORBIS')
            expected.append((f'{tone}/{60 + i}.wav', str(60 + i), split))
    run('surge', tmp_path / 'D', tmp_path / 'surge')
    check(tmp_path / 'D', 'surge', expected)


def test_fsd50k_multilabel(tmp_path, clips):
    base = tmp_path / 'fsd'
    dev, ev, expected = [], [], []
    for i, c in enumerate(clips[:6]):
        labels = 'Bark,Dog' if i % 2 else 'Rain'
        if i < 4:
            put(base / f'FSD50K.dev_audio/{100 + i}.wav', c)
            dev.append((100 + i, labels, '/m/x', ['train', 'val'][i % 2]))
            expected.append((f'FSD50K.dev_audio/{100 + i}.wav', labels, ['train', 'valid'][i % 2]))
        else:
            put(base / f'FSD50K.eval_audio/{200 + i}.wav', c)
            ev.append((200 + i, labels, '/m/x'))
            expected.append((f'FSD50K.eval_audio/{200 + i}.wav', labels, 'test'))
    write_csv(base / 'FSD50K.ground_truth/dev.csv', ['fname', 'labels', 'mids', 'split'], dev)
    write_csv(base / 'FSD50K.ground_truth/eval.csv', ['fname', 'labels', 'mids'], ev)
    run('fsd50k', tmp_path / 'D', base)
    check(tmp_path / 'D', 'fsd50k', expected)
    assert '"Bark,Dog"' in (tmp_path / 'D/fsd50k.csv').read_text()  # one quoted cell


def test_as20k_from_segment_csvs(tmp_path, clips):
    head = '# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=3, num_segs=3\n' \
           '# YTID, start_seconds, end_seconds, positive_labels\n'
    ids = ['--aE2O5G5WE', '-0BIyqJj9ZU', '-1nilez17Dg', '-2PDE7hUArE']
    bal = head + f'{ids[0]}, 0.000, 10.000, "/m/09x0r,/m/04rlf"\n{ids[1]}, 30.000, 40.000, "/m/0jbk"\n' \
                 f'{ids[3]}, 0.000, 10.000, "/m/0jbk"\n'
    ev = head + f'{ids[2]}, 0.000, 10.000, "/m/068hy"\n{ids[3]}, 0.000, 10.000, "/m/0jbk"\n'
    (tmp_path / 'balanced_train_segments.csv').write_text(bal)
    (tmp_path / 'eval_segments.csv').write_text(ev)
    put(tmp_path / 'as/balanced_train_segments/a' / f'{ids[0]}_0.wav', clips[0])
    put(tmp_path / 'as/balanced_train_segments' / f'{ids[1]}.wav', clips[1])
    put(tmp_path / 'as/eval_segments' / f'{ids[2]}.wav', clips[2])
    put(tmp_path / 'as/eval_segments' / f'{ids[3]}.wav', clips[3])  # listed in both: only eval's row matches
    run('as20k', tmp_path / 'D', tmp_path / 'as',
        split_files=[tmp_path / 'balanced_train_segments.csv', tmp_path / 'eval_segments.csv'])
    check(tmp_path / 'D', 'as20k', [
        (f'balanced_train_segments/a/{ids[0]}_0.wav', '/m/09x0r,/m/04rlf', 'train'),
        (f'balanced_train_segments/{ids[1]}.wav', '/m/0jbk', 'train'),
        (f'eval_segments/{ids[2]}.wav', '/m/068hy', 'test'), (f'eval_segments/{ids[3]}.wav', '/m/0jbk', 'test')])


# ----- failures, resume, bad input ---------------------------------------------------------------

def test_broken_file_is_reported_and_left_out(tmp_path, clips):
    expected = mock_esc50(tmp_path / 'src', clips)
    bad = tmp_path / 'src/ESC-50-master' / expected[3][0]
    bad.write_bytes(bad.read_bytes()[:200])  # cut short: the header promises more
    r = run('esc50', tmp_path / 'D', tmp_path / 'src')
    check(tmp_path / 'D', 'esc50', [e for i, e in enumerate(expected) if i != 3], 'fold')
    failures, header = read_rows(tmp_path / 'D/datasets_failures.csv')
    assert header == ['file', 'reason'] and len(failures) == 1 and failures[0][0] == str(bad)
    assert 'truncated' in failures[0][1] and not (tmp_path / 'D' / expected[3][0]).exists()
    assert json.loads((tmp_path / 'D/PREPARED.json').read_text())['failed'] == 1 and r.rows == 9
    shutil.copyfile(clips[3], bad)  # mended: a rerun does the one file
    r = run('esc50', tmp_path / 'D', tmp_path / 'src')
    assert (r.summary.done, r.summary.skipped, r.rows) == (1, 9, 10)
    assert not (tmp_path / 'D/datasets_failures.csv').exists()


def test_resume_after_interruption(tmp_path, clips, monkeypatch):
    expected = mock_esc50(tmp_path / 'src', clips)
    written = []
    real_write = prep._write

    def write_then_die(item, wav):
        if len(written) == 4:
            raise KeyboardInterrupt
        real_write(item, wav)
        written.append(item.key)

    monkeypatch.setattr(prep, '_write', write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run('esc50', tmp_path / 'D', tmp_path / 'src')
    dest = tmp_path / 'D'
    assert (dest / prep.STARTED).exists() and not (dest / 'PREPARED.json').exists()
    assert not (dest / 'esc50.csv').exists()
    (dest / 'audio/.1-1000-A-0.wav.x1.tmp.wav').write_bytes(b'half')  # what a killed write leaves
    with pytest.raises(DatasetError, match='holds the task'):  # an unfinished DEST is still esc50's
        run('us8k', dest, tmp_path / 'src')
    monkeypatch.setattr(prep, '_write', real_write)
    r = run('esc50', dest, tmp_path / 'src')
    assert (r.summary.done, r.summary.skipped, r.summary.removed_temporaries) == (6, 4, 1)
    check(dest, 'esc50', expected, 'fold')


def test_bad_input_is_one_line(tmp_path, clips, capsys):
    mock_esc50(tmp_path / 'src', clips)
    (tmp_path / 'empty').mkdir()
    bad_zip = tmp_path / 'bad.zip'
    data = (tmp_path / 'ok.zip')
    with zipfile.ZipFile(data, 'w') as z:
        z.writestr('ESC-50-master/meta/esc50.csv', 'filename,fold,category\n')
    bad_zip.write_bytes(data.read_bytes()[:-30])
    cases = [
        (['esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'empty')], 'meta/esc50'),
        (['esc50', str(tmp_path / 'D'), '--source', str(bad_zip)], 'bad.zip'),
        (['esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'src'), '--sample_rate', '22050'], '16000 or 32000'),
        (['esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'nope')], 'no such folder'),
        (['gtzan', str(tmp_path / 'D')], 'genres'),  # no download: says where and what layout
        (['vc1', str(tmp_path / 'D')], 'wav/<id>'),
        (['esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'src'), '--split_file', str(bad_zip)], 'takes none'),
        (['esc51', str(tmp_path / 'D'), '--source', str(tmp_path / 'src')], 'not a task'),
    ]
    for args, match in cases:
        assert main(['datasets', *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (args, err)
    assert not (tmp_path / 'D').exists()  # nothing written on bad input
    assert main(['datasets', 'esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'src'), '--workers', '0',
                 '--no_progress']) == 0
    before = sorted(p.name for p in (tmp_path / 'D').iterdir())
    assert main(['datasets', 'us8k', str(tmp_path / 'D'), '--source', str(tmp_path / 'src')]) == 2
    assert "holds the task 'esc50'" in capsys.readouterr().err
    assert main(['datasets', 'esc50', str(tmp_path / 'D'), '--source', str(tmp_path / 'src')]) == 0
    assert 'already prepared' in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / 'D').iterdir()) == before


def test_list_names_every_task(capsys):
    assert main(['datasets', '--list']) == 0
    out = capsys.readouterr().out
    for task in TASKS:
        assert f'\n{task}' in '\n' + out, task
    assert out.count('--source:') == len(TASKS) and 'downloads' in out


def test_linear_eval_reads_the_prepared_csv(tmp_path, clips):
    need(REC)
    base = tmp_path / 'src/ESC-50-master'
    meta = []
    # two classes, 60 clips: each fold's 10 % validation carve (EVAR's) can hold every class
    for i, c in enumerate(sorted(REC.glob('[0-1]_jackson_[1-3]?.wav'))[:60]):
        name = f'{i % 5 + 1}-{i}-A-{c.name[0]}.wav'
        put(base / 'audio' / name, c)
        meta.append((name, i % 5 + 1, c.name[0], f'digit{c.name[0]}', False, i, 'A'))
    write_csv(base / 'meta/esc50.csv', ['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take'], meta)
    dest = tmp_path / 'D'
    assert main(['datasets', 'esc50', str(dest), '--source', str(tmp_path / 'src'), '--workers', '0',
                 '--no_progress']) == 0
    ckpt = write_small_checkpoint(tmp_path / 'ckpt')
    out = tmp_path / 'eval'
    assert main(['linear-eval', '--weights', str(ckpt), '--task', 'esc50', '--data_dir', str(dest),
                 '--output_dir', str(out), '--cache_dir', str(tmp_path / 'cache'), '--seeds', '1', '--epochs', '5',
                 '--unit_sec', '1.0', '--no_baselines', '--no_figures', '--quiet']) == 0
    report = json.loads((out / 'report.json').read_text())
    assert sum(report['task']['clips'].values()) == 60
    assert len(report['model']['per_fold']) == 5


def test_download_when_no_source(tmp_path, clips, monkeypatch):
    """A task with a public archive downloads it (here a file:// URL standing in for GitHub's)."""
    import dataclasses

    from m2d.data.tasks import esc50

    expected = mock_esc50(tmp_path / 'src', clips)
    archive = zip_folder(tmp_path / 'src', tmp_path / 'master.zip')
    monkeypatch.setattr(esc50, 'SPEC', dataclasses.replace(esc50.SPEC, urls=(archive.as_uri(),)))
    r = prepare_task('esc50', tmp_path / 'D', workers=0, progress=False)
    check(tmp_path / 'D', 'esc50', expected, 'fold')
    assert r.rows == 10 and not (tmp_path / 'D' / prep.WORK).exists()  # the download is removed once prepared
    assert json.loads((tmp_path / 'D/PREPARED.json').read_text())['source'] == [archive.as_uri()]


def test_split_files_replace_the_shipped_lists(tmp_path, clips):
    for i, c in enumerate(clips[:4]):
        put(tmp_path / 'g/genres/rock' / f'rock.0000{i}.wav', c)
    lists = []
    for split, names in {'train': [0, 1], 'valid': [2], 'test': []}.items():
        lists.append(tmp_path / f'{split}_filtered.txt')
        lists[-1].write_text(''.join(f'rock/rock.0000{i}.wav\n' for i in names))
    run('gtzan', tmp_path / 'G', tmp_path / 'g', split_files=lists)
    check(tmp_path / 'G', 'gtzan', [('rock/rock.00000.wav', 'rock', 'train'), ('rock/rock.00001.wav', 'rock', 'train'),
                                    ('rock/rock.00002.wav', 'rock', 'valid')])
    with pytest.raises(DatasetError, match='train, valid and test'):
        run('gtzan', tmp_path / 'G2', tmp_path / 'g', split_files=lists[:2])
    put(tmp_path / 'c' / '1001_DFA_ANG_XX.wav', clips[0])
    put(tmp_path / 'c' / '1001_DFA_DIS_XX.wav', clips[1])
    own = write_csv(tmp_path / 'mine.csv', ['file_name', 'label', 'split'],
                    [('1001_DFA_ANG_XX.wav', 'ANG', 'train'), ('1001_DFA_DIS_XX.wav', 'DIS', 'valid')])
    run('cremad', tmp_path / 'C', tmp_path / 'c', split_files=[own])
    check(tmp_path / 'C', 'cremad', [('1001_DFA_ANG_XX.wav', 'ANG', 'train'), ('1001_DFA_DIS_XX.wav', 'DIS', 'valid')])
