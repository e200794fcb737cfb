"""`m2d superb stats`: the padded-batch statistic from audio, against a direct numpy computation; task splits."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d.audio import LogMelSpectrogram, load_audio
from m2d.cli import main
from m2d.superb import SuperbError
from m2d.superb.stats import folder_split, split_stats, task_split

LENGTHS = [16000, 7000, 12345, 3000, 16000, 9100, 500]


@pytest.fixture
def clips(tmp_path):
    """Seven 16 kHz clips of different lengths and loudness in a folder (one in a subfolder)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'clips'
    (folder / 'sub').mkdir(parents=True)
    for i, n in enumerate(LENGTHS):
        wav = (rng.standard_normal(n) * 0.05 * (i + 1)).clip(-1, 1).astype(np.float32)
        sf.write(folder / ('sub' if i == 3 else '') / f'c{i}.wav', wav, 16000)
    return folder


def direct(paths, batch_size, crop=None) -> tuple[float, float, int]:
    """numpy: zero-pad each batch to its longest, log-mel, pool every value in float64."""
    fe = LogMelSpectrogram()
    values = []
    for i in range(0, len(paths), batch_size):
        wavs = [load_audio(p, 16000) for p in paths[i:i + batch_size]]
        padded = np.zeros((len(wavs), max(map(len, wavs))), np.float32)
        for row, w in zip(padded, wavs):
            row[:len(w)] = w
        values.append(fe(torch.from_numpy(padded)).numpy().astype(np.float64).ravel())
    allv = np.concatenate(values)
    return allv.mean(), allv.std(), allv.size


@pytest.mark.parametrize('batch_size', [1, 3])
def test_folder_stats_equal_numpy(clips, batch_size):
    split = folder_split(clips, batch_size=batch_size, seed=5)
    assert sorted(d.path.name for d in split.draws) == [f'c{i}.wav' for i in range(7)]
    stats = split_stats(split, progress=False)
    mean, std, count = direct([d.path for d in split.draws], batch_size)
    assert stats['files'] == 7 and stats['values'] == count and stats['failed'] == 0
    assert stats['mean'] == pytest.approx(mean, rel=1e-12) and stats['std'] == pytest.approx(std, rel=1e-10)


def test_padding_changes_the_statistic(clips):
    unpadded = split_stats(folder_split(clips, batch_size=1), progress=False)
    padded = split_stats(folder_split(clips, batch_size=7), progress=False)
    assert padded['values'] == 7 * 80 * (1 + 16000 // 160) > unpadded['values']
    assert padded['mean'] < unpadded['mean'] - 0.5  # padding frames sit at log(eps) = -15.9


def test_max_files_unreadable_and_8k_files(clips, caplog):
    (clips / 'broken.wav').write_bytes(b'RIFF0000WAVEnothing')
    sf.write(clips / 'slow.wav', np.zeros(4000, np.float32) + 0.01, 8000)
    with caplog.at_level(logging.WARNING):
        stats = split_stats(folder_split(clips, batch_size=2), progress=False)
    assert stats['files'] == 8 and stats['failed'] == 1
    assert any('not 16 kHz' in r.getMessage() and 'slow.wav at 8000 Hz' in r.getMessage() for r in caplog.records)
    assert any('broken.wav' in r.getMessage() for r in caplog.records)
    assert split_stats(folder_split(clips, max_files=3), progress=False)['files'] == 3


def test_cli_prints_the_k_argument(clips, tmp_path, capsys):
    out_json = tmp_path / 'st.json'
    csv = tmp_path / 'list.csv'
    csv.write_text('file_name\n' + ''.join(f'clips/c{i}.wav\n' for i in (0, 1, 2)))
    assert main(['superb', 'stats', str(csv), '--ckpt', str(tmp_path / 'w.pth'), '--json', str(out_json),
                 '--no-progress', '--batch_size', '2']) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    saved = json.loads(out_json.read_text())
    assert last == f'-k {tmp_path / "w.pth"},{saved["mean"]},{saved["std"]}'
    assert saved['files'] == 3 and saved['batch_size'] == 2
    assert main(['superb', 'stats', str(tmp_path / 'nothing.txt')]) == 2
    assert 'nothing.txt: not a SUPERB task' in capsys.readouterr().err


# ----- the training splits of the tasks, from a fake s3prl tree ------------------------------------------------

def s3prl_tree(root, downstream, config: str):
    pkg = root / 's3prl'
    (pkg / 'downstream' / downstream).mkdir(parents=True)
    (pkg / 'run_downstream.py').touch()
    (pkg / 'downstream' / downstream / 'config.yaml').write_text(config)
    return pkg


def test_fluent_commands_train_split(clips, tmp_path):
    pytest.importorskip('yaml')
    data = tmp_path / 'fsc'
    (data / 'data').mkdir(parents=True)
    (data / 'wavs').symlink_to(clips)
    (data / 'data' / 'train_data.csv').write_text(
        ',path,speakerId,action\n' + ''.join(f'{i},wavs/c{i}.wav,s,act\n' for i in (0, 1, 2, 4)))
    s3prl_tree(tmp_path, 'fluent_commands', 'downstream_expert:\n  datarc:\n'
               f'    file_path: {data}\n    train_batch_size: 2\n')
    split = task_split('IC', tmp_path, seed=1)
    assert split.batch_size == 2
    assert sorted(d.path.name for d in split.draws) == ['c0.wav', 'c1.wav', 'c2.wav', 'c4.wav']
    stats = split_stats(split, progress=False)
    assert stats['mean'] == pytest.approx(direct([d.path for d in split.draws], 2)[0], rel=1e-12)
    assert len(task_split('fluent_commands', tmp_path, max_files=3).draws) == 3


def test_voxceleb1_split_and_crops(clips, tmp_path):
    pytest.importorskip('yaml')
    vox = tmp_path / 'vox'
    for part, i in (('dev', 0), ('dev', 1), ('test', 2)):
        (vox / part / 'wav' / f'id1000{i}' / 'v').mkdir(parents=True)
        (vox / part / 'wav' / f'id1000{i}' / 'v' / '00001.wav').symlink_to(clips / f'c{i}.wav')
    pkg = s3prl_tree(tmp_path, 'voxceleb1', 'downstream_expert:\n  datarc:\n'
                     f'    file_path: {vox}\n    meta_data: ./downstream/voxceleb1/split.txt\n'
                     '    train_batch_size: 8\n    max_timestep: 8000\n')
    (pkg / 'downstream' / 'voxceleb1' / 'split.txt').write_text(
        '1 id10000/v/00001.wav\n3 id10001/v/00001.wav\n1 id10002/v/00001.wav\n')
    split = task_split('SID', tmp_path)
    assert sorted(str(d.path.relative_to(vox)) for d in split.draws) == ['dev/wav/id10000/v/00001.wav',
                                                                          'test/wav/id10002/v/00001.wav']
    assert all(d.crop == 8000 for d in split.draws)
    stats = split_stats(split, progress=False)
    assert stats['values'] == 2 * 80 * (1 + 8000 // 160)  # c0 (16000) cropped to 8000, c2 (12345) too


def test_task_errors(tmp_path):
    with pytest.raises(SuperbError, match='run_downstream.py'):
        task_split('KS', tmp_path)
    pytest.importorskip('yaml')
    s3prl_tree(tmp_path, 'speech_commands', 'downstream_expert:\n  datarc:\n'
               '    speech_commands_root: /nonexistent/sc\n    batch_size: 32\n')
    with pytest.raises(SuperbError, match='speech_commands_root = /nonexistent/sc does not exist'):
        task_split('KS', tmp_path)


def test_speech_commands_split_as_s3prl(tmp_path, clips):
    """KS: s3prl's hash split (dev/test files left out), _unknown_ words, background-noise crops, gain -3 dB."""
    pytest.importorskip('yaml')
    sc = tmp_path / 'sc'
    names = [f'{h:08x}_nohash_0.wav' for h in range(0, 40 * 7919, 7919)]
    for word in ('yes', 'marvin'):
        (sc / word).mkdir(parents=True)
        for n in names:
            (sc / word / n).symlink_to(clips / 'c0.wav')
    (sc / '_background_noise_').mkdir()
    (sc / '_background_noise_' / 'noise.wav').symlink_to(clips / 'c0.wav')
    s3prl_tree(tmp_path, 'speech_commands', f'downstream_expert:\n  datarc:\n    speech_commands_root: {sc}\n'
               '    batch_size: 4\n')
    split = task_split('KS', tmp_path, max_files=300)
    assert len(split.draws) == 300 and split.batch_size == 4 and all(d.gain_db == -3.0 for d in split.draws)
    noise = [d for d in split.draws if d.path.parent.name == '_background_noise_']
    assert all(d.crop == 16000 for d in noise) and 50 < len(noise) < 150  # a third of the draws: balanced classes
    used = {d.path.name for d in split.draws if d.path.parent.name == 'yes'}
    assert 20 < len(used) < 40  # about 80 % of the 40 speakers are in the training part
    try:
        from s3prl.downstream.speech_commands.expert import split_dataset
    except ImportError:
        return
    train, _ = split_dataset(sc)
    assert used == {p.name for c, p in train if c == 'yes'}


def test_calcnorm_agrees_with_superb_stats(clips, small_ckpt, tmp_path):
    """The m2d_calcnorm upstream, fed the batches s3prl would feed, ends with the numbers of `m2d superb stats`."""
    from m2d.superb import CalcNormExpert

    split = folder_split(clips, batch_size=3, seed=2)
    stats = split_stats(split, progress=False)
    batches = [[torch.from_numpy(load_audio(d.path)) for d in split.draws[i:i + 3]] for i in range(0, 7, 3)]
    up = CalcNormExpert(str(small_ckpt), max_updates=len(batches), stats_file=str(tmp_path / 'calc.json'))
    with torch.no_grad(), pytest.raises(SystemExit):
        for batch in batches:
            up(batch)
    calc = json.loads((tmp_path / 'calc.json').read_text())
    assert calc['values'] == stats['values']
    assert calc['mean'] == pytest.approx(stats['mean'], rel=1e-12) and calc['std'] == pytest.approx(stats['std'], rel=1e-12)
