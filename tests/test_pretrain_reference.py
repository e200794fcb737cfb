"""Pre-training that trains what the reference trains (issue 19): M2D-X from a released M2D
checkpoint (both spellings), which branch sees the noise, the teacher's input, MSM-MAE's recipe,
the precision choice, --target_layers, and every option of `m2d pretrain` acting or refused."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, write_small_checkpoint

from m2d.train.config import RECIPES, REFUSED_OPTIONS, ConfigError, TrainConfig

TINY_M2D = dict(model='m2d_vit_tiny', depth=2, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2,
                input_size='80x208')
RUN = ['--num_workers', '0', '--device', 'cpu', '--feature_eval_freq', '0', '--log_every', '1']


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _write_lms(folder: Path, n: int, frames: int, seed: int, mean: float = -8.0) -> Path:
    """`n` random LMS files ``[1, 80, frames]`` and their files.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        np.save(folder / f'{i:02d}.npy', (mean + 3.0 * rng.standard_normal((1, 80, frames))).astype(np.float32))
        names.append(f'{folder.name}/{i:02d}.npy')
    csv = folder / 'files.csv'
    csv.write_text('file_name\n' + '\n'.join(names) + '\n')
    return csv


@pytest.fixture(scope='module')
def lms_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('lms')
    return {'main': _write_lms(root / 'main', 8, 640, 0), 'noise': _write_lms(root / 'noise', 4, 300, 1, -10.0)}


def _readme_command(prefix: str) -> list[str]:
    """The README's command line starting with `prefix` (continuation lines joined), as argv after 'm2d'."""
    text = (ROOT / 'README.md').read_text().replace('\\\n', ' ')
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(prefix)]
    assert lines, f'README.md has no command line starting with {prefix!r}'
    return shlex.split(lines[0])[1:]


def _substitute(argv: list[str], mapping: dict[str, str]) -> list[str]:
    return [mapping.get(a, a) for a in argv]


# ----- 1. M2D-X from a released M2D checkpoint ---------------------------------------------------


@pytest.mark.slow
def test_m2dx_from_released_checkpoint_init_and_reference_resume(m2d_base_ckpt, lms_sets, tmp_path, caplog):
    """The README's M2D-X command (--init) and the reference's spelling (--resume FILE) both further
    pre-train from the released-layout checkpoint: epoch 0, fresh offline_predictor (named), the
    file's norm_stats, weights loaded, and the result loads in RuntimeM2D."""
    from m2d.checkpoint import read_state_dict
    from m2d.cli import main
    from m2d.runtime import RuntimeM2D

    released = read_state_dict(m2d_base_ckpt)[0]
    argv = _readme_command('m2d pretrain --model m2d_x_vit_base')
    assert '--init' in argv and '--teacher' in argv
    ck = str(m2d_base_ckpt)
    mapping = {'m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth': ck,
               'data/my_lms/files.csv': str(lms_sets['main']), 'data/noise_lms/files.csv': str(lms_sets['noise'])}
    tiny = ['--batch_size', '2', '--max_steps', '2', '--min_ds_size', '0', '--norm_stats_samples', '20', *RUN]
    init_argv = _substitute(argv, mapping)
    resume_argv = list(init_argv)
    resume_argv[resume_argv.index('--init')] = '--resume'  # the reference's Guide_app.md spelling: --resume FILE
    for spelling, cmd in (('init', init_argv), ('resume', resume_argv)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = main([*cmd, *tiny, '--output_root', str(tmp_path / spelling)])
        assert rc == 0
        logs = caplog.text
        assert 'initialized fresh: offline_predictor.bias, offline_predictor.weight' in logs
        if spelling == 'resume':
            assert 'not a run state of m2d_x_vit_base' in logs and 'as the reference does' in logs
        run = next((tmp_path / spelling).iterdir())
        assert run.name.startswith('m2d_x_vit_base-80x608p16x16p16k-')
        ckpt = load_ckpt(run / 'checkpoint-last.pth')
        assert (ckpt['epoch'], ckpt['step'], ckpt['iter_in_epoch']) == (0, 2, 2)  # a new run from epoch 0
        assert all(int(s['step']) == 2 for s in ckpt['optimizer']['state'].values())  # a new optimizer
        assert ckpt['model']['norm_stats'].tolist() == pytest.approx([-7.8, 4.6])  # the file's statistics
        for k in ('blocks.3.attn.qkv.weight', 'target_blocks.3.mlp.fc1.weight', 'decoder_pred.weight'):
            # loaded (a fresh init is ~1e-2 away); warmup starts at lr 0, so two steps barely move them
            assert torch.allclose(ckpt['model'][k], released[k], atol=1e-4), k
        assert ckpt['model']['offline_predictor.weight'].shape == (3840, 5 * 768)
        rt = RuntimeM2D(run / 'checkpoint-last.pth')
        assert rt.norm_stats.tolist() == pytest.approx([-7.8, 4.6])
        assert rt.encode(torch.zeros(1, 16000)).shape[-1] == 3840


def test_geometry_mismatch_is_one_line(m2d_base_ckpt, lms_sets, tmp_path, monkeypatch, capsys):
    """The old README example (pretrain-speech presets 80x208p80x4 with an 80x608p16x16 checkpoint):
    a one-line error naming both geometries and the options, no traceback, no run folder."""
    from m2d.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(['pretrain-speech', '--model', 'm2d_x_vit_base', '--teacher', str(m2d_base_ckpt), '--init',
               str(m2d_base_ckpt), '--csv_main', str(lms_sets['main']), '--csv_bg_noise', str(lms_sets['noise']),
               '--batch_size', '2', '--max_steps', '1', '--norm_stats_samples', '20', *RUN])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert '80x608p16x16' in err and '80x208p80x4' in err
    assert '--input_size 80x608' in err and '--patch_size 16x16' in err
    assert not (tmp_path / 'runs').exists()


def test_own_run_state_is_continued_and_foreign_one_is_not(tmp_path):
    from m2d.train.state import is_run_state

    opts = TrainConfig(**TINY_M2D)
    own = {'model': {}, 'optimizer': {}, 'step': 3, 'args': opts.to_namespace()}
    assert is_run_state(own, opts)
    assert not is_run_state({**own, 'args': TrainConfig(**{**TINY_M2D, 'model': 'm2d_x_vit_tiny'}).to_namespace()},
                            opts)  # another model's run
    assert not is_run_state({**own, 'args': TrainConfig(**{**TINY_M2D, 'input_size': '80x608'}).to_namespace()},
                            opts)  # another geometry
    released = {'model': {}, 'epoch': 300, 'args': argparse.Namespace(model='m2d_vit_tiny')}
    assert not is_run_state(released, opts)


# ----- 2./3. noise roles and the teacher's input ---------------------------------------------------


class _RecordingTeacher:
    def __init__(self):
        self.seen = None

    def __call__(self, lms, frames=None):
        self.seen = lms.clone()
        return torch.zeros(lms.shape[0], frames, 8)


@pytest.mark.parametrize('model, noisy, online_gets', [('m2d_x_vit_tiny', '', 'clean'),
                                                       ('m2d_x_vit_tiny', 'online', 'mixed'),
                                                       ('m2d_s_vit_tiny', '', 'mixed')])
def test_which_branch_sees_the_noise(model, noisy, online_gets):
    """M2D-X default: clean to the online (and EMA-target) input, the mixture to the teacher; the
    option swaps them; M2D-S's online branch sees the mixture. Checked on the tensors."""
    from m2d.train.loop import _inputs

    g = torch.Generator().manual_seed(0)
    clean, mixed = torch.randn(2, 1, 80, 208, generator=g), torch.randn(2, 1, 80, 208, generator=g)
    ids = torch.stack([torch.randperm(52, generator=g) for _ in range(2)])
    batch = {'x': mixed, 'clean': clean, 'ids_restore': ids, 'len_keep': torch.tensor([20, 20])}
    opts = TrainConfig(model=model, input_size='80x208', patch_size='80x4', noisy_branch=noisy).check()
    env = SimpleNamespace(device=torch.device('cpu'), rank=0)
    teacher = _RecordingTeacher() if model.startswith('m2d_x') else None
    x, mask, target = _inputs(batch, None, teacher, opts, env, 0, torch.autocast('cpu', enabled=False))
    expect_online, expect_teacher = (clean, mixed) if online_gets == 'clean' else (mixed, clean)
    assert torch.equal(x, expect_online) and torch.equal(mask[0], ids) and mask[1] == 20
    if teacher is not None:
        assert torch.equal(teacher.seen, expect_teacher) and target.shape == (2, 52, 8)


def test_noisy_branch_and_teacher_renorm_refusals():
    with pytest.raises(ConfigError, match='precomputed from clean speech'):
        TrainConfig(model='m2d_s_vit_tiny', noisy_branch='teacher').check()
    with pytest.raises(ConfigError, match='M2D-S/M2D-X models'):
        TrainConfig(model='m2d_vit_tiny', noisy_branch='online').check()
    with pytest.raises(ConfigError, match='--teacher_renorm needs --teacher'):
        TrainConfig(model='m2d_x_vit_tiny', teacher_renorm=True).check()


def test_teacher_gets_the_student_normalized_input_unless_renorm(tmp_path):
    """The reference feeds the teacher the student-normalized LMS as is (default); --teacher_renorm
    re-normalizes it to the teacher's statistics. Also: off_emb_dim from the teacher, loss weights."""
    from m2d.train.loop import build_model

    teacher_ckpt = write_small_checkpoint(tmp_path, norm_stats=(-6.0, 2.0))
    kw = dict(model='m2d_x_vit_tiny', depth=1, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=1,
              input_size='80x208', teacher=str(teacher_ckpt), loss_off=0.5, loss_m2d=0.25)
    x = torch.randn(1, 1, 80, 208)
    outs = {}
    for renorm in (False, True):
        opts = TrainConfig(**kw, teacher_renorm=renorm).check()
        model, teacher, _ = build_model(opts, None, (-9.0, 4.0), torch.device('cpu'))
        assert (model.loss_m2d, model.loss_off, model.offline_predictor.out_features) == (0.25, 0.5, 5 * 64)
        assert teacher.input_norm_stats == ((-9.0, 4.0) if renorm else None)
        outs[renorm] = teacher(x, frames=13)
    assert torch.allclose(outs[False], teacher.runtime.encode_lms(x).float(), atol=1e-5)  # as is
    assert torch.allclose(outs[True], teacher.runtime.encode_lms((x * 4.0 - 9.0 + 6.0) / 2.0).float(), atol=1e-5)


def test_offline_predictor_width_and_init_as_the_reference():
    """M2D-X without a teacher: off_emb_dim 3840 (the reference's), or --off_emb_dim; M2D-X's
    offline predictor is MAE-initialized (zero bias), M2D-S's keeps PyTorch's default (as the reference)."""
    from m2d.train.loop import build_model

    kw = dict(depth=1, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=1, input_size='80x208')
    cpu = torch.device('cpu')
    x_default, _, _ = build_model(TrainConfig(model='m2d_x_vit_tiny', **kw).check(), None, (0.0, 1.0), cpu)
    x_given, _, _ = build_model(TrainConfig(model='m2d_x_vit_tiny', off_emb_dim=48, **kw).check(), None, (0.0, 1.0),
                                cpu)
    assert (x_default.offline_predictor.out_features, x_given.offline_predictor.out_features) == (3840, 48)
    assert not x_given.offline_predictor.bias.any()  # xavier weights, zero bias
    s_model, _, _ = build_model(TrainConfig(model='m2d_s_vit_tiny', patch_size='80x4', off_emb_dim=48, **kw).check(),
                                None, (0.0, 1.0), cpu)
    bound = 1 / (s_model.offline_predictor.in_features ** 0.5)  # nn.Linear's default: U(-1/sqrt(fan_in), ...)
    bias = s_model.offline_predictor.bias
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2


# ----- 4. MSM-MAE's recipe ---------------------------------------------------------------------------


def test_msm_mae_defaults_are_the_references():
    """mae_train_audio.py + models_mae.msm_mae_vit_base: decoder 384-d x 4 blocks x 6 heads, raw
    pixels, mask 0.75, 80x208, 200 epochs, save every 50, no inflation; the rest as train_audio.py."""
    from m2d.commands import pretrain
    from m2d.train.config import config_from_args

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    msm = config_from_args(parser.parse_args(['--model', 'msm_mae_vit_base']))
    ref = dict(input_hw=(80, 208), patch_hw=(16, 16), decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
               norm_pix_loss=False, mask_ratio=0.75, epochs=200, save_freq=50, min_ds_size=0, blr=3e-4,
               warmup_epochs=20, weight_decay=0.05, clip_grad=3.0, batch_size=512, optim='adamw')
    assert {k: getattr(msm, k) for k in ref} == ref
    m2d = config_from_args(parser.parse_args([]))
    assert (m2d.input_hw, m2d.decoder_embed_dim, m2d.decoder_depth, m2d.norm_pix_loss, m2d.mask_ratio, m2d.epochs,
            m2d.min_ds_size, m2d.save_freq) == ((80, 608), 512, 8, True, 0.7, 300, 10000, 100)
    # given options still win over the recipe
    own = config_from_args(parser.parse_args(['--model', 'msm_mae_vit_base', '--decoder_depth', '2',
                                              '--norm_pix_loss', '--mask_ratio', '0.5']))
    assert (own.decoder_depth, own.norm_pix_loss, own.mask_ratio) == (2, True, 0.5)
    assert set(RECIPES['msm_mae']) == set(RECIPES['m2d'])


def test_readme_msm_mae_command_runs(lms_sets, tmp_path):
    """The README's MSM-MAE command for one step: the recipe's 384-d, 4-block decoder, raw-pixel loss."""
    from m2d.cli import main

    argv = _substitute(_readme_command('m2d pretrain --model msm_mae_vit_base'),
                       {'data/audioset_lms/files.csv': str(lms_sets['main'])})
    rc = main([*argv, '--batch_size', '2', '--max_steps', '1', '--norm_stats_samples', '20', *RUN,
               '--output_root', str(tmp_path)])
    assert rc == 0
    run = next(tmp_path.iterdir())
    assert run.name.startswith('msm_mae_vit_base-80x208p16x16p16k-') and run.name.endswith('-mr75')
    sd = load_ckpt(run / 'checkpoint-last.pth')['model']
    assert sd['decoder_embed.weight'].shape == (384, 768) and sd['decoder_pred.weight'].shape == (256, 384)
    assert len({k.split('.')[1] for k in sd if k.startswith('decoder_blocks.')}) == 4
    args = load_ckpt(run / 'checkpoint-last.pth')['args']
    assert args.norm_pix_loss is False and args.mask_ratio == 0.75


# ----- 5. precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize('flags, bf16_ok, expect', [
    ({}, True, 'bf16'), ({}, False, 'fp16'), ({'fp32': True}, True, 'fp32'), ({'fp16': True}, True, 'fp16'),
    ({'bf16': True}, True, 'bf16'), ({'bf16': True}, False, ConfigError)])
def test_cuda_precision_choice(monkeypatch, caplog, flags, bf16_ok, expect):
    """On CUDA: bf16 where the GPU supports it, else fp16 with loss scaling; --fp32 opts out; the
    choice is logged. The CUDA capability queries are stand-ins (no GPU here)."""
    from m2d.train import precision

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a, **k: 'Stand-in GPU')
    opts = TrainConfig(**flags)
    device = torch.device('cuda', 0)
    if expect is ConfigError:
        with pytest.raises(ConfigError, match='Stand-in GPU has no bfloat16; use --fp16'):
            precision.choose_precision(opts, device)
        return
    assert precision.choose_precision(opts, device)[0] == expect
    with caplog.at_level(logging.INFO, logger='m2d.train.precision'):
        chosen, _, scaler = precision.setup(opts, torch.device('cpu') if expect == 'fp32' else device)
    assert 'precision: ' in caplog.text


@pytest.mark.parametrize('flags, expect', [({}, 'fp32'), ({'bf16': True}, 'bf16'), ({'fp32': True}, 'fp32'),
                                           ({'fp16': True}, ConfigError)])
def test_cpu_precision_choice(caplog, flags, expect):
    from m2d.train import precision

    opts = TrainConfig(**flags)
    if expect is ConfigError:
        with pytest.raises(ConfigError, match='--fp16 is for CUDA GPUs'):
            precision.choose_precision(opts, torch.device('cpu'))
        return
    with caplog.at_level(logging.INFO, logger='m2d.train.precision'):
        chosen, ctx, scaler = precision.setup(opts, torch.device('cpu'))
    assert chosen == expect and not scaler.is_enabled()
    assert ('bfloat16 autocast' if expect == 'bf16' else 'float32') in caplog.text
    with ctx:
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if expect == 'bf16' else torch.float32)
    with pytest.raises(ConfigError, match='exclude each other'):
        TrainConfig(bf16=True, fp32=True).check()


def test_loss_scaling_skips_overflowing_steps():
    """--fp16's update: unscale, clip, step; an overflow (inf gradient) skips the step and lowers the scale."""
    from m2d.train.loop import apply_update

    model = torch.nn.Linear(3, 2)
    model.update_target = lambda decay: None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=8.0, enabled=True)
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    norm = apply_update(model, opt, list(model.parameters()), 3.0, 0.9, scaler)
    assert norm == pytest.approx(float(torch.tensor([1.0] * 6 + [1.0, 1.0]).norm()))  # unscaled gradients
    assert torch.allclose(model.weight, before - 0.1)
    model.weight.grad = torch.full_like(model.weight, float('inf'))
    model.bias.grad = torch.zeros_like(model.bias)
    after_ok = model.weight.detach().clone()
    assert not np.isfinite(apply_update(model, opt, list(model.parameters()), 3.0, 0.9, scaler))
    assert torch.equal(model.weight, after_ok) and scaler.get_scale() == 4.0


# ----- 6. --target_layers and every option ---------------------------------------------------------


def test_target_layers_average_before_target_norm():
    from m2d.models import create_model

    cfg = TrainConfig(**{**TINY_M2D, 'depth': 3}, target_layers='[0, 2]').check()
    kw = cfg.model_config()
    assert kw['target_layers'] == (0, 2)
    model = create_model('m2d', **kw)
    tokens = torch.randn(2, 7, model.config.embed_dim)
    x = torch.cat([model.cls_with_pos(2), tokens], dim=1)
    outs = []
    for blk in model.target_blocks:
        x = blk(x)
        outs.append(x)
    expect = model.target_norm((outs[0] + outs[2]) / 2)[:, 1:]
    assert torch.allclose(model.forward_target(tokens), expect, atol=1e-6)
    model.target_layers = None  # the default: the last block only
    assert torch.allclose(model.forward_target(tokens), model.target_norm(outs[2])[:, 1:], atol=1e-6)
    with pytest.raises(ConfigError, match='outside the 3 blocks'):
        TrainConfig(**{**TINY_M2D, 'depth': 3}, target_layers='0,3').check()
    with pytest.raises(ConfigError, match='reconstructs pixels'):
        TrainConfig(model='msm_mae_vit_tiny', target_layers='1').check()


def test_options_reach_the_run(lms_sets, tmp_path, monkeypatch):
    """One tiny run with optimization, EMA, mask, target, loader and log options: each reaches
    what it drives (the update's clip and EMA decay, the optimizer groups, the loader, the masks)."""
    from m2d.cli import main
    from m2d.train import loop

    calls = []
    real_update, real_loader = loop.apply_update, loop.make_loader

    def update(model, optimizer, params, clip_grad, decay, scaler=None):
        calls.append((clip_grad, decay, [g['weight_decay'] for g in optimizer.param_groups], type(optimizer)))
        return real_update(model, optimizer, params, clip_grad, decay, scaler)

    loaders = []

    def make_loader(opts, env, dataset):
        out = real_loader(opts, env, dataset)
        loaders.append(out)
        return out

    monkeypatch.setattr(loop, 'apply_update', update)
    monkeypatch.setattr(loop, 'make_loader', make_loader)
    tb = tmp_path / 'tb'
    rc = main(['pretrain', '--model', 'm2d_vit_tiny', '--depth', '2', '--decoder_depth', '1', '--decoder_embed_dim',
               '64', '--decoder_num_heads', '2', '--input_size', '80x208', '--csv_main', str(lms_sets['main']),
               '--batch_size', '4', '--epochs', '3', '--stop_at', '1', '--min_ds_size', '0', '--norm_stats=-8,3',
               '--blr', '1e-3', '--weight_decay', '0.1', '--clip_grad', '0.5', '--ema_decay_init', '0.9',
               '--ema_decay', '0.95', '--optim', 'sgd', '--cont_mask', '3', '--target_layers', '0,1', '--loss_fn',
               'mse', '--pin_mem', '--fp32', '--log_dir', str(tb), '--output_dir', str(tmp_path / 'run'), *RUN])
    assert rc == 0
    ckpt = load_ckpt(tmp_path / 'run' / 'checkpoint-1.pth')
    assert (ckpt['epoch'], ckpt['step']) == (1, 2)  # --stop_at 1 of --epochs 3: one epoch of 8 files / 4
    assert [c[0] for c in calls] == [0.5, 0.5]
    assert calls[0][1] == pytest.approx(0.9) and calls[1][1] == pytest.approx(0.9 + 0.05 * 1 / 5)  # 6 steps
    assert calls[0][2] == [0.0, 0.1] and calls[0][3] is torch.optim.SGD  # SGD keeps the decay groups
    assert ckpt['args'].lr == pytest.approx(1e-3 * 4 / 256)
    items, _, loader = loaders[0]
    assert loader.pin_memory is True
    item = items[0]
    masked = (item['ids_restore'].reshape(-1) >= int(item['len_keep'])).reshape(5, 13)  # original patch order
    assert torch.equal(masked, masked[:1].expand(5, 13)) and masked.any()  # --cont_mask: whole time columns
    assert ckpt['args'].target_layers == '0,1' and ckpt['args'].loss_fn == 'mse'
    if importlib.util.find_spec('tensorboard') is not None:
        assert any(p.name.startswith('events.') for p in tb.iterdir())


@pytest.mark.parametrize('name', sorted(REFUSED_OPTIONS))
def test_refused_reference_options_say_why(name, tmp_path, monkeypatch, capsys):
    from m2d.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(['pretrain', f'--{name}', '1', '--csv_main', 'unused.csv'])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and f'--{name} is not an option of m2d pretrain' in err, err
    assert REFUSED_OPTIONS[name].split(';')[0] in err


def test_every_option_acts_or_is_refused():
    """Every option of `m2d pretrain` and `m2d pretrain-speech` (hidden ones included) is either
    refused with a reason or given by a test of the suite (by its option string or its field name)."""
    from m2d.commands import pretrain, pretrain_speech

    texts = '\n'.join(p.read_text() for p in (ROOT / 'tests').glob('test_*.py'))
    for module in (pretrain, pretrain_speech):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        untested = []
        for action in parser._actions:
            if action.dest == 'help' or action.dest in REFUSED_OPTIONS:
                continue
            patterns = [re.escape(o) + r"(?=['\s,=)\]])" for o in action.option_strings]
            patterns.append(r'\b' + action.dest + '=')  # a TrainConfig(...) keyword
            if not any(re.search(p, texts) for p in patterns):
                untested.append(action.dest)
        assert not untested, f'{module.__name__}: options no test gives: {untested}'
