"""Shared test fixtures: paths into ../shared and the stand-in released checkpoints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
FIXTURES = SHARED / 'fixtures'
REFERENCE = FIXTURES / 'reference'
FSDD = SHARED / 'data' / 'fsdd' / 'recordings'


def need(path: Path) -> Path:
    """Skip the test with a reason when a file from ../shared is absent."""
    if not path.exists():
        pytest.skip(f'{path} is absent (../shared is beside the checkout in CI)')
    return path


def _official_checkpoint_module():
    need(FIXTURES / 'official_checkpoint.py')
    spec = importlib.util.spec_from_file_location('official_checkpoint', FIXTURES / 'official_checkpoint.py')
    mod = importlib.util.module_from_spec(spec)
    sys.modules['official_checkpoint'] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='session')
def official_checkpoint():
    """The fixtures' `official_checkpoint` module (write_fixture, make_state_dict, KEYS)."""
    return _official_checkpoint_module()


@pytest.fixture(scope='session')
def m2d_base_ckpt(tmp_path_factory, official_checkpoint) -> Path:
    """Stand-in of m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth."""
    return official_checkpoint.write_fixture(tmp_path_factory.mktemp('ckpt'), 'm2d_vit_base_16k')


@pytest.fixture(scope='session')
def m2d_s_ckpt(tmp_path_factory, official_checkpoint) -> Path:
    """Stand-in of m2d_s_vit_base-80x608p80x2-230220/checkpoint-1000.pth."""
    return official_checkpoint.write_fixture(tmp_path_factory.mktemp('ckpt'), 'm2d_s_vit_base_16k')


@pytest.fixture(scope='session')
def fsdd_dir() -> Path:
    return need(FSDD)


def fsdd_lms_csv(root: Path, step: int, count: int) -> Path:
    """Every `step`-th FSDD recording (at most `count`) converted to LMS .npy files under
    ``root/lms``; returns its ``files.csv``."""
    need(FSDD)
    from m2d.data.convert import convert

    wav = root / 'wav'
    wav.mkdir()
    for f in sorted(FSDD.glob('*.wav'))[::step][:count]:
        (wav / f.name).symlink_to(f)
    summary = convert(wav, root / 'lms', workers=0, progress=False)
    assert summary.exit_code == 0, summary
    return root / 'lms' / 'files.csv'


def write_small_checkpoint(folder: Path, name: str = 'm2d_vit_tiny-80x208p16x16-240101', embed_dim: int = 64,
                           depth: int = 2, norm_stats=(-8.0, 4.0), seed: int = 0) -> Path:
    """A small encoder checkpoint in the official container ({'model', 'epoch', 'args'}); returns its path."""
    import argparse

    import torch

    from m2d.checkpoint import parse_model_name
    from m2d.vit import ViTConfig, ViTEncoder

    geo = parse_model_name(name)
    torch.manual_seed(seed)
    enc = ViTEncoder(ViTConfig(input_size=geo.input_size, patch_size=geo.patch_size, embed_dim=embed_dim,
                               depth=depth, num_heads=max(1, embed_dim // 64)))
    with torch.no_grad():  # non-trivial values everywhere (LayerNorms included)
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = dict(enc.state_dict())
    sd['norm_stats'] = torch.tensor(norm_stats)
    path = Path(folder) / name / 'checkpoint-1.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'epoch': 1, 'args': argparse.Namespace(model=geo.model)}, path)
    return path


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A small 80x208p16x16 encoder checkpoint (64-d, 2 blocks) in a folder named like a release."""
    return write_small_checkpoint(tmp_path)


AS_FT_STANDIN = 'm2d_as_vit_tiny-80x208p16x16-240213_AS-FT_enconly'


def write_as_ft_standin(folder: Path, name: str = AS_FT_STANDIN, embed_dim: int = 64, depth: int = 2,
                        num_classes: int = 527, seed: int = 0, head_std: float = 0.5,
                        head_bias: float = -2.0) -> Path:
    """A stand-in of a released AS-FT file in EVAR's layout: tensors only, ``module.ar.runtime.backbone.*``
    (the encoder) and ``module.head.*`` (BatchNorm statistics + a `num_classes`-way linear head on the
    stacked features), no class names and no norm_stats, in a folder named like the release (seeded)."""
    import torch

    from m2d.checkpoint import parse_model_name
    from m2d.vit import ViTConfig, ViTEncoder

    geo = parse_model_name(name)
    g = torch.Generator().manual_seed(seed)
    cfg = ViTConfig(input_size=geo.input_size, patch_size=geo.patch_size, embed_dim=embed_dim, depth=depth,
                    num_heads=max(1, embed_dim // 64))
    torch.manual_seed(seed)
    enc = ViTEncoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    feature_d = embed_dim * cfg.grid_size[0]
    sd = {'module.ar.runtime.backbone.' + k: v.clone() for k, v in enc.state_dict().items()}
    sd['module.head.norm.running_mean'] = 0.1 * torch.randn(feature_d, generator=g)
    sd['module.head.norm.running_var'] = 0.5 + torch.rand(feature_d, generator=g)
    sd['module.head.norm.num_batches_tracked'] = torch.tensor(100)
    sd['module.head.mlp.mlp.0.weight'] = head_std * torch.randn(num_classes, feature_d, generator=g) / feature_d ** 0.5
    sd['module.head.mlp.mlp.0.bias'] = torch.randn(num_classes, generator=g) + head_bias
    path = Path(folder) / name / 'weights_ep0it0-0.00000_mAP0.4.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


@pytest.fixture(scope='session')
def as_ft_standin(tmp_path_factory) -> Path:
    """The AS-FT stand-in (80x208 frames, 64-d, 2 blocks, 527 classes, seeded)."""
    return write_as_ft_standin(tmp_path_factory.mktemp('asft'))
