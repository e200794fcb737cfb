"""`m2d finetune`: augmentations, the EVAR head and file format, early stopping, reports, bad options."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FSDD, need, write_small_checkpoint
from m2d.checkpoint import load_checkpoint
from m2d.cli import main
from m2d.evaluate import finetune as ft
from m2d.evaluate.augment import mixup, random_resize_crop, spec_mask
from m2d.evaluate.tasks import load_clip, load_task
from m2d.runtime import RuntimeM2D

UNIT_SEC = 0.5


def write_fsdd_csv(folder, digits='012', speakers=('jackson', 'theo'), takes=8):
    """A small FSDD task: takes 0-1 test, 2 valid, the rest train."""
    lines = ['file_name,label,split']
    for d in digits:
        for spk in speakers:
            for take in range(takes):
                split = 'test' if take < 2 else 'valid' if take < 3 else 'train'
                lines.append(f'{d}_{spk}_{take}.wav,{d},{split}')
    path = folder / 'digits.csv'
    path.write_text('\n'.join(lines) + '\n')
    return path


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    need(FSDD)
    root = tmp_path_factory.mktemp('ft')
    return root, write_small_checkpoint(root), write_fsdd_csv(root)


@pytest.fixture(scope='module')
def run(setup):
    """One short fine-tune through the CLI: 3 epochs, training mask (flat features)."""
    root, ckpt, csv = setup
    out = root / 'out'
    rc = main(['finetune', '--weights', str(ckpt), '--csv', str(csv), '--data_dir', str(FSDD), '--unit_sec',
               str(UNIT_SEC), '--epochs', '3', '--batch_size', '8', '--lr', '0.05', '--warmup_epochs', '1',
               '--training_mask', '0.5', '--mixup', '0.3', '--rrc', 'True', '--seed', '0', '--quiet',
               '--output_dir', str(out)])
    assert rc == 0
    report = json.loads((out / 'report.json').read_text())
    return out, report


def script_scores(monkeypatch, scores):
    """Make the validation/test metric return `scores` in turn; returns the list of scored set sizes."""
    scripted, seen = iter(scores), []

    def fake_scores(logits, targets, multilabel):
        seen.append(len(logits))
        return next(scripted)

    for module in (ft.loop, ft.run):
        monkeypatch.setattr(module, 'evaluate_scores', fake_scores)
    return seen


# ---------------------------------------------------------------------------------------------
# augmentations


def test_mixup_permuted_partner_and_beta_lambdas():
    x = torch.randn(6, 100)
    y = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    xm, ym, lam = mixup(x, y, 0.3, np.random.default_rng(0))
    assert lam.shape == (6,) and bool(((lam >= 0) & (lam <= 1)).all())
    # EVAR's Mixup draws the λs, then np.random.permutation(B) for the partners
    draw = np.random.default_rng(0)
    assert np.allclose(draw.beta(0.3, 0.3, size=6), lam.numpy(), atol=1e-6)
    partner = draw.permutation(6)
    assert sorted(partner) == list(range(6)) and list(partner) != [5, 4, 3, 2, 1, 0]
    for b in range(6):
        assert torch.allclose(xm[b], lam[b] * x[b] + (1 - lam[b]) * x[partner[b]], atol=1e-6)
        assert torch.allclose(ym[b], lam[b] * y[b] + (1 - lam[b]) * y[partner[b]], atol=1e-6)
    assert torch.allclose(ym.sum(1), torch.ones(6), atol=1e-6)
    # Beta(0.3, 0.3): mean 1/2, variance 1/(4(2α+1)) = 0.156 (a uniform's is 0.083)
    big = mixup(torch.zeros(20000, 1), torch.zeros(20000, 1), 0.3, np.random.default_rng(1))[2]
    assert abs(float(big.mean()) - 0.5) < 0.02 and abs(float(big.var()) - 1 / 6.4) < 0.01
    same = mixup(x, y, 0.0)
    assert same[0] is x and same[1] is y and bool((same[2] == 1).all())
    with pytest.raises(ValueError, match='alpha'):
        mixup(x, y, -1)


def test_spec_mask_zeroes_one_band_per_axis_per_sample():
    lms = torch.randn(16, 1, 80, 101) + 5  # no zeros before masking
    out = spec_mask(lms, 30, 40, torch.Generator().manual_seed(0))
    assert out.shape == lms.shape
    zero = out == 0
    rows = zero.all(dim=3)[:, 0]   # [B, F] whole frequency rows zeroed
    cols = zero.all(dim=2)[:, 0]   # [B, T] whole time columns zeroed
    widths_f, widths_t = rows.sum(1), cols.sum(1)
    assert int(widths_f.max()) < 30 and int(widths_t.max()) < 40 and int(widths_f.max()) > 0
    for b in range(16):  # one contiguous band per axis, everything else untouched
        for band in (rows[b], cols[b]):
            idx = torch.nonzero(band)[:, 0]
            if len(idx):
                assert int(idx[-1] - idx[0]) + 1 == len(idx)
        keep = ~(rows[b][:, None] | cols[b][None, :])
        assert torch.equal(out[b, 0][keep], lms[b, 0][keep])
    assert len({int(w) for w in widths_f}) > 1  # drawn per sample
    assert torch.equal(spec_mask(lms, 0, 0), lms)


def _evar_rrc_one(lms, i, j, h, w, canvas=(1.0, 1.5)):
    """EVAR's RandomResizeCrop.forward_one with given crop parameters (the reference loop)."""
    c, fh, tw = lms.shape
    ch, cw = int(fh * canvas[0]), int(tw * canvas[1])
    area = torch.zeros(c, ch, cw)
    y, x = (ch - fh) // 2, (cw - tw) // 2
    area[:, y:y + fh, x:x + tw] = lms
    crop = area[:, i:i + h, j:j + w]
    return F.interpolate(crop[None], size=(fh, tw), mode='bicubic', align_corners=True)[0]


def test_random_resize_crop_matches_the_reference_crop():
    lms = torch.randn(8, 1, 80, 101)
    out = random_resize_crop(lms, torch.Generator().manual_seed(3))
    assert out.shape == lms.shape and torch.isfinite(out).all()
    # Redraw the same crop boxes and compare with the per-sample canvas/crop/interpolate of EVAR.
    u = torch.rand((4, 8), generator=torch.Generator().manual_seed(3)).double()
    ch, cw = 80, int(101 * 1.5)
    h = (u[0] * 0.9 + 0.6).mul(80).floor().clamp(1, ch)
    w = (u[1] * 0.9 + 0.6).mul(101).floor().clamp(1, cw)
    i = (u[2] * (ch - h + 1)).floor().clamp(max=ch - h)
    j = (u[3] * (cw - w + 1)).floor().clamp(max=cw - w)
    for b in range(8):
        ref = _evar_rrc_one(lms[b], int(i[b]), int(j[b]), int(h[b]), int(w[b]))
        # identical inside; the outermost rows/columns differ only in the bicubic taps beyond the crop
        assert torch.allclose(out[b, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-4)
    # A box equal to the input on a canvas of the input's size is the identity.
    same = random_resize_crop(lms, torch.Generator().manual_seed(0), canvas=(1.0, 1.0), scale=(1.0, 1.0))
    assert torch.allclose(same, lms, atol=1e-4)  # float32 grid coordinates


def test_training_mask_drops_patches_only_in_train_mode(small_ckpt):
    ckpt = load_checkpoint(small_ckpt)
    model = ft.FinetuneModel(ckpt, 3, training_mask=0.5)
    model.generator = torch.Generator().manual_seed(0)
    assert model.runtime.flat_features and model.head.norm.num_features == 64
    wav = torch.randn(4, 16000) * 0.1
    lms = model.runtime.normalize_batch(model.runtime.to_feature(wav))  # 101 frames: 5 x 6 patches
    visible = model._encode_masked(lms)
    assert visible.shape[0] == 4 and visible.shape[2] == 64 and 0 < visible.shape[1] < 30
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.features(wav), model.runtime.encode(wav).mean(1), atol=1e-6)
    stacked = ft.FinetuneModel(ckpt, 3, training_mask=0.0)
    assert not stacked.runtime.flat_features and stacked.head.norm.num_features == 5 * 64


def test_schedule_is_timms_cosine_with_warmup():
    assert ft.learning_rate(0.0, 1.0, 5, 200) == 0.0
    assert ft.learning_rate(2.5, 1.0, 5, 200) == pytest.approx(0.5)
    # after warmup the cosine counts from epoch 0 (timm's default, warmup_prefix=False)
    assert ft.learning_rate(5.0, 1.0, 5, 200) == pytest.approx(1e-7 + (1 - 1e-7) * 0.5 * (1 + np.cos(np.pi * 5 / 200)))
    assert ft.learning_rate(200, 1.0, 5, 200) == pytest.approx(1e-7)


@pytest.mark.parametrize('warmup', [2.0, 0.0])
def test_each_step_runs_at_the_rate_evar_set_after_the_step_before(warmup):
    """EVAR's _train: optimizer.step(), then scheduler.step(epoch + iter / iters); the scheduler starts at
    warmup_lr_init = 0 (or at the peak rate without warmup)."""
    s = ft.FinetuneSettings(lr=1.0, warmup_epochs=warmup, epochs=4)
    iters = 3
    current = 0.0 if warmup else s.lr
    used = []
    for epoch in range(s.epochs):
        for it in range(iters):
            used.append(current)  # the rate optimizer.step() runs with
            current = ft.learning_rate(epoch + it / iters, s.lr, s.warmup_epochs, s.epochs, s.min_lr)
    ours = [ft.step_learning_rate(k, iters, s) for k in range(s.epochs * iters)]
    assert ours == pytest.approx(used, abs=1e-12)
    if warmup:  # the first two steps both run at 0, the third at the schedule's first micro-epoch
        assert ours[:3] == pytest.approx([0.0, 0.0, 1 / (3 * warmup)])


def test_evar_loss_is_cross_entropy_over_classes():
    logits, y = torch.randn(5, 4), torch.eye(4)[torch.tensor([0, 1, 2, 3, 0])]
    assert ft.evar_loss(logits, y, False) == pytest.approx(float(F.cross_entropy(logits, y.argmax(1))) / 4, rel=1e-5)
    assert ft.evar_loss(logits, y, True) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y)))


# ---------------------------------------------------------------------------------------------
# the fine-tuned file


@pytest.mark.parametrize('training_mask', [0.0, 0.5])
def test_saved_file_gives_the_models_logits_in_runtime(tmp_path, small_ckpt, training_mask):
    ckpt = load_checkpoint(small_ckpt)
    model = ft.FinetuneModel(ckpt, 4, training_mask=training_mask, norm_stats=(-6.0, 3.5))
    with torch.no_grad():  # non-trivial head statistics and weights
        model.head.norm.running_mean.normal_()
        model.head.norm.running_var.uniform_(0.5, 2.0)
        model.head.mlp['mlp'][0].weight.normal_()
        for p in model.runtime.backbone.blocks[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    name = ft.model_name(ckpt)
    path = ft.checkpoint_path(tmp_path, name, 'my task')
    ft.save_checkpoint(ft.finetuned_state(model, list('abcd'), name, {'multilabel': False}), path)
    assert path.parent.name == 'm2d_vit_tiny-80x208p16x16p16k-my_task'
    raw = torch.load(path, map_location='cpu', weights_only=True)  # the reference's plain loader
    for k in ('module.ar.runtime.backbone.patch_embed.proj.weight', 'module.ar.runtime.backbone.pos_embed',
              'module.head.norm.running_mean', 'module.head.norm.running_var', 'module.head.mlp.mlp.0.weight',
              'module.head.mlp.mlp.0.bias', 'norm_stats'):
        assert isinstance(raw[k], torch.Tensor), k
    assert raw['classes'] == ['a', 'b', 'c', 'd'] and raw['norm_stats'].tolist() == [-6.0, 3.5]
    rt = RuntimeM2D(path, num_classes=4)
    assert rt.flat_features == (training_mask > 0) and rt.sample_rate == 16000
    wav = torch.randn(3, 24000) * 0.1
    with torch.no_grad():
        assert torch.allclose(rt(wav), model(wav), atol=1e-5)
    # the model name travels in the file: a renamed copy still loads with its geometry
    moved = tmp_path / 'renamed.pth'
    moved.write_bytes(path.read_bytes())
    assert load_checkpoint(moved).vit == ckpt.vit


def test_run_report_and_checkpoint(run):
    out, report = run
    for key in ('task', 'weights', 'settings', 'metric', 'test', 'model', 'best_epoch', 'curves', 'timings',
                'checkpoint', 'class_accuracy'):
        assert key in report, key
    assert report['metric'] == 'accuracy' and len(report['curves']) == 3 and 0 <= report['test'] <= 1
    assert report['settings']['training_mask'] == 0.5 and report['settings']['rrc'] is True
    assert report['settings']['mixup'] == 0.3 and report['settings']['norm_stats'] == [-8.0, 4.0]
    assert report['task']['counts'] == {'train': 30, 'valid': 6, 'test': 12}
    best = max(range(3), key=lambda e: (report['curves'][e]['valid_accuracy'], -e))
    assert report['best_epoch'] == best
    assert (out / 'report.md').is_file() and 'test accuracy' in (out / 'report.md').read_text()
    assert (out / 'learning_curves.png').stat().st_size > 1000 and (out / 'confusion_matrix.png').is_file()
    assert report['timings']['train_s'] > 0 and report['timings']['train_clips_per_s'] > 0


def test_checkpoint_reproduces_the_reported_test_score(setup, run):
    _, _, csv = setup
    out, report = run
    rt = RuntimeM2D(report['checkpoint'], num_classes=3)
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=UNIT_SEC)
    test = task.split('test')
    wav = torch.from_numpy(np.stack([load_clip(c.path, 16000, 8000) for c in test]))
    with torch.no_grad():
        pred = rt(wav).argmax(1).numpy()
    acc = float((pred == task.targets(test)).mean())
    assert acc == pytest.approx(report['test'])
    info = json.loads(torch.load(report['checkpoint'], weights_only=True)['m2d_finetune'])
    assert info['epoch'] == report['best_epoch'] and info['multilabel'] is False and info['unit_sec'] == UNIT_SEC


def test_early_stopping_keeps_the_best_validation_epoch(setup, tmp_path, monkeypatch):
    root, ckpt, csv = setup
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    seen = script_scores(monkeypatch, [0.2, 0.6, 0.4, 0.3, 0.1, 0.9])  # valid per epoch, then the test call
    report = ft.finetune(ckpt, task, tmp_path, epochs=10, patience=2, batch_size=10, lr=0.01, mixup=0.0,
                         rrc=False, progress=False)
    assert report['best_epoch'] == 1 and report['valid_best'] == 0.6
    assert report['epochs_run'] == 4 and report['early_stopped']   # epochs 2 and 3 without improvement
    assert seen == [6, 6, 6, 6, 12] and report['test'] == 0.1
    assert json.loads(torch.load(report['checkpoint'], weights_only=True)['m2d_finetune'])['epoch'] == 1


def test_multilabel_task_uses_map(tmp_path, small_ckpt):
    need(FSDD)
    lines = ['file_name,label,split']
    for d in '0123':
        for take in range(6):
            labels = f'{d};{"even" if int(d) % 2 == 0 else "odd"}'
            lines.append(f'{d}_theo_{take}.wav,"{labels}",{"test" if take < 2 else "valid" if take < 3 else "train"}')
    csv = tmp_path / 'ml.csv'
    csv.write_text('\n'.join(lines) + '\n')
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    assert task.multilabel
    report = ft.finetune(small_ckpt, task, tmp_path / 'out', epochs=1, batch_size=6, lr=0.01, progress=False)
    assert report['metric'] == 'mAP' and 0 < report['test'] <= 1 and 'valid_mAP' in report['curves'][0]
    assert json.loads(torch.load(report['checkpoint'], weights_only=True)['m2d_finetune'])['multilabel'] is True


# ---------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize('option, value, message', [
    ('lr', 0.0, '--lr 0.0'), ('batch_size', 1, '--batch_size 1'), ('epochs', 0, '--epochs 0'),
    ('optim', 'adam', '--optim adam'), ('mixup', -0.1, '--mixup'), ('training_mask', 1.0, '--training_mask 1.0'),
    ('freq_mask', -1, '--freq_mask'), ('patience', -2, '--patience'), ('norm_stats', '1,0', '--norm_stats'),
    ('norm_stats', 'x', '--norm_stats'), ('valid_fraction', 1.0, '--valid_fraction'),
    ('valid_fraction', 0.0, '--valid_fraction'), ('save_every', -1, '--save_every'),
    ('dur_frames', 0, '--dur_frames 0'), ('weighted_sampling', -1, '--weighted_sampling -1')])
def test_bad_settings_name_the_option(option, value, message):
    with pytest.raises(ft.FinetuneError, match=message):
        ft.FinetuneSettings(**{option: value}).check()


@pytest.mark.parametrize('extra, message', [
    (['--lr', '-1'], '--lr -1'), (['--training_mask', '1.5'], '--training_mask'),
    (['--norm_stats', 'a,b'], '--norm_stats'), (['--device', 'nonsense'], '--device'),
    (['--valid_fraction', '2'], '--valid_fraction 2.0'), (['--save_every', '-1'], '--save_every -1'),
    (['--fold', '3'], '--fold 3: '), (['--valid_fraction', '0.2'], 'has its own valid split'),
    (['--data_path', 'lms'], '--data_path lms and --data_dir'), (['--dur_frames', '-5'], '--dur_frames -5')])
def test_cli_bad_options_are_one_line_errors(setup, capsys, extra, message):
    root, ckpt, csv = setup
    rc = main(['finetune', '--weights', str(ckpt), '--csv', str(csv), '--data_dir', str(FSDD), '--epochs', '1',
               '--quiet', '--output_dir', str(root / 'bad'), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and err.startswith('m2d finetune: error:')


def test_cli_rrc_takes_a_value(capsys):
    import argparse

    from m2d.commands import finetune as cmd
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    base = ['--weights', 'w', '--task', 'fsdd-digits']
    assert parser.parse_args(base + ['--rrc', 'False']).rrc is False
    assert parser.parse_args(base + ['--rrc', 'True']).rrc is True
    assert parser.parse_args(base + ['--rrc']).rrc is True
    # the four command lines of the seed README, option for option
    evar = {'as20k': '--lr 1.0 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.3 --rrc True --seed 0',
            'esc50': '--lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.0 --rrc True --seed 0',
            'spcv2': '--lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.3 --rrc True --seed 0',
            'vc1': '--optim adamw --lr 0.001 --freq_mask 0 --time_mask 0 --training_mask 0.0 --mixup 0.0 --rrc False '
                   '--seed 0'}
    for line in evar.values():
        a = parser.parse_args(base + line.split())
        assert a.freq_mask == 0 and a.time_mask == 0 and a.seed == 0
    vc1 = parser.parse_args(base + evar['vc1'].split())
    assert vc1.optim == 'adamw' and vc1.lr == 0.001 and vc1.rrc is False and vc1.training_mask == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(base + ['--rrc', 'maybe'])
    capsys.readouterr()


@pytest.mark.slow  # about 35 s on 2 CPU cores, most of it writing and reading the 786 MB stand-in
def test_vit_base_stand_in_one_epoch(tmp_path, m2d_base_ckpt):
    """A ViT-Base-shaped released checkpoint stand-in: 1 epoch on 12 clips, loads back in RuntimeM2D."""
    need(FSDD)
    weights = m2d_base_ckpt
    csv = write_fsdd_csv(tmp_path, digits='01', speakers=('theo',), takes=6)
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.5)
    report = ft.finetune(weights, task, tmp_path / 'out', epochs=1, batch_size=4, lr=0.1, training_mask=0.5,
                         progress=False)
    assert report['model_name'] == 'm2d_vit_base-80x608p16x16p16k' and report['epochs_run'] == 1
    rt = RuntimeM2D(report['checkpoint'], num_classes=2)
    assert rt.feature_d == 768 and rt.norm_stats.tolist() == pytest.approx([-7.8, 4.6])


@pytest.mark.parametrize('source', ['safetensors', 'pretrain'])
def test_other_weight_files(setup, tmp_path, small_ckpt, source):
    """A safetensors export and a pre-training checkpoint (decoder and EMA target included) fine-tune too."""
    from m2d.checkpoint import export_encoder
    from m2d.models import create_model

    _, _, csv = setup
    if source == 'safetensors':
        weights = export_encoder(small_ckpt, tmp_path / 'exported.safetensors')
    else:
        model = create_model('m2d', img_size=(80, 208), patch_size=(16, 16), embed_dim=64, depth=1, num_heads=1,
                             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1, norm_stats=(-7.5, 4.1))
        weights = tmp_path / 'm2d_vit_tiny-80x208p16x16-run' / 'checkpoint-1.pth'
        weights.parent.mkdir()
        torch.save({'model': model.state_dict(), 'epoch': 1, 'step': 10}, weights)
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    report = ft.finetune(weights, task, tmp_path / 'out', epochs=1, batch_size=10, lr=0.01, progress=False)
    rt = RuntimeM2D(report['checkpoint'], num_classes=3)
    assert rt.cfg.input_size == (80, 208) and rt.norm_stats.tolist() == pytest.approx(report['settings']['norm_stats'])
    if source == 'pretrain':
        assert report['settings']['norm_stats'] == pytest.approx([-7.5, 4.1])
        assert not any(k.startswith(('module.ar.runtime.backbone.decoder', 'module.ar.runtime.backbone.target'))
                       for k in torch.load(report['checkpoint'], weights_only=True))


def test_unreadable_clips_are_skipped_and_reported(setup, tmp_path):
    _, ckpt, csv = setup
    data = tmp_path / 'audio'
    data.mkdir()
    for line in csv.read_text().splitlines()[1:]:
        (data / line.split(',')[0]).symlink_to(FSDD / line.split(',')[0])
    (data / '0_theo_5.wav').unlink()
    (data / '0_theo_5.wav').write_bytes(b'not audio')  # a train clip
    task = load_task(csv=csv, data_dir=data, unit_sec=0.3)
    report = ft.finetune(ckpt, task, tmp_path / 'out', epochs=1, batch_size=10, lr=0.01, progress=False)
    assert report['task']['counts']['train'] == 29 and len(report['skipped']['train']) == 1
    assert report['skipped']['train'][0]['path'].endswith('0_theo_5.wav')
    assert 'Skipped unreadable clips: train 1' in (tmp_path / 'out' / 'report.md').read_text()


def test_default_output_dir_and_report_without_matplotlib(run, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from m2d.evaluate.tasks import Task
    task = Task('fsdd-digits', [], ['0', '1'], False, 1.0)
    released = Path('cache/m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth')
    assert ft.default_output_dir(released, task) == Path(
        'eval/m2d_vit_base-80x608p16x16-221006-mr7_checkpoint-300/fsdd-digits/finetune')
    _, report = run
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # import fails as if not installed
    ft.write_report(report, tmp_path, np.eye(3, dtype=int))
    md = (tmp_path / 'report.md').read_text()
    assert 'matplotlib is not installed' in md and not (tmp_path / 'learning_curves.png').exists()
    assert json.loads((tmp_path / 'report.json').read_text())['test'] == report['test']


@pytest.mark.parametrize('optim, bf16', [('lars', False), ('adamw', True)])
def test_optimizers_and_bf16(setup, tmp_path, optim, bf16):
    _, ckpt, csv = setup
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    before = load_checkpoint(ckpt).encoder['blocks.0.attn.qkv.weight']
    report = ft.finetune(ckpt, task, tmp_path, epochs=1, batch_size=10, optim=optim, lr=0.01 if optim == 'lars' else 1e-3,
                         bf16=bf16, progress=False)
    after = load_checkpoint(report['checkpoint']).encoder['blocks.0.attn.qkv.weight']
    assert after.dtype == torch.float32 and not torch.equal(before, after)  # the encoder is trained too
    assert np.isfinite(report['curves'][0]['train_loss'])


def test_pretrain_then_finetune_then_predict(setup, tmp_path, capsys):
    """The whole path of a user: `m2d pretrain` -> `m2d finetune` on its checkpoint -> `m2d predict`."""
    from m2d.data.convert import convert

    _, _, csv = setup
    wav = tmp_path / 'wav'
    wav.mkdir()
    for f in sorted(FSDD.glob('*.wav'))[::150]:
        (wav / f.name).symlink_to(f)
    assert convert(wav, tmp_path / 'lms', workers=0, progress=False).exit_code == 0
    assert main(['pretrain', '--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1',
                 '--decoder_embed_dim', '64', '--decoder_num_heads', '2', '--input_size', '80x208', '--min_ds_size', '0',
                 '--feature_eval_freq', '0', '--csv_main', str(tmp_path / 'lms' / 'files.csv'), '--batch_size', '8',
                 '--epochs', '1', '--num_workers', '0', '--norm_stats_samples', '20',
                 '--output_root', str(tmp_path / 'runs'), '--device', 'cpu']) == 0
    (run,) = (tmp_path / 'runs').iterdir()
    ckpt = sorted(run.glob('checkpoint-*.pth'))[-1]
    out = tmp_path / 'ft'
    assert main(['finetune', '--weights', str(ckpt), '--csv', str(csv), '--data_dir', str(FSDD), '--unit_sec', '0.5',
                 '--epochs', '1', '--batch_size', '10', '--lr', '0.01', '--quiet', '--output_dir', str(out)]) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['model_name'].startswith('m2d_vit_tiny-80x208p16x16') and report['epochs_run'] == 1
    capsys.readouterr()
    assert main(['predict', str(FSDD / '2_theo_0.wav'), '--weights', report['checkpoint'], '--top', '1']) == 0
    label = capsys.readouterr().out.split('\t')[1].split()[0]
    assert label in ('0', '1', '2')


# ---------------------------------------------------------------------------------------------
# validation, folds, checkpoint writes


def no_valid_task(csv):
    """The small FSDD task with its valid clips moved to train: a task without a valid split (as a fold of a
    fold task is; `load_task` itself refuses a CSV whose valid split is empty)."""
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    clips = [dataclasses.replace(c, split='train') if c.split == 'valid' else c for c in task.clips]
    return dataclasses.replace(task, clips=clips)


def write_fold_csv(folder, folds=5):
    """EVAR's esc50.csv shape (file_name,label,fold): take t of each digit/speaker is in fold t+1."""
    lines = ['file_name,label,fold']
    for d in '01':
        for spk in ('jackson', 'theo'):
            for take in range(folds):
                lines.append(f'{d}_{spk}_{take}.wav,{d},{take + 1}')
    path = folder / 'folds.csv'
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_without_a_valid_split_the_test_split_validates_and_is_flagged(setup, tmp_path, monkeypatch):
    _, ckpt, csv = setup
    task = no_valid_task(csv)
    assert task.split('valid') == []
    seen = script_scores(monkeypatch, [0.2, 0.7, 0.5])
    report = ft.finetune(ckpt, task, tmp_path / 'out', epochs=3, batch_size=12, lr=0.01, mixup=0.0, rrc=False,
                         progress=False)
    # EVAR: valid_loader = test_loader, the result is the best epoch's score on it, with no further test pass
    assert seen == [12, 12, 12] and report['test'] == 0.7 and report['best_epoch'] == 1
    assert report['validation'] == {'split': 'test', 'fraction': None, 'optimistic': True}
    assert report['task']['counts'] == {'train': 36, 'valid': 12, 'test': 12}
    md = (tmp_path / 'out' / 'report.md').read_text()
    assert 'validated on the test split' in md and 'optimistic' in md and '--valid_fraction' in md


def test_valid_fraction_carves_a_stratified_part_of_train(setup, tmp_path):
    _, ckpt, csv = setup
    task = no_valid_task(csv)
    splits = ft.choose_splits(task, 0.25, seed=0)
    train, valid, test = ({c.key for c in x} for x in (splits.train, splits.valid, splits.test))
    assert splits.validation == 'carved' and not train & valid and train | valid == {c.key for c in task.split('train')}
    assert test == {c.key for c in task.split('test')} and len(valid) == 9  # 25 % of 12 train clips per class
    for clips in (splits.train, splits.valid):  # every class on both sides
        assert {c.labels[0] for c in clips} == set(task.classes)
    assert {c.key for c in ft.choose_splits(task, 0.25, seed=1).valid} != valid  # drawn by the seed
    report = ft.finetune(ckpt, task, tmp_path / 'out', epochs=1, batch_size=12, lr=0.01, valid_fraction=0.25,
                         progress=False)
    assert report['task']['counts'] == {'train': 27, 'valid': 9, 'test': 12}
    assert report['validation'] == {'split': 'carved', 'fraction': 0.25, 'optimistic': False}
    assert 'optimistic' not in (tmp_path / 'out' / 'report.md').read_text()
    with_valid = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    with pytest.raises(ft.FinetuneError, match='--valid_fraction 0.25: .* has its own valid split'):
        ft.choose_splits(with_valid, 0.25, seed=0)


def test_fold_task_runs_every_fold_and_averages(setup, tmp_path, monkeypatch):
    import m2d.audio
    import m2d.evaluate.tasks

    _, ckpt, csv = setup
    task = load_task(csv=write_fold_csv(tmp_path), data_dir=FSDD, unit_sec=0.3)
    reads = []
    for module in (m2d.audio, m2d.evaluate.tasks):
        real = module.load_audio
        monkeypatch.setattr(module, 'load_audio', lambda path, sr, real=real: reads.append(path) or real(path, sr))
    opts = dict(epochs=1, batch_size=8, lr=0.01, mixup=0.0, rrc=False, save_every=0, progress=False)
    out = tmp_path / 'out'
    report = ft.finetune(ckpt, task, out, **opts)
    assert report['task']['folds'] == ['1', '2', '3', '4', '5'] and len(report['model']['per_fold']) == 5
    assert report['test'] == pytest.approx(np.mean(report['model']['per_fold'])) == report['model']['mean']
    assert report['validation']['split'] == 'test'
    for k, run in zip('12345', report['fold_runs']):
        fold = json.loads((out / f'fold{k}' / 'report.json').read_text())
        assert run['fold'] == fold['fold'] == k and fold['test'] == run['test']
        assert fold['task']['counts'] == {'train': 16, 'valid': 4, 'test': 4}  # fold k is the test set
        assert (out / f'fold{k}').joinpath(*fold['checkpoint'].split('/')[-2:]).is_file()
    # each clip read once as a whole file (train) and once cropped (test), not once per fold
    assert len(reads) == 2 * 20 and len(set(map(str, reads))) == 20
    md = (out / 'report.md').read_text()
    assert 'mean over folds 1, 2, 3, 4, 5' in md and '| 5 |' in md
    one = ft.finetune(ckpt, task, tmp_path / 'one', fold='2', **opts)
    assert one['task']['folds'] == ['2'] and one['model']['per_fold'] == [pytest.approx(report['fold_runs'][1]['test'])]
    assert sorted(p.name for p in (tmp_path / 'one').iterdir() if p.is_dir()) == ['fold2']
    with pytest.raises(ft.FinetuneError, match='--fold 9'):
        ft.finetune(ckpt, task, tmp_path / 'bad', fold='9', **opts)
    with pytest.raises(ft.FinetuneError, match='--fold 1: .* no fold column'):
        ft.finetune(ckpt, no_valid_task(csv), tmp_path / 'bad', fold='1', **opts)


def test_cli_fold_and_valid_fraction(setup, tmp_path, capsys):
    root, ckpt, _ = setup
    need(FSDD)
    csv = write_fold_csv(tmp_path)
    common = ['finetune', '--weights', str(ckpt), '--task', 'esc50', '--csv', str(csv), '--data_dir', str(FSDD),
              '--unit_sec', '0.3',  # EVAR's task by name (its 5 s unit overridden to keep the test small)
              '--epochs', '1', '--batch_size', '8', '--lr', '0.01', '--fold', '2', '--quiet']
    assert main(common + ['--output_dir', str(tmp_path / 'a')]) == 0
    out = capsys.readouterr().out
    assert 'the mean over folds (2: ' in out and 'validated on test: optimistic' in out
    report = json.loads((tmp_path / 'a' / 'report.json').read_text())
    assert report['task']['folds'] == ['2'] and report['settings']['fold'] == '2' and report['task']['name'] == 'esc50'
    assert main(common + ['--valid_fraction', '0.25', '--output_dir', str(tmp_path / 'b')]) == 0
    assert 'validated on a carved part of train' in capsys.readouterr().out
    fold = json.loads((tmp_path / 'b' / 'fold2' / 'report.json').read_text())
    assert fold['task']['counts'] == {'train': 12, 'valid': 4, 'test': 4} and fold['validation']['split'] == 'carved'


@pytest.mark.parametrize('scores, save_every, writes, epoch', [
    ([0.1, 0.2, 0.3, 0.4, 0.5], 0, 1, 4),     # improving every epoch: one write, at the end
    ([0.1, 0.2, 0.3, 0.4, 0.5], 2, 3, 4),     # after epochs 1 and 3, then the end
    ([0.1, 0.5, 0.2, 0.3, 0.4], 2, 1, 1)])    # the best never changes after epoch 1's write
def test_best_weights_are_written_per_save_every_and_at_the_end(setup, tmp_path, monkeypatch, scores, save_every,
                                                               writes, epoch):
    _, ckpt, csv = setup
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.3)
    script_scores(monkeypatch, scores + [0.0])
    monkeypatch.setattr(ft.loop, 'train_epoch', lambda *a, **k: (0.0, 0.01))  # writes do not depend on training
    written = []
    real = ft.files.save_checkpoint
    monkeypatch.setattr(ft.files, 'save_checkpoint', lambda obj, path: written.append(
        json.loads(obj['m2d_finetune'])['epoch']) or real(obj, path))
    report = ft.finetune(ckpt, task, tmp_path, epochs=5, batch_size=10, lr=0.01, mixup=0.0, rrc=False,
                         save_every=save_every, progress=False)
    assert len(written) == writes == report['checkpoint_writes'] and written[-1] == epoch == report['best_epoch']
    folder = tmp_path / report['checkpoint'].split('/')[-2]
    assert [p.name for p in folder.iterdir()] == ['weights_best.pth']  # written atomically: no temporary left
    assert json.loads(torch.load(report['checkpoint'], weights_only=True)['m2d_finetune'])['epoch'] == epoch


# ---------------------------------------------------------------------------------------------
# the reference's runtime options, recipes, LARS, AudioSet weights (issue 28)


def test_masked_encoding_keeps_the_training_mask_patches(small_ckpt):
    """`_encode_masked` encodes exactly the patches of `structured_training_mask` (same draws)."""
    from m2d.masking import gather_tokens, structured_training_mask

    model = ft.FinetuneModel(load_checkpoint(small_ckpt), 3, training_mask=0.5)
    lms = torch.randn(3, 1, 80, 208)
    model.generator = torch.Generator().manual_seed(5)
    got = model._encode_masked(lms)
    bb = model.runtime.backbone
    x = bb.embed(lms)
    mask = structured_training_mask(3, (5, 13), 0.5, generator=torch.Generator().manual_seed(5))
    want = bb.run_blocks(torch.cat([bb.cls_with_pos(3), gather_tokens(x, mask.ids_keep)], dim=1))[:, 1:]
    assert torch.allclose(got, want, atol=1e-6)


def test_masked_encoding_of_a_unit_not_in_whole_patches_chunks_as_encode_lms(small_ckpt):
    """A 201-frame model (12 patches of 16 frames, as 1001 frames make 62) on 401 frames: one unit, then
    a remainder of 200 frames padded to 208 and cut to the unit's 192, as `encode_lms` cuts it (it
    used to keep 13 columns, and the position table has 12: a ValueError)."""
    from m2d.masking import gather_tokens, structured_training_mask

    ckpt = ft.checkpoint_for_frames(load_checkpoint(small_ckpt), 201)
    model = ft.FinetuneModel(ckpt, 3, training_mask=0.5)
    lms = torch.randn(2, 1, 80, 401)
    model.generator = torch.Generator().manual_seed(3)
    got = model._encode_masked(lms)
    bb, gen, want = model.runtime.backbone, torch.Generator().manual_seed(3), []
    for chunk in (lms[..., :192], lms[..., 201:393]):
        mask = structured_training_mask(2, (5, 12), 0.5, generator=gen)
        x = gather_tokens(bb.embed(chunk), mask.ids_keep)
        want.append(bb.run_blocks(torch.cat([bb.cls_with_pos(2), x], dim=1))[:, 1:])
    assert torch.allclose(got, torch.cat(want, dim=1), atol=1e-6)


def _bicubic_time(grid: np.ndarray, new_t: int, a: float = -0.75) -> np.ndarray:
    """Independent bicubic resampling along the last-but-one axis of ``[F, T, D]`` (Keys' kernel with
    a = -0.75, half-pixel centres, edge taps clamped: torch's ``bicubic`` with align_corners=False)."""
    def kernel(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0
    T = grid.shape[1]
    out = np.zeros((grid.shape[0], new_t, grid.shape[2]))
    for j in range(new_t):
        x = (j + 0.5) * T / new_t - 0.5
        x0 = int(np.floor(x))
        for k in range(x0 - 1, x0 + 3):
            out[:, j] += kernel(x - k) * grid[:, min(max(k, 0), T - 1)]
    return out


@pytest.mark.parametrize('dur_frames', [101, 51, 208, 501])
def test_dur_frames_trims_or_resamples_pos_embed(small_ckpt, dur_frames):
    ckpt = load_checkpoint(small_ckpt)
    pos = ckpt.encoder['pos_embed']  # [1, 1 + 5*13, 64]
    new = ft.checkpoint_for_frames(ckpt, dur_frames)
    n = dur_frames // 16
    assert new.vit.input_size == (80, dur_frames) and new.encoder['pos_embed'].shape == (1, 1 + 5 * n, 64)
    got = new.encoder['pos_embed'][0].numpy()
    assert np.array_equal(got[0], pos[0, 0].numpy())  # the cls position is kept
    grid = pos[0, 1:].numpy().reshape(5, 13, 64)
    if n <= 13:  # trimmed: patch (f, t) keeps its position
        want = np.stack([[grid[f, t] for t in range(n)] for f in range(5)])
        assert np.array_equal(got[1:].reshape(5, n, 64), want)
    else:  # resampled in time only, bicubically
        assert np.allclose(got[1:].reshape(5, n, 64), _bicubic_time(grid.astype(np.float64), n), atol=1e-5)
    assert ckpt.encoder['pos_embed'] is pos  # the loaded checkpoint is left as it was
    model = ft.FinetuneModel(ckpt, 3, dur_frames=dur_frames)
    assert ft.model_name(new).startswith(f'm2d_vit_tiny-80x{dur_frames}p16x16')
    model.eval()
    with torch.no_grad():  # inputs cropped/padded to dur_frames: 3 s and 0.2 s give n time patches
        for seconds in (3.0, 0.2):
            wav = torch.randn(2, int(16000 * seconds)) * 0.1
            lms = model.log_mel(wav)
            assert lms.shape[-1] == dur_frames
            assert model.runtime.encode_lms(model.runtime.normalize_batch(lms)).shape[1] == n
    with pytest.raises(ValueError, match='--dur_frames 8'):
        ft.checkpoint_for_frames(ckpt, 8)


def test_dur_frames_and_freeze_embed_through_a_run(setup, tmp_path):
    """--dur_frames 301 (pos_embed resampled 13 -> 18 columns) and --freeze_embed: the patch embedding
    is bit-identical after training while the blocks moved; the saved file loads at 80x301."""
    _, ckpt, csv = setup
    task = load_task(csv=csv, data_dir=FSDD, unit_sec=0.5)
    enc = load_checkpoint(ckpt).encoder
    report = ft.finetune(ckpt, task, tmp_path, epochs=2, batch_size=8, lr=0.05, warmup_epochs=1, dur_frames=301,
                         freeze_embed=True, training_mask=0.5, progress=False)
    assert report['settings']['dur_frames'] == 301 and report['settings']['freeze_embed'] is True
    assert 'dur_frames=301,freeze_embed=True' in report['reference_command']
    saved = load_checkpoint(report['checkpoint'])
    assert saved.vit.input_size == (80, 301) and '80x301' in report['checkpoint']
    assert torch.equal(saved.encoder['patch_embed.proj.weight'], enc['patch_embed.proj.weight'])
    assert torch.equal(saved.encoder['patch_embed.proj.bias'], enc['patch_embed.proj.bias'])
    assert not torch.equal(saved.encoder['blocks.0.attn.qkv.weight'], enc['blocks.0.attn.qkv.weight'])
    rt = RuntimeM2D(report['checkpoint'], num_classes=len(task.classes)).eval()
    assert rt.cfg.input_size == (80, 301) and rt.flat_features


def test_freeze_embed_excludes_the_patch_embedding_from_the_optimizer(small_ckpt):
    model = ft.FinetuneModel(load_checkpoint(small_ckpt), 3, freeze_embed=True)
    before = {k: v.clone() for k, v in model.runtime.backbone.patch_embed.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model.runtime.backbone.patch_embed.proj.weight for p in params)
    opt = ft.make_optimizer(params, ft.FinetuneSettings(optim='adamw', lr=1e-2))
    model.train()
    for _ in range(2):
        loss = model(torch.randn(4, 8000) * 0.1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.runtime.backbone.patch_embed.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lars_is_timms_lars_by_hand():
    w0, g1, g2 = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 1.0]])
    # EVAR's settings (momentum 0.9, weight decay 0): no trust ratio, momentum SGD (buffer = first gradient).
    p = torch.nn.Parameter(w0.clone())
    opt = ft.LARS([p], lr=0.5, momentum=0.9)
    p.grad = g1.clone()
    opt.step()
    assert torch.allclose(p.data, torch.tensor([[3.0 - 0.5 * 0.6, 4.0 - 0.5 * 0.8]]))
    p.grad = g2.clone()
    opt.step()  # buffer 0.9 * [0.6, 0.8] + [0, 1] = [0.54, 1.72]
    assert torch.allclose(p.data, torch.tensor([[2.7 - 0.5 * 0.54, 3.6 - 0.5 * 1.72]]))
    # With weight decay 0.1: ratio = 0.001 * |w| / (|g| + 0.1 |w| + 1e-8) = 0.001 * 5 / (1 + 0.5)
    p = torch.nn.Parameter(w0.clone())
    opt = ft.LARS([p], lr=2.0, momentum=0.9, weight_decay=0.1)
    p.grad = g1.clone()
    opt.step()
    r = 0.001 * 5.0 / (1.0 + 0.5 + 1e-8)
    d = [(0.6 + 0.1 * 3.0) * r, (0.8 + 0.1 * 4.0) * r]
    assert torch.allclose(p.data, torch.tensor([[3.0 - 2.0 * d[0], 4.0 - 2.0 * d[1]]]))
    assert torch.equal(p.grad, g1)  # the gradient is left as it was
    # A zero weight norm gives ratio 1; biases are treated like weights (no ndim exclusion).
    b = torch.nn.Parameter(torch.zeros(2))
    opt = ft.LARS([b], lr=1.0, weight_decay=0.1)
    b.grad = torch.tensor([1.0, 2.0])
    opt.step()
    assert torch.allclose(b.data, torch.tensor([-1.0, -2.0]))
    # make_optimizer('lars') is EVAR's: momentum 0.9, weight decay 0.
    group = ft.make_optimizer([torch.nn.Parameter(w0.clone())], ft.FinetuneSettings(optim='lars')).param_groups[0]
    assert (group['momentum'], group['weight_decay'], group['always_adapt']) == (0.9, 0.0, False)


# The settings each script passes (nttcslab/m2d util/ft-*.sh), and config/m2d.yaml for the rest.
SCRIPT_SETTINGS = {
    'as2m': dict(dur_frames=1001, freeze_embed=False, lr=2.0, freq_mask=30, time_mask=192, training_mask=0.5,
                 mixup=0.5, rrc=False, epochs=70, warmup_epochs=15.0, optim='lars', batch_size=64,
                 weighted_sampling=200000, patience=0),
    'as20k': dict(dur_frames=1001, freeze_embed=False, lr=0.5, freq_mask=30, time_mask=192, training_mask=0.5,
                  mixup=0.3, rrc=True, epochs=200, warmup_epochs=5.0, optim='sgd', batch_size=64,
                  weighted_sampling=0, patience=0),
    'esc50': dict(dur_frames=501, freeze_embed=True, lr=0.5, freq_mask=15, time_mask=48, training_mask=0.5,
                  mixup=0.0, rrc=True, epochs=200, warmup_epochs=5.0, optim='sgd', batch_size=128,
                  weighted_sampling=0, patience=0),
    'spcv2': dict(dur_frames=None, freeze_embed=False, lr=0.5, freq_mask=30, time_mask=48, training_mask=0.5,
                  mixup=0.3, rrc=True, epochs=200, warmup_epochs=5.0, optim='sgd', batch_size=128,
                  weighted_sampling=0, patience=0),
    'vc1': dict(dur_frames=821, freeze_embed=False, lr=0.0005, freq_mask=30, time_mask=48, training_mask=0.0,
                mixup=0.0, rrc=False, epochs=50, warmup_epochs=5.0, optim='adamw', batch_size=64,
                weighted_sampling=0, patience=0),
}
SCRIPT_LINES = {  # the command line of each script, with weight W and seed 43
    'as2m': 'python finetune.py config/m2d.yaml as weight_file=W,encoder_only=True,dur_frames=1001 --optim lars '
            '--lr=2 --freq_mask 30 --time_mask 192 --training_mask 0.5 --mixup 0.5 --rrc False --epochs 70 '
            '--warmup_epochs 15 --batch_size 64 --data_path ../data/audioset_lms --seed 43',
    'esc50': 'python finetune.py config/m2d.yaml esc50 weight_file=W,encoder_only=True,dur_frames=501,'
             'freeze_embed=True --lr=0.5 --freq_mask 15 --time_mask 48 --training_mask 0.5 --mixup 0 --rrc True '
             '--epochs 200 --warmup_epochs 5 --batch_size 128 --seed 43',
}


@pytest.mark.parametrize('name', list(SCRIPT_SETTINGS))
def test_each_recipe_is_its_scripts_settings(name):
    s = ft.apply_recipe(name, {})
    assert s.recipe == name
    assert {k: getattr(s, k) for k in SCRIPT_SETTINGS[name]} == SCRIPT_SETTINGS[name]
    assert ft.get_recipe(name).task == {'as2m': 'as', 'spcv2': 'spcv2'}.get(name, name)
    s.check()
    if name in SCRIPT_LINES:
        s = dataclasses.replace(s, seed=43)
        path = '../data/audioset_lms' if name == 'as2m' else None
        assert ft.evar_command_line(ft.get_recipe(name).task, 'W', s, path) == SCRIPT_LINES[name]


def test_explicit_options_override_a_recipe(capsys):
    import argparse

    from m2d.commands import finetune as cmd
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(['--weights', 'w', '--recipe', 'esc50', '--lr', '0.1', '--freeze_embed', 'False',
                              '--dur_frames', '401'])
    s = cmd.settings_from_args(args)
    assert (s.lr, s.freeze_embed, s.dur_frames) == (0.1, False, 401)  # given
    assert (s.freq_mask, s.time_mask, s.training_mask, s.mixup, s.recipe) == (15, 48, 0.5, 0.0, 'esc50')  # recipe's
    plain = cmd.settings_from_args(parser.parse_args(['--weights', 'w', '--task', 'esc50']))
    assert plain == ft.FinetuneSettings(progress=True)  # no recipe: the defaults (EVAR's m2d.yaml)
    with pytest.raises(SystemExit):
        parser.parse_args(['--weights', 'w', '--recipe', 'nope'])
    help_text = parser.format_help()
    for name, recipe in ft.RECIPES.items():
        assert name in help_text and recipe.script in help_text
    capsys.readouterr()


def test_recipe_run_reports_the_recipe_and_the_reference_command(setup, tmp_path, capsys):
    root, ckpt, csv = setup
    out = tmp_path / 'out'
    rc = main(['finetune', '--recipe', 'spcv2', '--weights', str(ckpt), '--csv', str(csv), '--data_dir', str(FSDD),
               '--unit_sec', '0.3', '--epochs', '1', '--batch_size', '8', '--quiet', '--output_dir', str(out)])
    assert rc == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['recipe'] == {'name': 'spcv2', 'script': 'util/ft-spc.sh', 'task': 'spcv2'}
    assert report['settings']['lr'] == 0.5 and report['settings']['time_mask'] == 48
    # the recipe's EVAR task names the task (its CSV given with --csv)
    assert report['reference_command'].startswith('python finetune.py config/m2d.yaml spcv2 weight_file=')
    assert '--epochs 1 ' in report['reference_command'] and '--batch_size 8 ' in report['reference_command']
    md = (out / 'report.md').read_text()
    assert 'recipe: `spcv2`' in md and report['reference_command'] in md
    assert 'util/ft-spc.sh' in capsys.readouterr().out


def test_audioset_weights_by_hand():
    """EVAR's weight_as.csv formula on 5 clips of labels a, b, c (counts a 3, b 2, c 1)."""
    clips = [['a'], ['a', 'b'], ['b', 'c'], ['a'], []]
    index = {'a': 0, 'b': 1, 'c': 2}
    ids = np.array([index[x] for c in clips for x in c])
    ends = np.cumsum([len(c) for c in clips])
    for offset in (0.01, 100.0):  # EVAR's make_as_metadata.py; m2d's make_as_weighted_list.py
        w = {k: 1000.0 / (n + offset) for k, n in {'a': 3, 'b': 2, 'c': 1}.items()}
        want = [sum(w[x] for x in c) ** (1 / 1.5) for c in clips]
        got = ft.audioset_sample_weights(ids, ends, offset)
        assert np.allclose(got, want, rtol=1e-12)
    assert np.allclose(ft.audioset_sample_weights(ids, ends)[:4],
                       [(1000 / 3.01) ** (2 / 3), (1000 / 3.01 + 1000 / 2.01) ** (2 / 3),
                        (1000 / 2.01 + 1000 / 1.01) ** (2 / 3), (1000 / 3.01) ** (2 / 3)])


def test_weighted_epochs_draw_without_replacement_by_weight():
    weights = np.array([1.0, 1.0, 1.0, 1000.0, 1000.0, 1000.0])
    draws = [list(ft.WeightedEpochSampler(weights, 3, torch.Generator().manual_seed(s))) for s in range(20)]
    assert all(len(set(d)) == 3 for d in draws)  # without replacement
    assert sum(set(d) == {3, 4, 5} for d in draws) >= 18  # the heavy clips nearly always
    assert len(ft.WeightedEpochSampler(weights, 10, torch.Generator())) == 6  # capped at the list


def test_clip_data_holds_numpy_buffers_and_reads_npy_log_mel(tmp_path):
    """Clip names in a PathTable, labels as numpy arrays; .npy log-mel clips cropped/padded in frames."""
    from m2d.data.pathtable import PathTable

    for i, t in enumerate((1200, 700)):
        np.save(tmp_path / f'{i}.npy', np.full((1, 80, t), float(i), dtype=np.float32))
    data = ft.ClipData(PathTable.from_names([str(tmp_path / '0.npy'), str(tmp_path / '1.npy')]),
                       np.array([2, 0, 1]), np.array([1, 3]), 3, 16000, 160000, True, None, unit_frames=1001)
    assert isinstance(data.paths, PathTable) and data.label_ids.dtype == np.int32
    x0, y0 = data[0]
    x1, y1 = data[1]
    assert x0.shape == x1.shape == (80, 1001)
    assert y0.tolist() == [0, 0, 1] and y1.tolist() == [1, 1, 0]
    assert float(x1[:, 699].min()) == 1.0 and float(x1[:, 700:].abs().max()) == 0.0  # zero-padded on the right
    data.keep([1])
    assert len(data) == 1 and data.paths[0].endswith('1.npy') and data.target(0).tolist() == [1, 1, 0]


def test_as_task_from_log_mel_npy_with_weighted_epochs(tmp_path, small_ckpt):
    """EVAR's 'as' layout: CSV of .wav names with train/test only, read as .npy from --data_path."""
    rng = np.random.default_rng(0)
    labels = ['/m/a', '/m/b', '/m/c']
    rows = ['file_name,label,split']
    for i in range(12):
        split = 'test' if i < 4 else 'train'
        folder = tmp_path / 'lms' / split
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f'{i:02d}.npy', rng.normal(-6, 3, (80, 120)).astype(np.float32))
        mids = ','.join(labels[j] for j in range(3) if (i >> j) & 1 or j == i % 3)
        rows.append(f'{split}/{i:02d}.wav,"{mids}",{split}')
    (tmp_path / 'as.csv').write_text('\n'.join(rows) + '\n')
    task = load_task('as', csv=tmp_path / 'as.csv', data_dir=tmp_path / 'lms', require_valid=False,
                     file_suffix='.npy')
    assert task.multilabel and task.unit_sec == 10.0 and task.counts()['valid'] == 0
    report = ft.finetune(small_ckpt, task, tmp_path / 'out', epochs=1, batch_size=4, lr=0.01, dur_frames=101,
                         weighted_sampling=6, training_mask=0.5, data_path='lms', progress=False)
    assert report['metric'] == 'mAP' and report['validation']['split'] == 'test'
    assert report['settings']['weighted_sampling'] == 6 and '--data_path lms' in report['reference_command']


def test_loader_workers_give_the_batches_of_one_process_and_leave_the_parents_collector(tmp_path):
    """With workers, the same batches as without; only the workers freeze what they inherit
    (`gc.freeze` in the parent would keep every object made so far from ever being collected)."""
    import gc

    from m2d.data.pathtable import PathTable

    for i in range(6):
        np.save(tmp_path / f'{i}.npy', np.full((80, 50 + i), float(i), dtype=np.float32))
    data = ft.ClipData(PathTable.from_names([str(tmp_path / f'{i}.npy') for i in range(6)]), np.arange(6) % 3,
                       np.arange(1, 7), 3, 16000, 16000, False, None, unit_frames=40)
    frozen = gc.get_freeze_count()
    one = list(ft.data.make_loader(data, 2, False, 0, 0))
    two = list(ft.data.make_loader(data, 2, False, 0, 1))
    assert gc.get_freeze_count() == frozen
    assert len(one) == len(two) == 3
    for (x1, y1), (x2, y2) in zip(one, two):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_non_finite_training_loss_stops_with_the_epoch_and_lr(small_ckpt, monkeypatch):
    model = ft.FinetuneModel(load_checkpoint(small_ckpt), 3)
    s = ft.FinetuneSettings(lr=0.5, mixup=0.0, progress=False)
    opt = ft.make_optimizer(list(model.parameters()), s)
    batch = [(torch.randn(4, 8000) * 0.1, torch.eye(3)[[0, 1, 2, 0]])]
    monkeypatch.setattr(ft.loop, 'evar_loss', lambda logits, y, multilabel: logits.sum() * float('nan'))
    with pytest.raises(ft.FinetuneError, match=r'the training loss became nan at epoch 2; lower --lr \(0.5\)'):
        ft.train_epoch(model, batch, opt, s, 2, np.random.default_rng(0), torch.device('cpu'), False)
