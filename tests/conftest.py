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
