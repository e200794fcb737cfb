"""Zero-shot classification and text-audio retrieval evaluation (EVAR's protocol), with a stand-in CLAP
runtime defined here: its audio embedding is the energy of a clip in 8 frequency bands, its text
embedding the mean of per-word vectors where the word ``bandK`` points along band K. So a caption
naming the band of a tone is its nearest caption, and every expected result below is known by
construction (and recomputed independently where it is not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d.cli import main
from m2d.evaluate import captions as cap
from m2d.evaluate import clap_embed as clap_mod
from m2d.evaluate import retrieval, zeroshot
from m2d.errors import M2DError
from m2d.evaluate.tasks import Clip, Task

SR = 16000
BAND_EDGES = np.geomspace(100, 7000, 9)         # 8 bands
BAND_CENTRES = np.sqrt(BAND_EDGES[:-1] * BAND_EDGES[1:])


class StandInClap(torch.nn.Module):
    """encode_audio: energy per band (8-d, + 8 zeros); encode_text: mean of word vectors (16-d)."""

    sample_rate = SR
    bf16 = False

    def __init__(self):
        super().__init__()
        self.register_buffer('norm_stats', torch.tensor([-8.0, 4.0]))
        self.audio_proj = torch.nn.Identity()
        self.text_calls: list[list[str]] = []

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(wav.double(), dim=-1).abs() ** 2
        freqs = torch.fft.rfftfreq(wav.shape[-1], 1 / SR)
        bands = [spec[:, (freqs >= lo) & (freqs < hi)].sum(-1) for lo, hi in zip(BAND_EDGES[:-1], BAND_EDGES[1:])]
        e = torch.stack(bands, -1)
        return torch.cat([e / e.sum(-1, keepdim=True), torch.zeros_like(e)], -1).float()

    def encode_text(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        self.text_calls.append(list(texts))
        out = []
        for t in texts:
            vecs = []
            for word in t.lower().split():
                v = torch.zeros(16, dtype=torch.float64)
                if word.startswith('band') and word[4:].isdigit():
                    v[int(word[4:])] = 1.0
                else:  # other words: a small seeded vector in the unused half
                    g = torch.Generator().manual_seed(sum(map(ord, word)))
                    v[8:] = 0.01 * torch.rand(8, generator=g, dtype=torch.float64)
                vecs.append(v)
            out.append(torch.stack(vecs).mean(0))
        return torch.stack(out).float()


@pytest.fixture
def standin(monkeypatch):
    """Patch the CLAP loader of both evaluations to give the stand-in runtime; returns the list of loads."""
    loads = []

    def fake_load(weights, **kwargs):
        rt = StandInClap()
        loads.append((weights, kwargs, rt))
        return clap_mod.LoadedCLAP(Path(weights), rt, 'f' * 64, Path(weights).stem)

    monkeypatch.setattr(zeroshot, 'load_clap', fake_load)
    monkeypatch.setattr(retrieval, 'load_clap', fake_load)
    return loads


def tone(path: Path, band: int, seconds: float = 0.5) -> Path:
    t = np.arange(int(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * BAND_CENTRES[band] * t)).astype(np.float32), SR)
    return path


# ---------------------------------------------------------------------------------------------
# EVAR's captions


def test_evar_captions_per_task():
    # Expected values transcribed from nttcslab/eval-audio-repr zeroshot.py, class_to_caption(task, classes):
    # cremad's dict, gtzan "+ ' music'", nsynth "'the musical instrument sound of ' +", as: AudioSet
    # display names, then x.replace('_', ' ') + " can be heard" for every task.
    assert cap.class_to_caption('cremad', ['ANG', 'DIS', 'FEA', 'HAP', 'NEU', 'SAD']) == [
        'angry person talking can be heard', 'someone talking in disgust can be heard',
        'someone talking with a sense of fear can be heard', 'someone talking happily and joyfully can be heard',
        'someone talking calmly can be heard', 'someone talking sadly can be heard']
    assert cap.class_to_caption('gtzan', ['blues', 'hiphop']) == ['blues music can be heard',
                                                                  'hiphop music can be heard']
    assert cap.class_to_caption('nsynth', ['bass', 'keyboard']) == [
        'the musical instrument sound of bass can be heard', 'the musical instrument sound of keyboard can be heard']
    assert cap.class_to_caption('esc50', ['dog', 'crying_baby', 'vacuum_cleaner']) == [
        'dog can be heard', 'crying baby can be heard', 'vacuum cleaner can be heard']
    assert cap.class_to_caption('us8k', ['air_conditioner']) == ['air conditioner can be heard']
    assert cap.class_to_caption('fsd50k', ['Accelerating_and_revving_and_vroom']) == [
        'Accelerating and revving and vroom can be heard']
    assert cap.class_to_caption('spcv2', ['yes']) == ['yes can be heard']
    # AudioSet ids -> display names (m2d/resources/class_labels_indices.csv), for as20k as for EVAR's `as`
    assert cap.class_to_caption('as20k', ['/m/09x0r', '/m/0bt9lr']) == ['Speech can be heard', 'Dog can be heard']
    assert cap.class_to_caption('as', ['/m/09x0r']) == ['Speech can be heard']
    assert cap.class_to_caption(None, ['a_b']) == ['a b can be heard']


def test_caption_template_and_errors():
    assert cap.class_to_caption('gtzan', ['jazz'], 'the sound of {label}') == ['the sound of jazz music']
    assert cap.class_to_caption('esc50', ['dog'], '{}!') == ['dog!']
    with pytest.raises(ValueError, match='template'):
        cap.class_to_caption('esc50', ['dog'], 'no slot')
    with pytest.raises(ValueError, match='CREMA-D'):
        cap.class_to_caption('cremad', ['ANG', 'XYZ'])


# ---------------------------------------------------------------------------------------------
# scores: metrics on hand-made cases, folds pooled as EVAR


def _fold_task(labels_by_fold: dict[str, list[str]]) -> Task:
    clips = [Clip(Path(f'{f}_{i}.wav'), f'{f}_{i}', (lab,), 'train', f)
             for f, labs in labels_by_fold.items() for i, lab in enumerate(labs)]
    return Task('t', clips, sorted({c.labels[0] for c in clips}), False, 1.0, 'test')


def test_fold_scores_pool_predictions_like_evar():
    # fold 1: 3 clips all right; fold 2: 1 of 2 right; fold 3: 1 clip right.
    task = _fold_task({'1': ['a', 'b', 'a'], '2': ['a', 'b'], '3': ['b']})
    right = {'a': np.array([0.9, 0.1]), 'b': np.array([0.2, 0.8])}
    sim = {c.key: right[c.labels[0]] for c in task.clips}
    sim['2_1'] = right['a']  # a 'b' clip scored as 'a'
    folds = zeroshot.test_folds(task)
    assert [(f, [c.key for c in cs]) for f, cs in folds] == [('1', ['1_0', '1_1', '1_2']), ('2', ['2_0', '2_1']),
                                                              ('3', ['3_0'])]
    e = zeroshot.fold_scores(task, folds, sim)
    assert e['per_fold'] == [1.0, 0.5, 1.0]
    assert e['mean'] == pytest.approx(5 / 6)          # pooled: 5 of 6 clips (EVAR)
    assert e['fold_mean'] == pytest.approx(2.5 / 3)   # the plain mean over folds differs
    assert e['n_test'] == 6
    one = zeroshot.fold_scores(task, zeroshot.test_folds(task, '2'), sim)
    assert one['mean'] == 0.5 and one['per_fold'] == [0.5]


def test_accuracy_and_map_hand_made():
    single = Task('s', [Clip(Path(f'{i}.wav'), str(i), (lab,), 'test') for i, lab in enumerate('abca')],
                  ['a', 'b', 'c'], False, 1.0)
    scores = np.array([[0.9, 0.0, 0.1], [0.1, 0.5, 0.4], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1]])
    assert zeroshot.task_score(single, single.clips, scores) == 0.5  # clips 0 and 1 right
    multi = Task('m', [Clip(Path(f'{i}.wav'), str(i), labs, 'test') for i, labs in
                       enumerate([('x',), ('x', 'y'), ('y',), ('x',)])], ['x', 'y'], True, 1.0)
    s = np.array([[0.9, 0.1], [0.3, 0.8], [0.4, 0.2], [0.1, 0.7]])
    # class x: positives 0,1,3; ranking by score 0(.9)+, 2(.4)-, 1(.3)+, 3(.1)+ -> AP = (1/1 + 2/3 + 3/4) / 3
    # class y: positives 1,2; ranking 1(.8)+, 3(.7)-, 2(.2)+ -> AP = (1/1 + 2/3) / 2
    expect = ((1 + 2 / 3 + 3 / 4) / 3 + (1 + 2 / 3) / 2) / 2
    assert zeroshot.task_score(multi, multi.clips, s) == pytest.approx(expect)
    per = zeroshot.class_results(multi, multi.clips, s)
    assert per['x'] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3) and per['y'] == pytest.approx((1 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------
# recall@K on a hand-made similarity matrix


def test_recall_at_k_hand_made():
    # 3 clips; captions 0,1 -> clip 0, caption 2 -> clip 1, captions 3,4,5 -> clip 2
    owner = [0, 0, 1, 2, 2, 2]
    sim = np.array([  # rows: clips, columns: captions
        [0.9, 0.1, 0.3, 0.0, 0.5, 0.2],
        [0.2, 0.8, 0.7, 0.1, 0.6, 0.3],
        [0.1, 0.3, 0.9, 0.2, 0.4, 0.8],
    ])
    r = retrieval.retrieval_metrics(sim, owner, ks=(1, 2, 3))
    # text -> audio, rank of the own clip in each column: c0 [.9,.2,.1] -> 1; c1 [.1,.8,.3] -> 3 (clip 0 last);
    # c2 [.3,.7,.9] -> 2; c3 [0,.1,.2] -> 1; c4 [.5,.6,.4] -> 3; c5 [.2,.3,.8] -> 1
    t2a = r['text_to_audio']
    assert t2a['R@1'] == pytest.approx(100 * 3 / 6) and t2a['R@2'] == pytest.approx(100 * 4 / 6)
    assert t2a['R@3'] == 100.0 and t2a['queries'] == 6
    assert t2a['median_rank'] == 1.0  # floor(median([0,2,1,0,2,0]) = 0.5) + 1
    assert t2a['mean_rank'] == pytest.approx(np.mean([1, 3, 2, 1, 3, 1]))
    assert t2a['mAP@10'] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2 + 1 + 1 / 3 + 1) / 6)
    # audio -> text, best rank of any own caption in each row:
    # clip 0 row [.9,.1,.3,0,.5,.2]: caption 0 first -> 1 (caption 1 is 5th)
    # clip 1 row [.2,.8,.7,.1,.6,.3]: caption 2 is 2nd -> 2
    # clip 2 row [.1,.3,.9,.2,.4,.8]: caption 5 2nd, 4 3rd, 3 5th -> 2
    a2t = r['audio_to_text']
    assert a2t['R@1'] == pytest.approx(100 / 3) and a2t['R@2'] == 100.0 and a2t['queries'] == 3
    # mAP@10 (WavCaps' a2t): clip 0 ranks {1, 5}: (1/1 + 2/5) / 2; clip 1 {2}: (1/2) / 1; clip 2 {2, 3, 5}:
    # (1/2 + 2/3 + 3/5) / 3
    ap = [(1 + 2 / 5) / 2, 1 / 2, (1 / 2 + 2 / 3 + 3 / 5) / 3]
    assert a2t['mAP@10'] == pytest.approx(100 * np.mean(ap))


def test_recall_ties_rank_earlier_first():
    sim = np.array([[0.5, 0.5], [0.5, 0.5]])
    r = retrieval.retrieval_metrics(sim, [0, 1], ks=(1,))
    assert r['text_to_audio']['R@1'] == 50.0  # caption 1's clip 1 ties with clip 0, which comes first
    assert r['audio_to_text']['R@1'] == 50.0


def test_recall_matches_brute_force_on_random_matrix():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(7), [1, 2, 5, 3, 1, 4, 2])
    sim = rng.standard_normal((7, len(owner)))
    r = retrieval.retrieval_metrics(sim, owner, ks=(1, 5, 10))
    t2a_ranks = [list(np.argsort(-sim[:, j])).index(owner[j]) for j in range(len(owner))]
    a2t_ranks = [min(list(np.argsort(-sim[i])).index(j) for j in np.nonzero(owner == i)[0]) for i in range(7)]
    for k in (1, 5, 10):
        assert r['text_to_audio'][f'R@{k}'] == pytest.approx(100 * np.mean(np.array(t2a_ranks) < k))
        assert r['audio_to_text'][f'R@{k}'] == pytest.approx(100 * np.mean(np.array(a2t_ranks) < k))


# ---------------------------------------------------------------------------------------------
# the commands end to end, with the stand-in runtime


def _fold_csv_task(root: Path) -> Path:
    """band1 vs band5 tones, 3 folds of 6/2/4 clips; one band5 clip of fold 2 labeled band1."""
    rows, n = [], 0
    for fold, bands in (('1', [1, 5, 1, 5, 1, 5]), ('2', [1, 5]), ('3', [1, 5, 5, 1])):
        for b in bands:
            name = f'audio/{fold}-{n}.wav'
            tone(root / name, b)
            label = 'band1' if (fold == '2' and b == 5) else f'band{b}'
            rows.append(f'{name},{label},{fold}')
            n += 1
    (root / 'esc50.csv').write_text('file_name,label,fold\n' + '\n'.join(rows) + '\n')
    return root / 'esc50.csv'


def test_zeroshot_command_fold_task(tmp_path, standin, capsys):
    data = tmp_path / 'esc50'
    csv = _fold_csv_task(data)
    out = tmp_path / 'out'
    assert main(['zeroshot', '--weights', str(tmp_path / 'clap.pth'), '--csv', str(csv), '--data_dir', str(data),
                 '--output_dir', str(out), '--no_cache', '-q']) == 0
    report = json.loads((out / 'report.json').read_text())
    m = report['model']
    assert m['per_fold'] == [1.0, 0.5, 1.0]
    assert m['mean'] == pytest.approx(11 / 12)      # pooled over the 12 clips
    assert m['fold_mean'] == pytest.approx(2.5 / 3)
    assert report['metric'] == 'accuracy' and report['task']['folds'] == ['1', '2', '3']
    assert report['captions'] == {'band1': 'band1 can be heard', 'band5': 'band5 can be heard'}
    assert report['class_accuracy'] == {'band1': pytest.approx(6 / 7), 'band5': 1.0}  # the mislabeled clip
    # captions went to the text encoder, each once
    assert sorted(t for call in standin[0][2].text_calls for t in call) == ['band1 can be heard', 'band5 can be heard']
    md = (out / 'report.md').read_text()
    assert '91.67 %' in md and 'all folds pooled' in md
    assert 'accuracy 91.67 %' in capsys.readouterr().out


def test_zeroshot_csv_without_split_scores_every_clip(tmp_path, standin):
    data = tmp_path / 'mine'
    rows = []
    for i, b in enumerate([0, 3, 7, 3, 0]):
        tone(data / f'{i}.wav', b)
        rows.append(f'{i}.wav,band{b}')
    (data / 'labels.csv').write_text('file_name,label\n' + '\n'.join(rows) + '\n')
    task = zeroshot.load_zeroshot_task(csv=data / 'labels.csv', data_dir=data)
    assert len(task.split('test')) == 5
    report = zeroshot.zeroshot_eval(tmp_path / 'w.pth', task, tmp_path / 'o', template='a {label} tone',
                                    use_cache=False, progress=False)
    assert report['model']['mean'] == 1.0 and report['model']['n_test'] == 5
    assert report['captions']['band7'] == 'a band7 tone'
    # a split column with test rows only is enough: nothing is trained
    (data / 'test_only.csv').write_text('file_name,label,split\n0.wav,band0,test\n1.wav,band3,test\n')
    assert len(zeroshot.load_zeroshot_task(csv=data / 'test_only.csv', data_dir=data).split('test')) == 2


def test_zeroshot_several_weights_compared(tmp_path, standin):
    data = tmp_path / 'd'
    task = zeroshot.load_zeroshot_task(csv=_fold_csv_task(data), data_dir=data)
    weights = [tmp_path / 'a' / 'w.pth', tmp_path / 'b' / 'w.pth', tmp_path / 'v.pth']
    summary = zeroshot.zeroshot_eval(weights, task, tmp_path / 'cmp', use_cache=False, progress=False)
    assert [r['output_dir'] for r in summary['reports']] == [str(tmp_path / 'cmp' / s) for s in ('w-1', 'w-2', 'v')]
    # same-named files keep a row each (the second used to overwrite the first's)
    assert [row['name'] for row in summary['rows']] == ['w-1', 'w-2', 'v']
    assert all(row['results']['esc50']['mean'] == pytest.approx(11 / 12) for row in summary['rows'])
    md = (tmp_path / 'cmp' / 'summary.md').read_text()
    assert md.startswith('# Zero-shot classification summary') and 'Mean ± std' not in md
    with pytest.raises(M2DError, match='--weights: no weight file given'):
        zeroshot.zeroshot_eval([], task)


def test_zeroshot_embeddings_cached(tmp_path, standin):
    data = tmp_path / 'd'
    csv = _fold_csv_task(data)
    task = zeroshot.load_zeroshot_task(csv=csv, data_dir=data)
    kw = dict(cache_dir=str(tmp_path / 'cache'), progress=False)
    a = zeroshot.zeroshot_eval(tmp_path / 'w.pth', task, tmp_path / 'o1', **kw)
    b = zeroshot.zeroshot_eval(tmp_path / 'w.pth', task, tmp_path / 'o2', **kw)
    assert not a['timings']['audio_cached'] and b['timings']['audio_cached']
    assert a['model'] == b['model']


def test_zeroshot_suite_evar_with_published_rows(tmp_path, standin, capsys):
    root = tmp_path / 'data'
    _fold_csv_task(root / 'esc50')
    out = tmp_path / 'suite'
    assert main(['zeroshot', '--weights', str(tmp_path / 'clap.pth'), '--suite', 'evar', '--data_dir', str(root),
                 '--output_dir', str(out), '--no_cache', '-q']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['tasks'] == ['as20k', 'fsd50k', 'esc50', 'us8k', 'cremad', 'gtzan', 'nsynth']
    assert summary['rows'][0]['results']['esc50']['mean'] == pytest.approx(11 / 12)
    assert set(summary['gaps']) == {'as20k', 'fsd50k', 'us8k', 'cremad', 'gtzan', 'nsynth'}
    md = (out / 'summary.md').read_text()
    published = next(line for line in md.splitlines() if '(published)' in line)
    # Table 5 of the M2D-CLAP paper (Interspeech 2024): 27.24, 40.82, 75.45, 72.40, 17.73, 75.17, 23.39
    assert published.split('|')[2:9] == [' 27.2% ', ' 40.8% ', ' 75.5% ', ' 72.4% ', ' 17.7% ', ' 75.2% ', ' 23.4% ']
    assert 'Mean ± std over seeds' not in md and '91.7%' in md
    assert 'summary.md' in capsys.readouterr().out


def test_zeroshot_suite_entry_name_keeps_the_tasks_caption_wording(tmp_path, standin):
    # A suite entry named otherwise than its EVAR task still gets that task's wording (gtzan: "... music").
    data = tmp_path / 'g'
    (data / 'gtzan.csv').write_text(_fold_csv_task(data).read_text())
    suite = tmp_path / 'suite.toml'
    suite.write_text(f'[[task]]\nname = "genres"\ntask = "gtzan"\ndata_dir = "{data.as_posix()}"\n')
    summary = zeroshot.run_zeroshot_suite([tmp_path / 'w.pth'], suite, output_dir=tmp_path / 'o', use_cache=False,
                                          progress=False)
    assert summary['errors'] == {} and summary['tasks'] == ['genres']
    report = json.loads((tmp_path / 'o' / 'w' / 'genres' / 'report.json').read_text())
    assert report['captions'] == {'band1': 'band1 music can be heard', 'band5': 'band5 music can be heard'}


def test_zeroshot_command_errors(tmp_path, standin, capsys):
    assert main(['zeroshot', '--weights', 'w.pth', '--suite', 'evar']) == 2
    assert '--data_dir ROOT' in capsys.readouterr().err
    assert main(['zeroshot', '--weights', 'w.pth', '--task', 'esc50', '--data_dir', str(tmp_path)]) == 2
    assert 'm2d datasets esc50' in capsys.readouterr().err
    data = tmp_path / 'one'
    tone(data / 'a.wav', 1)
    (data / 'one.csv').write_text('file_name,label\na.wav,band1\n')
    assert main(['zeroshot', '--weights', 'w.pth', '--csv', str(data / 'one.csv'), '--data_dir', str(data)]) == 2
    assert 'at least two' in capsys.readouterr().err


def _caption_csv(root: Path, swap: bool = False) -> Path:
    """6 tones (bands 0-5), Clotho's shape (caption_1..caption_3); with `swap`, clip 0's third caption
    names band 4 and clip 2 has only two captions."""
    lines = ['file_name,caption_1,caption_2,caption_3,split']
    for b in range(6):
        tone(root / f'c{b}.wav', b)
        caps = [f'a band{b} tone', f'band{b} hum', f'some band{b} sound']
        if swap and b == 0:
            caps[2] = 'band4 sound'
        if swap and b == 2:
            caps[2] = ''
        lines.append(f'c{b}.wav,{",".join(caps)},test')
    tone(root / 'dev.wav', 6)
    lines.append('dev.wav,band6 x,band6 y,band6 z,train')
    (root / 'captions.csv').write_text('\n'.join(lines) + '\n')
    return root / 'captions.csv'


def test_read_caption_csv_shapes(tmp_path):
    wide = retrieval.read_caption_csv(_caption_csv(tmp_path / 'w'), tmp_path / 'w')
    assert wide.split == 'test' and len(wide.clips) == 6 and len(wide.captions) == 18
    assert list(wide.caption_clip[:4]) == [0, 0, 0, 1]
    # AudioCaps' shape: one row per caption
    root = tmp_path / 'long'
    for n in ('x.wav', 'y.wav'):
        tone(root / n, 2)
    (root / 'ac.csv').write_text('file_name,caption\nx.wav,one\ny.wav,two\nx.wav,three\n')
    long = retrieval.read_caption_csv(root / 'ac.csv', root)
    assert long.split is None and long.captions == ['one', 'two', 'three'] and list(long.caption_clip) == [0, 1, 0]
    (root / 'bad.csv').write_text('file_name,text\nx.wav,one\n')
    with pytest.raises(retrieval.RetrievalError, match='caption columns'):
        retrieval.read_caption_csv(root / 'bad.csv', root)
    (root / 'missing.csv').write_text('file_name,caption\nx.wav,one\nz.wav,two\n')
    with pytest.raises(retrieval.RetrievalError, match='z.wav'):
        retrieval.read_caption_csv(root / 'missing.csv', root)
    with pytest.raises(retrieval.RetrievalError, match='no split column'):
        retrieval.read_caption_csv(root / 'ac.csv', root, split='test')


def test_retrieval_command_end_to_end(tmp_path, standin, capsys):
    root = tmp_path / 'clean'
    out = tmp_path / 'r'
    assert main(['retrieval', '--weights', str(tmp_path / 'clap.pth'), '--captions', str(_caption_csv(root)),
                 '--data_dir', str(root), '--output_dir', str(out), '--no_cache', '-q']) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['data']['clips'] == 6 and report['data']['captions'] == 18  # the train row is left out
    for key in ('text_to_audio', 'audio_to_text'):
        assert report['results'][key]['R@1'] == 100.0 and report['results'][key]['median_rank'] == 1.0
    assert 'text->audio R@1 100.00' in capsys.readouterr().out
    assert '| text → audio | 100.00 |' in (out / 'report.md').read_text()


def test_retrieval_command_same_named_weights_get_their_own_folders(tmp_path, standin, capsys):
    # Two files named clap.pth: each report in its own numbered folder (the second used to overwrite the first).
    root = tmp_path / 'clean'
    out = tmp_path / 'r'
    weights = [str(tmp_path / 'a' / 'clap.pth'), str(tmp_path / 'b' / 'clap.pth')]
    assert main(['retrieval', '--weights', *weights, '--captions', str(_caption_csv(root)),
                 '--data_dir', str(root), '--output_dir', str(out), '--no_cache', '-q']) == 0
    assert [json.loads((out / sub / 'report.json').read_text())['weights'] for sub in ('clap-1', 'clap-2')] == weights
    assert not (out / 'clap').exists()


def test_retrieval_swapped_caption_matches_independent_ranking(tmp_path, standin):
    root = tmp_path / 'swap'
    data = retrieval.read_caption_csv(_caption_csv(root, swap=True), root)
    assert len(data.captions) == 17
    report = retrieval.evaluate_retrieval(tmp_path / 'w.pth', data, tmp_path / 'o', use_cache=False, progress=False)
    # independent: the stand-in's embeddings, cosine, ranks by sorting
    rt = StandInClap()
    wav = torch.stack([torch.from_numpy(sf.read(c.path, dtype='float32')[0]) for c in data.clips])
    a = torch.nn.functional.normalize(rt.encode_audio(wav).double(), dim=-1)
    t = torch.nn.functional.normalize(rt.encode_text(data.captions).double(), dim=-1)
    sim = (a @ t.T).numpy()
    t2a = [list(np.argsort(-sim[:, j], kind='stable')).index(data.caption_clip[j]) for j in range(17)]
    a2t = [min(list(np.argsort(-sim[i], kind='stable')).index(j) for j in np.nonzero(data.caption_clip == i)[0])
           for i in range(6)]
    r = report['results']
    assert r['text_to_audio']['R@1'] == pytest.approx(100 * np.mean(np.array(t2a) < 1))
    assert r['text_to_audio']['R@1'] == pytest.approx(100 * 16 / 17)  # 'band4 sound' finds clip 4
    assert r['audio_to_text']['R@1'] == pytest.approx(100 * np.mean(np.array(a2t) < 1))
    assert r['audio_to_text']['R@1'] == 100.0  # clip 0 still has two right captions
    assert r['text_to_audio']['R@5'] == pytest.approx(100 * np.mean(np.array(t2a) < 5))


# ---------------------------------------------------------------------------------------------
# the real audio side: a small M2D-CLAP stand-in checkpoint through load_clap and RuntimeM2D


def _clap_standin(folder: Path, with_proj: bool = True) -> Path:
    from conftest import write_small_checkpoint

    path = write_small_checkpoint(folder, name='m2d_clap_vit_tiny-80x208p16x16-240128')
    if with_proj:
        ckpt = torch.load(path, weights_only=False)
        g = torch.Generator().manual_seed(7)
        ckpt['model'].update({'audio_proj.0.weight': torch.randn(64, 64, generator=g) / 8,
                              'audio_proj.0.bias': torch.randn(64, generator=g) / 8,
                              'audio_proj.2.weight': torch.randn(16, 64, generator=g) / 8,
                              'audio_proj.2.bias': torch.randn(16, generator=g) / 8,
                              'logit_scale': torch.tensor(2.0)})
        torch.save(ckpt, path)
    return path


def test_clap_audio_embeddings_crop_pad_like_evar(tmp_path, monkeypatch):
    from m2d.runtime import RuntimeM2D

    # the text side is 27a's; here only its presence is needed, and encode_audio is encode_clap_audio
    monkeypatch.setattr(RuntimeM2D, 'encode_audio', RuntimeM2D.encode_clap_audio, raising=False)
    monkeypatch.setattr(RuntimeM2D, 'encode_text', lambda self, texts: torch.zeros(len(texts), 16), raising=False)
    loaded = clap_mod.load_clap(_clap_standin(tmp_path))
    assert loaded.name == 'm2d_clap_vit_tiny-80x208p16x16-240128_checkpoint-1' and len(loaded.sha256) == 64
    rng = np.random.default_rng(0)
    lengths = {'long': 3 * SR + 123, 'short': SR // 2, 'exact': 2 * SR}
    clips = []
    for name, n in lengths.items():
        sf.write(tmp_path / f'{name}.wav', (0.1 * rng.standard_normal(n)).astype(np.float32), SR)
        clips.append(Clip(tmp_path / f'{name}.wav', name, ('x',), 'test'))
    emb = clap_mod.audio_embeddings(loaded, clips, name='t', unit_sec=2.0, batch_size=2, use_cache=False,
                                    progress=False)
    assert emb.keys == ['long', 'short', 'exact'] and emb.x.shape == (3, 1, 16)
    rt = loaded.runtime
    for i, c in enumerate(clips):  # EVAR's BaseRawAudioDataset: crop from the start, or zero-pad on the right
        w = sf.read(c.path, dtype='float32')[0]
        unit = np.zeros(2 * SR, dtype=np.float32)
        unit[:min(len(w), 2 * SR)] = w[:2 * SR]
        with torch.inference_mode():
            expect = rt.encode_clap_audio(torch.from_numpy(unit)[None])[0].numpy()
        np.testing.assert_allclose(emb.x[i, 0], expect, rtol=1e-4, atol=1e-5)
    whole = clap_mod.audio_embeddings(loaded, clips[:1], name='t', unit_sec=None, use_cache=False, progress=False)
    with torch.inference_mode():
        expect = rt.encode_clap_audio(torch.from_numpy(sf.read(clips[0].path, dtype='float32')[0])[None])[0].numpy()
    np.testing.assert_allclose(whole.x[0, 0], expect, rtol=1e-4, atol=1e-5)


def test_text_embeddings_pass_the_text_batch_size_to_the_encoder():
    # --text_batch_size reaches RuntimeM2D.encode_text (it used to be capped by encode_text's own default of 64)
    class Recorder:
        def encode_text(self, texts, batch_size=64):
            self.seen = (len(texts), batch_size)
            return torch.ones(len(texts), 3, dtype=torch.float64)

    rt = Recorder()
    x = clap_mod.text_embeddings(rt, [f't{i}' for i in range(130)], batch_size=128)
    assert rt.seen == (130, 128) and x.shape == (130, 3) and x.dtype == np.float32


def test_load_clap_refuses_a_file_without_audio_proj(tmp_path):
    with pytest.raises(clap_mod.ClapEvalError, match='audio_proj'):
        clap_mod.load_clap(_clap_standin(tmp_path, with_proj=False))
