"""Learning-rate and EMA-decay schedules against the reference formulas (METHOD.md, Optimization)."""

from __future__ import annotations

import math

import pytest

from m2d.train.config import ConfigError, TrainConfig, parse_size
from m2d.train.schedule import base_to_absolute_lr, ema_decay, learning_rate


def reference_lr(e: float, lr: float, W: float, E: float, min_lr: float) -> float:
    if e < W:
        return lr * e / W
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - W) / (E - W)))


@pytest.mark.parametrize('W,E,min_lr', [(20, 300, 0.0), (3, 10, 1e-6), (0, 5, 0.0)])
def test_lr_matches_formula_per_iteration(W, E, min_lr):
    lr, iters = 2.4e-3, 7
    for epoch in range(E):
        for it in range(iters):
            e = epoch + it / iters
            assert learning_rate(e, lr, W, E, min_lr) == pytest.approx(reference_lr(e, lr, W, E, min_lr), rel=1e-12,
                                                                       abs=1e-15)


def test_lr_shape():
    lr = 1e-3
    assert learning_rate(0.0, lr, 20, 300) == 0.0
    assert learning_rate(10.0, lr, 20, 300) == pytest.approx(lr / 2)
    assert learning_rate(20.0, lr, 20, 300) == pytest.approx(lr)  # peak at the end of warmup
    assert learning_rate(160.0, lr, 20, 300) == pytest.approx(lr / 2)  # half-way down the cosine
    assert learning_rate(300.0, lr, 20, 300, min_lr=1e-5) == pytest.approx(1e-5)
    values = [learning_rate(e / 10, lr, 20, 300) for e in range(200, 3000)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup


def test_ema_decay_linear_over_micro_steps():
    d0, d1, total = 0.99995, 0.99999, 1000
    assert ema_decay(0, total, d0, d1) == d0
    assert ema_decay(total - 1, total, d0, d1) == pytest.approx(d1, abs=1e-15)
    for step in (1, 17, 500, 998):
        assert ema_decay(step, total, d0, d1) == pytest.approx(d0 + (d1 - d0) * step / (total - 1), abs=1e-15)
    assert ema_decay(0, 1, d0, d1) == d1  # a one-step run does not divide by zero


def test_lr_scaling_rule_and_defaults():
    assert base_to_absolute_lr(3e-4, 2048) == pytest.approx(2.4e-3)
    cfg = TrainConfig()
    assert (cfg.input_hw, cfg.patch_hw, cfg.mask_ratio) == ((80, 608), (16, 16), 0.7)
    assert (cfg.epochs, cfg.warmup_epochs) == (300, 20)
    assert (cfg.batch_size, cfg.blr, cfg.weight_decay, cfg.clip_grad) == (512, 3e-4, 0.05, 3.0)
    assert (cfg.ema_decay_init, cfg.ema_decay, cfg.decoder_depth, cfg.decoder_embed_dim, cfg.decoder_num_heads) == \
        (0.99995, 0.99999, 8, 512, 16)
    assert cfg.effective_batch_size(4) == 2048


def test_run_name_parses_back():
    from m2d.checkpoint import parse_model_name

    cfg = TrainConfig(model='m2d_vit_tiny', input_size='80x208', patch_size='16x16')
    name = cfg.default_run_name()
    assert name.startswith('m2d_vit_tiny-80x208p16x16p16k-') and name.endswith('-mr7')
    parsed = parse_model_name(name)
    assert parsed.input_size == (80, 208) and parsed.patch_size == (16, 16) and parsed.sample_rate == 16000
    assert parse_size('80x608', '--input_size') == (80, 608)
    with pytest.raises(ValueError, match='--model'):
        TrainConfig(model='vit_huge').check()
    with pytest.raises(ValueError, match='--norm_stats'):
        TrainConfig(norm_stats='1,2,3').check()
    assert TrainConfig(norm_stats='[-7.1, 4.2]').parsed_norm_stats() == (-7.1, 4.2)


def test_reference_command_lines_parse():
    """Old command lines keep working: reference option names, their --kebab-case spellings, the
    README's --dataset and --no_pin_mem; the reference options m2d has no use for (torchrun's
    --local-rank included) stop with the reason."""
    import argparse

    from m2d.commands import pretrain
    from m2d.train.config import config_from_args

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    old = ['--dataset', 'data/files_fsd50k.csv', '--batch_size', '64', '--accum-iter', '2', '--input_size', '80x208',
           '--norm-stats=-7.1,4.2', '--no_pin_mem', '--no-norm-pix-loss']
    opts = config_from_args(parser.parse_args(old))
    assert opts.pin_mem is False
    for refused, reason in (['--eval_after', '10'], '--eval_every'), (['--local-rank', '0'], 'torchrun'):
        with pytest.raises(ConfigError, match=reason):
            config_from_args(parser.parse_args(old + refused))
    assert (opts.csv_main, opts.batch_size, opts.accum_iter, opts.input_hw) == ('data/files_fsd50k.csv', 64, 2,
                                                                                (80, 208))
    assert opts.parsed_norm_stats() == (-7.1, 4.2) and opts.norm_pix_loss is False
    assert (opts.output_root, opts.eval, opts.eval_every) == ('runs', '', 0)
    with pytest.raises(SystemExit):
        parser.parse_args(['--crash_at_step', '3'])  # test-only options are gone from the command line
