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
    ('valid_fraction', 0.0, '--valid_fraction'), ('save_every', -1, '--save_every')])
def test_bad_settings_name_the_option(option, value, message):
    with pytest.raises(ft.FinetuneError, match=message):
        ft.FinetuneSettings(**{option: value}).check()


@pytest.mark.parametrize('extra, message', [
    (['--lr', '-1'], '--lr -1'), (['--training_mask', '1.5'], '--training_mask'),
    (['--norm_stats', 'a,b'], '--norm_stats'), (['--device', 'nonsense'], '--device'),
    (['--valid_fraction', '2'], '--valid_fraction 2.0'), (['--save_every', '-1'], '--save_every -1'),
    (['--fold', '3'], '--fold 3: '), (['--valid_fraction', '0.2'], 'has its own valid split')])
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
